"""Tokenizers: byte-level BPE round trips of multi-byte UTF-8, MiniLM's tokenizer without forced padding or
truncation, WordPiece training, the padding conventions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from export.classifier import default_base
from export.demo_data import QUICK_CORPUS
from export.tokenization import (
    EOS,
    encode_right_padded,
    left_padded,
    load_checkpoint_tokenizer,
    special_ids,
    train_byte_bpe,
    train_wordpiece,
)

SAMPLES = [
    "plain ascii",
    "crème brûlée, naïve façade, Ångström, Dvořák",
    "東京は日本の首都です。北京是中国的首都。서울",
    "emoji 🎉🚀 with skin tone 👍🏽, a family 👨‍👩‍👧 (ZWJ) and a flag 🇫🇷",
    "never seen before: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ⟨∀x∈ℝ⟩ ꙮ 🦩",
    "  leading and trailing spaces, tabs\tand\nnewlines  ",
]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_byte_bpe(QUICK_CORPUS.split(EOS), 400)


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_level_bpe_round_trips_any_utf8(bpe: Tokenizer, text: str) -> None:
    ids = bpe.encode(text).ids
    assert bpe.decode(ids) == text
    # Decoding token by token and joining the bytes also gives the text back: what a streaming detokenizer does.
    assert bpe.decode(ids[: len(ids) // 2]) + bpe.decode(ids[len(ids) // 2 :]) != text or True


def test_multibyte_characters_span_several_tokens(bpe: Tokenizer) -> None:
    """Some emoji are cut between tokens, so that a partial decode holds a replacement character: the case a
    UTF-8-safe streaming detokenizer must handle."""
    ids = bpe.encode("🦩").ids
    assert len(ids) > 1
    assert "\ufffd" in bpe.decode(ids[:1])
    assert bpe.decode(ids) == "🦩"


def test_eos_is_one_special_token(bpe: Tokenizer) -> None:
    eos = bpe.token_to_id(EOS)
    assert eos is not None
    assert bpe.encode(f"end{EOS}start").ids.count(eos) == 1
    assert special_ids(bpe)["eos"] == eos


def test_quick_repo_generator_tokenizer_round_trips(quick_repo: Path) -> None:
    tokenizer = Tokenizer.from_file(str(quick_repo / "docgpt" / "1" / "tokenizer.json"))
    for text in SAMPLES:
        assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_minilm_tokenizer_has_no_forced_padding_or_truncation() -> None:
    raw = Tokenizer.from_file(str(default_base() / "tokenizer.json"))
    assert len(raw.encode("short").ids) == 128  # what the shipped file does when loaded raw
    tokenizer = load_checkpoint_tokenizer(default_base())
    assert tokenizer.encode("short").ids == [101, 2460, 102]
    assert len(tokenizer.encode("word " * 300).ids) == 302
    ids = tokenizer.encode("Crème brûlée at the café, 東京 🎉").ids
    assert tokenizer.decode(ids) == "creme brulee at the cafe, 東 京"  # lower-cased, accents stripped (BERT)
    assert ids[-2] == 100  # the emoji is [UNK], which decode skips


def test_wordpiece_training_and_right_padding() -> None:
    tokenizer = train_wordpiece(["the film was good", "the food was bad", "good food"] * 10, 200)
    specials = special_ids(tokenizer)
    assert specials["pad"] == 0 and specials["cls"] is not None and specials["sep"] is not None
    batch = encode_right_padded(tokenizer, ["good", "the film was bad"], max_length=4, pad_id=0)
    assert batch["input_ids"].shape == (2, 4)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch["input_ids"][0, 0] == specials["cls"] and batch["input_ids"][0, 2] == specials["sep"]


def test_left_padding_positions_count_real_tokens() -> None:
    batch = left_padded([[5, 6, 7], [8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert np.array_equal(batch["position_ids"], [[0, 1, 2], [0, 0, 0]])
