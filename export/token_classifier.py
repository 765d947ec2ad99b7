"""The token classifier (named entities, part-of-speech tags...): a BERT-family encoder with a linear layer on
every token, fine-tuned on words with one tag each. A word's tag is learnt on its first sub-token; its other
sub-tokens and the special tokens are ignored (-100), the Hugging Face recipe, and predictions are read back
the same way."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from export import classifier as clf
from export.errors import check_checkpoint_folder, checkpoint_load_error
from export.tokenization import load_checkpoint_tokenizer
from export.training import batches, fine_tune

logger = logging.getLogger(__name__)

IGNORE = -100  # cross_entropy's ignore_index: sub-tokens after a word's first, special tokens, padding


class TokenClassifier(nn.Module):
    """encoder -> dropout -> linear on every token. forward returns logits (B, T, num_labels)."""

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state  # (B, T, C)
        return self.classifier(self.dropout(hidden))  # (B, T, L)


class ImportedTokenClassifier(nn.Module):
    """A fine-tuned Hugging Face token-classification model, exported as it is."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits  # (B, T, L)


@dataclass
class LoadedTokenClassifier:
    model: nn.Module  # forward(input_ids, attention_mask[, token_type_ids]) -> logits (B, T, L)
    tokenizer: Tokenizer  # without padding or truncation
    config: object  # the encoder's transformers config
    uses_token_types: bool
    source: str
    labels: list[str] | None = None  # imported checkpoints carry theirs


def load_base(folder: Path, num_labels: int) -> LoadedTokenClassifier:
    """A pretrained encoder from a local checkpoint folder (the classifier's loader), with a new head."""
    base = clf.load_base(folder, num_labels, clf.Pooling.CLS)
    return LoadedTokenClassifier(TokenClassifier(base.model.encoder, num_labels), base.tokenizer, base.config,
                                 base.uses_token_types, base.source)


def scratch(tokenizer: Tokenizer, num_labels: int, *, layers: int, heads: int, hidden: int,
            max_length: int) -> LoadedTokenClassifier:
    """A BERT encoder with random weights, sized as the classifier's scratch models."""
    base = clf.scratch(tokenizer, num_labels, clf.Pooling.CLS, layers=layers, heads=heads, hidden=hidden,
                       max_length=max_length)
    return LoadedTokenClassifier(TokenClassifier(base.model.encoder, num_labels), tokenizer, base.config, True,
                                 base.source)


def load_finetuned(folder: Path) -> LoadedTokenClassifier:
    """`--import`: a fine-tuned token-classification checkpoint, exported without training."""
    from transformers import AutoModelForTokenClassification

    check_checkpoint_folder(folder)
    try:
        model = AutoModelForTokenClassification.from_pretrained(
            folder, local_files_only=True, attn_implementation="eager"
        )
    except Exception as exc:  # noqa: BLE001 (as in classifier.load_base)
        raise checkpoint_load_error(folder, exc) from None
    tokenizer = load_checkpoint_tokenizer(folder)
    config = model.config
    labels = [str(config.id2label[i]) for i in range(config.num_labels)]
    uses = clf._uses_token_types(model, config)
    return LoadedTokenClassifier(ImportedTokenClassifier(model), tokenizer, config, uses, str(folder), labels)


@dataclass(frozen=True)
class WordBatch:
    inputs: dict[str, np.ndarray]  # input_ids, attention_mask, token_type_ids (batch, longest), padded right
    first_tokens: list[list[int | None]]  # per sentence and word: its first sub-token's position (None: cut off)


def encode_words(tokenizer: Tokenizer, sentences: list[list[str]], max_length: int, pad_id: int) -> WordBatch:
    """Pre-split words through the tokenizer (`is_pretokenized`: each word is normalized and split into
    sub-tokens on its own), truncated to max_length tokens with the special tokens kept."""
    encoder = Tokenizer.from_str(tokenizer.to_str())
    encoder.enable_truncation(max_length)
    encodings = encoder.encode_batch(sentences, is_pretokenized=True)
    width = max(len(e.ids) for e in encodings)
    ids = np.full((len(sentences), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sentences), width), dtype=np.int64)
    types = np.zeros((len(sentences), width), dtype=np.int64)
    first_tokens = []
    for row, (encoding, words) in enumerate(zip(encodings, sentences)):
        n = len(encoding.ids)
        ids[row, :n] = encoding.ids
        mask[row, :n] = 1
        types[row, :n] = encoding.type_ids
        first: list[int | None] = [None] * len(words)
        for position, word in enumerate(encoding.word_ids):
            if word is not None and first[word] is None:
                first[word] = position
        first_tokens.append(first)
    return WordBatch({"input_ids": ids, "attention_mask": mask, "token_type_ids": types}, first_tokens)


def token_labels(batch: WordBatch, tags: list[list[int]]) -> np.ndarray:
    """(batch, longest): each word's tag on its first sub-token, IGNORE everywhere else."""
    labels = np.full(batch.inputs["input_ids"].shape, IGNORE, dtype=np.int64)
    for row, (first, sentence_tags) in enumerate(zip(batch.first_tokens, tags)):
        for position, tag in zip(first, sentence_tags):
            if position is not None:
                labels[row, position] = tag
    return labels


