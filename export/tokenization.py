"""Tokenizers: loading a checkpoint's, training new ones (WordPiece for BERT, byte-level BPE for GPT), and
batch encoding with the padding conventions of the repository format (right for classifiers, left for
generators)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from export.errors import ExportError

logger = logging.getLogger(__name__)

EOS = "<|endoftext|>"
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def plain(tokenizer: Tokenizer) -> Tokenizer:
    """A copy without built-in padding and truncation. MiniLM's tokenizer.json forces both to 128, which would
    silently cut every text (and pad every batch) in the server; the repository format leaves both to the
    server, bounded by config.json's max_sequence_length."""
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.no_padding()
    copy.no_truncation()
    return copy


def load_checkpoint_tokenizer(folder: Path) -> Tokenizer:
    """The fast tokenizer of a Hugging Face checkpoint folder: its tokenizer.json, else whatever transformers
    builds from the folder's vocabulary files (vocab.txt, vocab.json + merges.txt)."""
    file = folder / "tokenizer.json"
    if file.is_file():
        try:
            return plain(Tokenizer.from_file(str(file)))
        except Exception as exc:  # noqa: BLE001 (tokenizers raises a bare Exception on a malformed file)
            raise ExportError(f"cannot read {file}: {str(exc).splitlines()[0]}") from None
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        # GPT-2 style: built directly, because transformers 5's GPT2TokenizerFast ignores vocab_file/merges_file.
        bpe = models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
        return _byte_level(Tokenizer(bpe))
    if (folder / "vocab.txt").is_file():
        return _wordpiece_pipeline(Tokenizer(models.WordPiece.from_file(str(folder / "vocab.txt"), unk_token="[UNK]")))
    raise ExportError(f"checkpoint folder {folder} has no tokenizer (tokenizer.json, vocab.txt or vocab.json)")


def _wordpiece_pipeline(tokenizer: Tokenizer) -> Tokenizer:
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, handle_chinese_chars=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    if cls is not None and sep is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
    return tokenizer


def train_wordpiece(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A lower-cased WordPiece vocabulary (BERT's pipeline) learnt from the training texts."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, handle_chinese_chars=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(BERT_SPECIALS), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return _wordpiece_pipeline(tokenizer)


def _byte_level(tokenizer: Tokenizer) -> Tokenizer:
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps the offsets of leading spaces, which streaming detokenizers rely on.
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def train_byte_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """GPT-2's tokenizer recipe: byte-level BPE, so that every UTF-8 text (emoji, CJK, accents) round-trips
    exactly, with `<|endoftext|>` as the one special token."""
    tokenizer = _byte_level(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def special_ids(tokenizer: Tokenizer, eos: str | None = None) -> dict[str, int | None]:
    """The special token ids of config.json (null where the tokenizer has none)."""
    def find(*names: str) -> int | None:
        for name in names:
            found = tokenizer.token_to_id(name)
            if found is not None:
                return found
        return None

    end = find(eos) if eos else find(EOS, "</s>")
    return {
        "pad": find("[PAD]", "<pad>"),
        "unk": find("[UNK]", "<unk>"),
        "cls": find("[CLS]", "<s>"),
        "sep": find("[SEP]", "</s>"),
        "bos": find("<s>", "<|startoftext|>"),
        "eos": end,
    }


def encode_right_padded(
    tokenizer: Tokenizer, texts: list[str], max_length: int, pad_id: int
) -> dict[str, np.ndarray]:
    """The classifier's inputs: input_ids, attention_mask, token_type_ids (batch, longest), padded right."""
    encoder = Tokenizer.from_str(tokenizer.to_str())
    encoder.enable_truncation(max_length)
    encodings = encoder.encode_batch(texts)
    width = max(len(e.ids) for e in encodings)
    ids = np.full((len(texts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(texts), width), dtype=np.int64)
    types = np.zeros((len(texts), width), dtype=np.int64)
    for row, encoding in enumerate(encodings):
        n = len(encoding.ids)
        ids[row, :n] = encoding.ids
        mask[row, :n] = 1
        types[row, :n] = encoding.type_ids
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def left_padded(sequences: list[list[int]], pad_id: int) -> dict[str, np.ndarray]:
    """The generator's prefill inputs: input_ids, attention_mask and position_ids, padded on the left, with
    positions counting real tokens only (the repository format's convention), and logits_positions asking
    for the logits of every position."""
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = seq
        mask[row, width - len(seq):] = 1
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
            "logits_positions": np.arange(width, dtype=np.int64)}
