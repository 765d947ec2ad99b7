"""`python -m export demo`: the demo model repository, built on any machine without data files or network.

- `sentiment`: the pretrained MiniLM-L6 encoder fine-tuned on the built-in sentiment set;
- `docgpt`: a small GPT trained on the docstrings of the Python standard library.

`--quick` builds tiny models with the same names, layout and config.json in seconds, for tests.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from export.build_classifier import ClassifierOptions
from export.build_classifier import build as build_classifier
from export.build_generator import GeneratorOptions
from export.build_generator import build as build_generator
from export.classifier import Pooling
from export.corpus import stdlib_docstrings
from export.data import LabelledData
from export.demo_data import QUICK_CORPUS, SENTIMENT
from export.repository import staged_output
from export.tokenization import EOS

logger = logging.getLogger(__name__)

CLASSIFIER_NAME = "sentiment"
GENERATOR_NAME = "docgpt"


def sentiment_data() -> LabelledData:
    names = sorted({label for _, label in SENTIMENT})
    return LabelledData(
        texts=[text for text, _ in SENTIMENT],
        labels=[names.index(label) for _, label in SENTIMENT],
        names=names,
        source=f"built-in sentiment set ({len(SENTIMENT)} sentences)",
    )


def quick_corpus() -> tuple[str, str]:
    return QUICK_CORPUS, "built-in multilingual sample (quick)"


def docstring_corpus() -> tuple[str, str]:
    documents = stdlib_docstrings()
    text = f"\n{EOS}\n".join(documents)
    return text, f"docstrings of the Python standard library ({len(documents)} docstrings, {len(text)} characters)"


def classifier_options(quick: bool, variants: tuple[str, ...], command: list[str] | None) -> ClassifierOptions:
    data = sentiment_data()
    if quick:
        return ClassifierOptions(
            name=CLASSIFIER_NAME, data=data, data_description=data.source, scratch=True, vocab_size=800, layers=2, heads=2, hidden=32,
            max_length=64, steps=30, batch_size=16, learning_rate=3e-3, pooling=Pooling.CLS, variants=variants,
            command=command,
        )
    return ClassifierOptions(
        name=CLASSIFIER_NAME, data=data, data_description=data.source, epochs=4, batch_size=16, learning_rate=8e-5, max_length=128,
        pooling=Pooling.CLS, variants=variants, command=command,
    )


def generator_options(quick: bool, variants: tuple[str, ...], command: list[str] | None) -> GeneratorOptions:
    if quick:
        corpus, description = quick_corpus()
        return GeneratorOptions(
            name=GENERATOR_NAME, corpus=corpus, corpus_description=description, layers=2, heads=2,
            width=32, context=128, vocab_size=400, steps=30, batch_size=8, learning_rate=3e-3, variants=variants,
            command=command,
        )
    corpus, description = docstring_corpus()
    return GeneratorOptions(
        name=GENERATOR_NAME, corpus=corpus, corpus_description=description, layers=4, heads=4, width=128, context=128, vocab_size=2048,
        steps=400, batch_size=16, learning_rate=3e-3, variants=variants, command=command,
    )


def build(out: Path, *, quick: bool, force: bool, variants: tuple[str, ...], command: list[str] | None = None
          ) -> dict[str, Any]:
    if quick:
        # Tiny matrices: a second thread only adds synchronisation, and on a busy machine (tests running in
        # parallel) OpenMP's spinning threads make every small operation many times slower.
        torch.set_num_threads(1)
    with staged_output(out, force) as stage:
        sentiment = build_classifier(classifier_options(quick, variants, command), stage / CLASSIFIER_NAME / "1")
        docgpt = build_generator(generator_options(quick, variants, command), stage / GENERATOR_NAME / "1")
    return {CLASSIFIER_NAME: sentiment, GENERATOR_NAME: docgpt}