def _feed(loaded: LoadedTokenClassifier, batch: WordBatch) -> dict[str, torch.Tensor]:
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if loaded.uses_token_types else [])
    return {name: torch.from_numpy(batch.inputs[name]) for name in names}


def train(
    loaded: LoadedTokenClassifier,
    sentences: list[list[str]],
    tags: list[list[int]],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    max_length: int,
    seed: int,
    pad_id: int,
) -> float | None:
    """Fine-tunes (`export.training.fine_tune`); returns the last smoothed training loss."""

    def loss_of_batch(index: list[int]) -> torch.Tensor:
        batch = encode_words(loaded.tokenizer, [sentences[i] for i in index], max_length, pad_id)
        labels = torch.from_numpy(token_labels(batch, [tags[i] for i in index]))
        logits = loaded.model(**_feed(loaded, batch))  # (B, T, L)
        # Summed over labelled tokens and divided by their number (at least 1): a batch whose words were all
        # cut off or tokenize to nothing gives 0 rather than NaN.
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
        return loss / max(1, int((labels != IGNORE).sum()))

    return fine_tune(loaded.model, len(sentences), steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                     seed=seed, loss_of_batch=loss_of_batch)


def predict_words(
    logits_of: Callable[[dict[str, np.ndarray]], np.ndarray],
    tokenizer: Tokenizer,
    sentences: list[list[str]],
    *,
    max_length: int,
    pad_id: int,
    fallback: int,
    batch_size: int = 32,
) -> list[list[int]]:
    """Each word's predicted tag: the argmax at its first sub-token, through `logits_of(inputs) -> (B, T, L)`
    (PyTorch or an ONNX session). Words cut off by max_length, or that tokenize to nothing, get `fallback`
    (the "O" tag), as a server answering for the tokens it saw would leave them."""
    predicted: list[list[int]] = [[] for _ in sentences]
    # Sorted by length so that batches pad little.
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    for index in batches(len(sentences), batch_size, None):
        chosen = [order[i] for i in index]
        batch = encode_words(tokenizer, [sentences[i] for i in chosen], max_length, pad_id)
        best = logits_of(batch.inputs).argmax(axis=-1)  # (B, T)
        for row, i in enumerate(chosen):
            predicted[i] = [fallback if p is None else int(best[row, p]) for p in batch.first_tokens[row]]
    return predicted


def torch_logits(loaded: LoadedTokenClassifier) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    def logits_of(inputs: dict[str, np.ndarray]) -> np.ndarray:
        names = ["input_ids", "attention_mask"] + (["token_type_ids"] if loaded.uses_token_types else [])
        with torch.inference_mode():
            return loaded.model(*(torch.from_numpy(inputs[n]) for n in names)).float().numpy()

    loaded.model.eval()
    return logits_of


def is_bio(names: list[str]) -> bool:
    """Tags of the BIO (IOB1 or IOB2) scheme: "O" and B-TYPE / I-TYPE."""
    return all(n == "O" or (n[:2] in ("B-", "I-") and len(n) > 2) for n in names)


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, first word, last word + 1) of every entity, as conlleval reads BIO tags: an entity starts at
    B-X, or at I-X after anything but X (so IOB1 files and stray I- tags read too), and runs over the I-X
    that follow."""
    found = set()
    start, kind = None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, tag_kind = tag.partition("-")
        continues = prefix == "I" and tag_kind == kind
        if start is not None and not continues:
            found.add((kind, start, i))
            start, kind = None, None
        if prefix in ("B", "I") and not continues:
            start, kind = i, tag_kind
    return found


def scores(gold: list[list[int]], predicted: list[list[int]], names: list[str]) -> dict[str, float | int | None]:
    """Word accuracy and, for BIO tags, entity-level precision, recall and F1 (exact spans and types)."""
    words = sum(len(s) for s in gold)
    correct = sum(g == p for gs, ps in zip(gold, predicted) for g, p in zip(gs, ps))
    result: dict[str, float | int | None] = {"word_accuracy": round(correct / max(1, words), 4), "words": words,
                                             "sentences": len(gold)}
    if not is_bio(names):
        result.update(entities=None, entity_precision=None, entity_recall=None, entity_f1=None)
        return result
    true_positive = predicted_count = gold_count = 0
    for gs, ps in zip(gold, predicted):
        want, got = entities([names[t] for t in gs]), entities([names[t] for t in ps])
        true_positive += len(want & got)
        predicted_count += len(got)
        gold_count += len(want)
    precision = true_positive / predicted_count if predicted_count else 0.0
    recall = true_positive / gold_count if gold_count else None
    f1 = None
    if recall is not None:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    result.update(entities=gold_count, entity_precision=round(precision, 4),
                  entity_recall=None if recall is None else round(recall, 4), entity_f1=None if f1 is None else round(f1, 4))
    return result
