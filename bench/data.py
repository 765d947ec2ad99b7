"""The texts the benchmarks send: SST-2 sentences and tiny-shakespeare prompts when the shared data is there
(`../shared/data/` from the project's root, or `--data DIR`), a small built-in set otherwise."""

from __future__ import annotations

import csv
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.machine import ROOT

logger = logging.getLogger(__name__)

DEFAULT_DATA = ROOT.parent / "shared" / "data"

# Short English sentences of the length SST-2 sentences have (5 to 40 words), our own.
BUILTIN_SENTENCES = (
    "a gripping story told with real warmth and a sharp eye for detail",
    "the plot collapses under the weight of its own clichés",
    "one of the most charming films of the year",
    "tedious , overlong and curiously empty",
    "the performances are uniformly excellent , especially the two leads",
    "i kept checking my watch",
    "a smart , funny and surprisingly moving comedy about growing up",
    "the dialogue is flat and the jokes land with a thud",
    "beautifully shot , but the script never finds its footing",
    "an instant classic that rewards a second viewing",
    "it is hard to care about characters this thinly written",
    "the director keeps the tension high from the first scene to the last",
    "a mess of a movie with a few good moments buried in it",
    "fresh , lively and full of ideas",
    "the kind of film that makes you want to call your mother",
    "nothing here you have not seen done better elsewhere",
    "a triumph of style over substance that is never boring",
    "the soundtrack alone is worth the price of admission",
    "dull characters wander through a muddled plot for two hours",
    "an ambitious , uneven but ultimately rewarding piece of work",
    "the ending is so abrupt that the audience laughed",
    "warm , wise and wonderfully acted",
    "a clumsy attempt to cash in on a tired franchise",
    "every frame is full of life and color",
    "you will forget it the moment the credits roll",
    "the best thing the studio has released in a decade",
    "too long by half and not nearly as clever as it thinks",
    "a quiet , thoughtful drama that stays with you",
    "the effects are impressive but the story is hollow",
    "funny , fast and completely unpretentious",
    "a confused and confusing film with no sense of pace",
    "the cast clearly had fun , and so did i",
)

BUILTIN_PROMPTS = (
    "The server accepts requests from many clients and",
    "Once upon a time, in a small town by the sea,",
    "To be, or not to be, that is the question:",
    "The function returns a list of the items that",
    "In the morning the king called his council and said",
    "A model repository holds one folder per model, and",
    "She opened the letter, read the first line, and",
    "The quick brown fox jumps over the lazy dog because",
    "Return the number of bytes written to the stream;",
    "Friends, Romans, countrymen, lend me your ears;",
    "When the queue is full, new requests are refused and",
    "The night was dark and the wind howled over the hills as",
)


@dataclass(frozen=True)
class Texts:
    """Sentences to classify and prompts to continue, with where they came from."""

    sentences: list[str]
    prompts: list[str]
    source: str


def resolve_data_dir(data: Path | None) -> Path | None:
    """The data folder to read: `data` when given (it must exist), else the shared data if present."""
    if data is not None:
        if not data.is_dir():
            raise FileNotFoundError(f"--data {data}: no such folder")
        return data
    return DEFAULT_DATA if DEFAULT_DATA.is_dir() else None


def read_sst2(folder: Path) -> list[str]:
    """The sentences of SST-2's dev split (whole sentences; the train split is mostly phrases)."""
    path = folder / "sst2" / "dev.tsv"
    with path.open(newline="", encoding="utf-8") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [row["sentence"].strip() for row in rows if row.get("sentence", "").strip()]


def read_shakespeare_prompts(folder: Path, max_words: int = 24) -> list[str]:
    """One prompt per speech of tiny-shakespeare: its first lines, cut to about `max_words` words."""
    text = (folder / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    prompts = []
    for speech in text.split("\n\n"):
        words = speech.split()
        if len(words) >= 8:
            prompts.append(" ".join(words[:max_words]))
    return prompts


def load_texts(data: Path | None = None, count: int = 2000, seed: int = 0) -> Texts:
    """Up to `count` sentences and prompts, shuffled with `seed` so that every run sends the same texts."""
    folder = resolve_data_dir(data)
    sentences: list[str] = []
    prompts: list[str] = []
    sources = []
    if folder is not None and (folder / "sst2" / "dev.tsv").is_file():
        sentences = read_sst2(folder)
        sources.append(f"SST-2 dev sentences ({folder / 'sst2' / 'dev.tsv'})")
    if folder is not None and (folder / "tinyshakespeare" / "input.txt").is_file():
        prompts = read_shakespeare_prompts(folder)
        sources.append(f"tiny-shakespeare prompts ({folder / 'tinyshakespeare' / 'input.txt'})")
    if not sentences:
        sentences = list(BUILTIN_SENTENCES)
        sources.append("built-in sentences")
    if not prompts:
        prompts = list(BUILTIN_PROMPTS)
        sources.append("built-in prompts")
    rng = random.Random(seed)
    rng.shuffle(sentences)
    rng.shuffle(prompts)
    logger.info("texts: %s", "; ".join(sources))
    return Texts(sentences=sentences[:count], prompts=prompts[:count], source="; ".join(sources))


def long_texts(sentences: Sequence[str], min_words: int = 160) -> list[str]:
    """Texts of at least `min_words` words, made of consecutive sentences: a classifier truncates them to its
    maximum sequence length, so every text has that many tokens (the GPU runs measure at sequence length 128)."""
    texts, current = [], []
    for sentence in sentences:
        current.append(sentence)
        if sum(len(s.split()) for s in current) >= min_words:
            texts.append(" ".join(current))
            current = []
    return texts or [" ".join(sentences)]
