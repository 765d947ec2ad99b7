"""Llama-family decoders (Llama, Qwen2, Mistral, SmolLM): import a local checkpoint or a GGUF file, convert it
with the onnxruntime-genai model builder, verify the graph against PyTorch, write a repository folder.

The builder writes a GroupQueryAttention decoder whose past and present key/value tensors can share one
preallocated buffer (docs/model-repository.md, "shared-buffer decoders"): the contract the server's slot cache
is built on. Verification drives the graph through the server's own generator code, so what is checked is
what will be served.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from export.errors import ExportError, VerificationError, check_checkpoint_folder, checkpoint_load_error
from export.repository import GENERATOR_BATCHING, provenance, write_json

logger = logging.getLogger(__name__)

SUPPORTED = ("llama", "qwen2", "mistral")
FORMAT_VERSION = 2
VARIANT_FILES = {"fp32": "model.onnx", "int4": "model.int4.onnx", "fp16": "model.fp16.onnx"}
PRECISIONS = {"fp32": "fp32", "int4": "int4", "fp16": "fp16"}
# The builder's target per variant: for the CPU it writes fp16 with MultiHeadAttention and position ids (not
# the shared-buffer contract); for CUDA with GroupQueryAttention, which ONNX Runtime's CPU provider also runs,
# so the fp16 variant is verified here even though it is meant for GPUs.
TARGETS = {"fp32": "cpu", "int4": "cpu", "fp16": "cuda"}
# fp32 against PyTorch fp32: logits at every step, and every greedy token. The bound is on the largest difference
# relative to the largest logit of that step (at least 1, as the embedder's): a 30-layer model's logits reach
# 20-30, and the same fp32 arithmetic summed in another order differs by 1.1e-4 absolute on one CPU (SmolLM2,
# AVX-512) and less than 1e-4 on another (AVX2), about 5e-6 relative on both.
PARITY_BOUND = 1e-4
# Weight-only int4 and fp16 change the numbers by design: their gate is greedy agreement with PyTorch (its own
# greedy tokens fed back, so one early difference does not decide the rest) and perplexity on held-out text.
MIN_AGREEMENT = {"int4": 0.5, "fp16": 0.9}
MAX_PERPLEXITY_RATIO = {"int4": 1.25, "fp16": 1.02}
# The mixed-step graph (mixed_step.py) against the plain one, both run by ONNX Runtime on the same inputs: the
# same kernels on the same rows, so equal in practice (0.0 on SmolLM2's fp32, int4 and fp16 files).
MIXED_STEP_BOUND = 1e-4
DEFAULT_CONTEXT = 2048  # the served context when the model allows more (the KV cache grows with it)
HELD_OUT = (
    "The river rises in the hills north of the town and runs south through farmland for forty miles before it "
    "reaches the sea. In spring the water is high and fast, and the old stone bridge has been closed twice in "
    "the last ten years. The town council has asked engineers to study whether a new bridge should be built "
    "upstream, where the valley is narrow and the banks are rock. Their report is expected next year. Most "
    "people who live here say they would miss the old bridge, which was built in 1820 and appears on the "
    "town's seal, but they agree that it cannot carry the traffic of today."
)
PROMPTS = (
    "What is the capital of France?",
    "The quick brown fox",
    "Write a short poem about the sea and the wind, in four lines:",
)


@dataclasses.dataclass
class LlmOptions:
    source: Path  # a checkpoint folder or a .gguf file
    name: str
    version: int = 1
    variants: tuple[str, ...] = ()  # of "int4", "fp16"
    default_variant: str = "fp32"
    context: int | None = None
    verify_tokens: int = 64
    command: list[str] | None = None
    description: str | None = None


def is_llm_source(path: Path) -> bool:
    """A .gguf file, or a checkpoint folder whose model_type is not gpt2 (the GPT-2 path stays as it was)."""
    if path.suffix.lower() == ".gguf":
        return True
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return False
    return model_type != "gpt2"


# -- sources --------------------------------------------------------------------------------------------------


def gguf_facts(path: Path) -> tuple[str, set[str]]:
    """The architecture and tensor types of a GGUF file, read from its header (no weights loaded)."""
    import gguf

    if not path.is_file():
        raise ExportError(f"GGUF file {path} does not exist")
    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
        types = {gguf.GGMLQuantizationType(t.tensor_type).name for t in reader.tensors}
    except (KeyError, ValueError, OSError, IndexError) as exc:
        raise ExportError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {str(exc)[:120]})") from None
    return arch, types


def _supported_gguf_types() -> set[str]:
    """transformers dequantizes GGUF tensors with gguf's own numpy kernels: the types those cover."""
    from gguf.quants import _type_traits  # the registry of gguf's dequantizers

    return {"F32", "F16"} | {t.name for t in _type_traits}


def checkpoint_from_gguf(path: Path, work: Path) -> Path:
    """Loads a GGUF file with transformers (dequantized to fp32) and saves it as a plain checkpoint folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch, types = gguf_facts(path)
    if arch not in SUPPORTED:
        raise ExportError(f"{path.name}: GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED)})")
    supported_types = _supported_gguf_types()
    unsupported = sorted(types - supported_types)
    if unsupported:
        raise ExportError(
            f"{path.name}: GGUF tensor type {', '.join(unsupported)} is not supported "
            f"(supported: {', '.join(sorted(supported_types))})"
        )
    t0 = time.monotonic()
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:  # noqa: BLE001 (transformers raises ValueError, KeyError, OSError... for bad files)
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"cannot load GGUF file {path}: {first}") from None
    # save_pretrained refuses a GGUF-loaded model; the same weights in a fresh model of the same class save.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    folder = work / "checkpoint"
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    logger.info("GGUF %s (%s; %s) dequantized to a checkpoint in %.1f s", path.name, arch, ", ".join(sorted(types)),
                time.monotonic() - t0)
    return folder


def check_checkpoint(folder: Path) -> dict[str, Any]:
    check_checkpoint_folder(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read {folder / 'config.json'}: {exc}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in SUPPORTED:
        raise ExportError(
            f"checkpoint folder {folder} holds a {model_type!r} model; supported: gpt2, {', '.join(SUPPORTED)}"
        )
    if not (folder / "tokenizer.json").is_file():
        raise ExportError(f"checkpoint folder {folder} has no tokenizer.json (a fast tokenizer is needed)")
    return config


# -- conversion -----------------------------------------------------------------------------------------------


def run_builder(checkpoint: Path, out: Path, precision: str, filename: str, work: Path) -> None:
    """The onnxruntime-genai model builder, in a child process (its progress output goes to a log file)."""
    log_path = work / f"builder-{precision}.log"
    command = [
        sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out),
        "-p", PRECISIONS[precision], "-e", TARGETS[precision], "-c", str(work / "cache"),
        # The language-model head runs on the last position only during a prefill (the server reads no other).
        "--extra_options", "prune_lm_head=true", f"filename={filename}",
    ]
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
        raise ExportError(f"the onnxruntime-genai builder failed ({precision}): {lines[-1][:300] if lines else '?'}")
    logger.info("onnxruntime-genai builder: %s %s in %.1f s", precision, filename, time.monotonic() - t0)


def write_mixed_steps(version_dir: Path, files: dict[str, str], arch: dict[str, Any]) -> dict[str, Any]:
    """Writes each variant's mixed-step graph beside it (mixed_step.py) and checks it against the variant's own
    graph; returns {variant: {"file", "max_rel_diff"}}, without the variants whose layout the transform
    refuses (logged: the server prefills their prompts in calls of their own)."""
    import onnxruntime as ort

    from export import mixed_step

    written: dict[str, Any] = {}
    for variant, filename in files.items():
        try:
            path = mixed_step.write(version_dir / filename)
        except mixed_step.UnsupportedGraph as exc:
            logger.warning("%s: no mixed-step graph (%s); the server prefills its prompts in calls of their own",
                           filename, exc)
            continue
        options = ort.SessionOptions()
        options.log_severity_level = 3
        plain = ort.InferenceSession(str(version_dir / filename), options, providers=["CPUExecutionProvider"])
        mixed = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        dtype = np.float16 if "float16" in plain.get_inputs()[2].type else np.float32
        diff = mixed_step.check(plain, mixed, int(arch["num_layers"]), int(arch["num_kv_heads"]),
                                int(arch["head_size"]), dtype)
        if diff > MIXED_STEP_BOUND:
            path.unlink()
            raise VerificationError(f"{path.name}: logits or cache differ from {filename}'s by {diff:.3g} relative "
                                    f"(at most {MIXED_STEP_BOUND})")
        written[variant] = {"file": path.name, "max_rel_diff": diff}
        logger.info("%s: mixed-step graph %s, %.3g relative from the plain graph", filename, path.name, diff)
    return written


# -- verification ---------------------------------------------------------------------------------------------


def served_model(version_dir: Path, config: dict[str, Any], filename: str, slots: int = 4) -> Any:
    """The server's own generator over `filename`, as it would serve it (CPU provider)."""
    from server.config import Device
    from server.generation.model import SharedBufferGenerator
    from server.repository import ModelConfig
    from server.runtime import Session

    model_config = ModelConfig(
        name=config["name"], version=1, kind="generator", path=version_dir,
        max_sequence_length=config["max_sequence_length"], special_tokens=config["special_tokens"],
        architecture=config["architecture"], onnx_inputs=tuple(config["onnx"]["inputs"]),
        onnx_outputs=tuple(config["onnx"]["outputs"]), variants=config["onnx"]["variants"], batching={},
        generation=config["generation"], kv_cache="shared_buffer",
    )
    session = Session(version_dir / filename, Device.CPU)
    return SharedBufferGenerator(model_config, session, slots)


def _reference_logits(model: Any, ids: list[int]) -> np.ndarray:
    """PyTorch recomputing the whole sequence: the last position's logits, float64."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
    return out.double().numpy()


def parity(model: Any, served: Any, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """Greedy decoding of `prompts` together through the served graph; at every step its logits are compared
    with PyTorch recomputing each whole sequence (the largest difference, absolute and relative to the largest
    logit, at least 1), and its token with PyTorch's argmax."""
    logits, cache = served.prefill(prompts)
    sequences = [list(p) for p in prompts]
    worst, relative, agree, steps = 0.0, 0.0, 0, 0
    try:
        for step in range(new_tokens):
            tokens = []
            for row, seq in enumerate(sequences):
                ref = _reference_logits(model, seq)[: logits.shape[1]]
                diff = float(np.abs(logits[row].astype(np.float64) - ref).max())
                worst = max(worst, diff)
                relative = max(relative, diff / max(float(np.abs(ref).max()), 1.0))
                token = int(logits[row].argmax())
                agree += int(token == int(ref.argmax()))
                steps += 1
                seq.append(token)
                tokens.append(token)
            if step + 1 < new_tokens:
                logits, cache = served.decode(tokens, [len(s) - 1 for s in sequences], cache)
    finally:
        cache.release()
    return {"max_abs_diff": worst, "max_rel_diff": relative, "token_agreement": agree / steps, "new_tokens": new_tokens}


def fp32_parity(
    model: Any, served: Any, batches: dict[str, list[list[int]]], new_tokens: int, name: str
) -> dict[str, Any]:
    """`parity` for each labelled batch of prompts, held to PARITY_BOUND (relative) and every greedy token:
    VerificationError when out of it, else the figures config.json records."""
    figures: dict[str, Any] = {"new_tokens": new_tokens}
    for label, batch in batches.items():
        result = parity(model, served, batch, new_tokens)
        figures[label] = {"max_abs_diff": result["max_abs_diff"], "max_rel_diff": result["max_rel_diff"]}
        if result["max_rel_diff"] > PARITY_BOUND or result["token_agreement"] < 1.0:
            raise VerificationError(
                f"{name} fp32 ({label}): logits differ from PyTorch by {result['max_rel_diff']:.3g} relative "
                f"to the largest ({result['max_abs_diff']:.3g} absolute; bound {PARITY_BOUND:g}); greedy tokens "
                f"agree on {result['token_agreement']:.1%} (all wanted)"
            )
    for key in ("max_abs_diff", "max_rel_diff"):
        figures[key] = max(figures[label][key] for label in batches)
    figures.update(bound=PARITY_BOUND, bound_kind="relative", token_identical=True)
    return figures


def agreement(model: Any, served: Any, prompt: list[int], new_tokens: int) -> float:
    """Teacher-forced greedy agreement: PyTorch's greedy tokens are fed to the graph, and at each step the
    graph's argmax is compared with PyTorch's."""
    reference = list(prompt)
    for _ in range(new_tokens):
        reference.append(int(_reference_logits(model, reference).argmax()))
    logits, cache = served.prefill([prompt])
    agree = 0
    try:
        for i in range(new_tokens):
            agree += int(int(logits[0].argmax()) == reference[len(prompt) + i])
            if i + 1 < new_tokens:
                logits, cache = served.decode([reference[len(prompt) + i]], [len(prompt) + i], cache)
    finally:
        cache.release()
    return agree / new_tokens


def perplexity_onnx(served: Any, ids: list[int]) -> float:
    """Perplexity of `ids` (after the first) through the graph, one token at a time (its head sees the last
    position only)."""
    logits, cache = served.prefill([ids[:1]])
    total = 0.0
    try:
        for i in range(1, len(ids)):
            row = logits[0].astype(np.float64)
            total += float(np.log(np.exp(row - row.max()).sum()) + row.max() - row[ids[i]])
            if i + 1 < len(ids):
                logits, cache = served.decode([ids[i]], [i], cache)
    finally:
        cache.release()
    return math.exp(total / (len(ids) - 1))


def perplexity_torch(model: Any, ids: list[int]) -> float:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids]), use_cache=False)
    return math.exp(float(out.loss))


# -- the build ------------------------------------------------------------------------------------------------


def graph_names(graph: Any) -> tuple[list[str], list[str]]:
    return [i.name for i in graph.input], [o.name for o in graph.output]


def repository_config(
    opts: LlmOptions, context: int, graph: Any, variants: dict[str, str], default_variant: str, exporter: str,
    eos_ids: list[int], specials: dict[str, int | None], architecture: dict[str, Any],
) -> dict[str, Any]:
    """The config.json (format version 2) of a shared-buffer decoder, without its provenance and quality."""
    inputs, outputs = graph_names(graph)
    return {
        "format_version": FORMAT_VERSION, "name": opts.name, "version": opts.version, "kind": "generator",
        "labels": [], "max_sequence_length": context, "pooling": None,
        "special_tokens": {"unk": None, "cls": None, "sep": None, **specials, "eos": eos_ids[0] if eos_ids else None},
        "architecture": architecture,
        "onnx": {"kv_cache": "shared_buffer", "inputs": inputs, "outputs": outputs, "variants": variants,
                 "default_variant": default_variant, "exporter": exporter},
        "batching": dict(GENERATOR_BATCHING),
        "generation": {"default_max_new_tokens": 128, "max_new_tokens": min(1024, context - 1),
                       "eos_token_ids": eos_ids},
    }


def verification_prompts(tokenizer: Any, context: int, verify_tokens: int) -> tuple[list[list[int]], int]:
    """The three prompts and the number of greedy tokens, within the served context however short it is: prompts
    of at most a quarter of it, then the tokens."""
    prompt_ids = [tokenizer.encode(p).ids[: max(1, context // 4)] for p in PROMPTS]
    return prompt_ids, max(1, min(verify_tokens, context - max(len(p) for p in prompt_ids) - 1))


def _eos_ids(folder: Path, config: dict[str, Any]) -> list[int]:
    ids: list[int] = []
    sources = [config.get("eos_token_id")]
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        sources.insert(0, json.loads(gen_path.read_text()).get("eos_token_id"))
    for value in sources:
        for e in value if isinstance(value, list) else [value]:
            if isinstance(e, int) and e not in ids:
                ids.append(e)
    return ids


def _copy_tokenizer_files(checkpoint: Path, built: Path, version_dir: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                 "generation_config.json"):
        for folder in (built, checkpoint):
            if (folder / name).is_file():
                shutil.copyfile(folder / name, version_dir / name)
                break


def build(opts: LlmOptions, version_dir: Path) -> dict[str, Any]:
    import onnx
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    started = time.monotonic()
    figures: dict[str, Any] = {}
    version_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nlpserve-llm-") as tmp:
        work = Path(tmp)
        if opts.source.suffix.lower() == ".gguf":
            checkpoint = checkpoint_from_gguf(opts.source, work)
            source = f"{opts.source.name} (GGUF, dequantized to fp32 by transformers)"
        else:
            checkpoint = opts.source
            source = str(opts.source)
        hf = check_checkpoint(checkpoint)
        try:
            model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager")
        except Exception as exc:  # noqa: BLE001
            raise checkpoint_load_error(checkpoint, exc) from None
        model.eval()
        files = {"fp32": VARIANT_FILES["fp32"]}
        for variant in ("fp32", *opts.variants):
            out = work / f"built-{variant}"
            run_builder(checkpoint, out, variant, VARIANT_FILES[variant], work)
            for path in out.iterdir():
                if path.name.startswith(VARIANT_FILES[variant]) or (variant == "fp32" and path.name == "genai_config.json"):
                    shutil.move(str(path), version_dir / path.name)
            files[variant] = VARIANT_FILES[variant]
            if variant == "fp32":
                _copy_tokenizer_files(checkpoint, out, version_dir)

        cfg = model.config
        head_size = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        context = min(cfg.max_position_embeddings, opts.context or DEFAULT_CONTEXT)
        eos_ids = _eos_ids(checkpoint, hf)
        tokenizer = Tokenizer.from_file(str(version_dir / "tokenizer.json"))

        def token_id(name: str) -> int | None:
            value = getattr(cfg, f"{name}_token_id", None)
            return value[0] if isinstance(value, list) else value

        layers = cfg.num_hidden_layers
        graph = onnx.load(str(version_dir / files["fp32"]), load_external_data=False).graph
        inputs, outputs = graph_names(graph)
        expected = {"input_ids", "attention_mask", "logits"} | {
            f"{kind}.{i}.{kv}" for kind in ("past_key_values", "present") for i in range(layers) for kv in ("key", "value")
        }
        if set(inputs) | set(outputs) != expected:
            raise VerificationError(f"the builder's graph has inputs {inputs[:4]}... and outputs {outputs[:3]}..., "
                                    "not the shared-buffer decoder contract")
        config = repository_config(
            opts, context, graph, files, opts.default_variant if opts.default_variant in files else "fp32",
            "onnxruntime-genai model builder (GroupQueryAttention, prune_lm_head)", eos_ids,
            {"pad": token_id("pad"), "bos": token_id("bos")},
            {"model_type": cfg.model_type, "num_layers": layers, "num_heads": cfg.num_attention_heads,
             "num_kv_heads": cfg.num_key_value_heads, "head_size": head_size, "hidden_size": cfg.hidden_size,
             "vocab_size": cfg.vocab_size, "tokenizer_vocab_size": tokenizer.get_vocab_size(),
             "context_length": cfg.max_position_embeddings},
        )
        mixed = write_mixed_steps(version_dir, files, config["architecture"])
        if mixed:
            config["onnx"]["mixed_step"] = {variant: entry["file"] for variant, entry in mixed.items()}
        prompt_ids, new_tokens = verification_prompts(tokenizer, context, opts.verify_tokens)
        quality: dict[str, Any] = {}
        t0 = time.monotonic()
        served = served_model(version_dir, config, files["fp32"])
        fp32 = fp32_parity(model, served, {"batch1": prompt_ids[:1], "batch3": prompt_ids}, new_tokens, opts.name)
        quality["fp32"] = fp32
        held_out = tokenizer.encode(HELD_OUT).ids[: min(128, context)]
        reference_ppl = perplexity_torch(model, held_out)
        quality["fp32"]["perplexity"] = round(perplexity_onnx(served, held_out), 4)
        logger.info("%s fp32: max diff %.3g relative (%.3g absolute) over %d greedy tokens (batch 1 and 3), "
                    "identical; perplexity %.3f (PyTorch %.3f)", opts.name, fp32["max_rel_diff"], fp32["max_abs_diff"],
                    new_tokens, quality["fp32"]["perplexity"], reference_ppl)
        for variant in opts.variants:
            served_variant = served_model(version_dir, config, files[variant])
            agree = agreement(model, served_variant, prompt_ids[0], new_tokens)
            ppl = perplexity_onnx(served_variant, held_out)
            quality[variant] = {"token_agreement": round(agree, 4), "new_tokens": new_tokens,
                                "perplexity": round(ppl, 4), "perplexity_ratio": round(ppl / reference_ppl, 4),
                                "bound": {"token_agreement": MIN_AGREEMENT[variant],
                                          "perplexity_ratio": MAX_PERPLEXITY_RATIO[variant]}}
            logger.info("%s %s: greedy agreement %.1f%% over %d tokens, perplexity %.3f (PyTorch %.3f)", opts.name,
                        variant, 100 * agree, new_tokens, ppl, reference_ppl)
            if agree < MIN_AGREEMENT[variant] or ppl / reference_ppl > MAX_PERPLEXITY_RATIO[variant]:
                raise VerificationError(
                    f"{opts.name} {variant}: greedy agreement {agree:.1%} (at least {MIN_AGREEMENT[variant]:.0%}), "
                    f"perplexity {ppl:.3f} against PyTorch's {reference_ppl:.3f} (ratio at most "
                    f"{MAX_PERPLEXITY_RATIO[variant]})"
                )
        for variant, entry in mixed.items():
            quality[variant]["mixed_step_max_rel_diff"] = entry["max_rel_diff"]
        figures["verify_seconds"] = round(time.monotonic() - t0, 1)
        config["provenance"] = provenance(opts.description or source, "none", opts.command)
        config["quality"] = {"parity": quality, "eval": {"perplexity_torch": round(reference_ppl, 4),
                                                         "tokens": len(held_out), "text": "built-in paragraph"}}
        write_json(version_dir / "config.json", config)
    figures.update(parity=quality, eval={}, seconds=round(time.monotonic() - started, 1), path=str(version_dir))
    return figures


# -- ONNX folders written by other tools ----------------------------------------------------------------------


def genai_reference(folder: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """onnxruntime-genai's own greedy generation on the folder's graph, one prompt at a time."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    outputs = []
    for prompt in prompts:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(prompt)
        tokens: list[int] = []
        while not generator.is_done() and len(tokens) < new_tokens:
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        outputs.append(tokens)
    return outputs


def served_greedy(served: Any, prompts: list[list[int]], new_tokens: int, eos: set[int]) -> list[list[int]]:
    """The served graph's greedy tokens for `prompts` decoded together, each stopping after an EOS id."""
    logits, cache = served.prefill(prompts)
    outputs: list[list[int]] = [[] for _ in prompts]
    rows = list(range(len(prompts)))
    try:
        while rows:
            tokens = [int(t) for t in logits.argmax(-1)]
            keep = []
            for i, (row, token) in enumerate(zip(rows, tokens)):
                outputs[row].append(token)
                if token not in eos and len(outputs[row]) < new_tokens:
                    keep.append(i)
            cache = cache.select(keep)
            rows, tokens = [rows[i] for i in keep], [tokens[i] for i in keep]
            if rows:
                logits, cache = served.decode(tokens, [0] * len(rows), cache)
    finally:
        cache.release()
    return outputs


def import_onnx(folder: Path, opts: LlmOptions, version_dir: Path, checkpoint: Path | None = None) -> dict[str, Any]:
    """A decoder folder written by the onnxruntime-genai model builder (model file + genai_config.json +
    tokenizer files), served as it is: our config.json from theirs, the files copied, and greedy generation
    verified against PyTorch (`checkpoint` given) or the GenAI library's own generator on the same graph."""
    import onnx
    from tokenizers import Tokenizer

    started = time.monotonic()
    genai_path = folder / "genai_config.json"
    if not genai_path.is_file():
        raise ExportError(f"{folder} has no genai_config.json (an onnxruntime-genai model folder is expected; "
                          "Optimum's exporter does not install beside transformers 5)")
    try:
        genai = json.loads(genai_path.read_text())
        model_section, decoder = genai["model"], genai["model"]["decoder"]
        filename = decoder["filename"]
        layers, heads = int(decoder["num_hidden_layers"]), int(decoder["num_attention_heads"])
        kv_heads, head_size = int(decoder["num_key_value_heads"]), int(decoder["head_size"])
        names = {**decoder.get("inputs", {}), **decoder.get("outputs", {})}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"cannot read {genai_path}: {type(exc).__name__}: {exc}") from None
    wanted = {"input_ids": "input_ids", "attention_mask": "attention_mask", "logits": "logits",
              "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value",
              "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}
    odd = {k: v for k, v in names.items() if k in wanted and v != wanted[k]}
    extra = sorted(set(decoder.get("inputs", {})) - {"input_ids", "attention_mask", "past_key_names", "past_value_names"})
    if odd or extra:
        raise ExportError(f"{genai_path}: tensor names {odd or extra} differ from the shared-buffer decoder contract "
                          "(input_ids, attention_mask, past_key_values.N.key|value -> logits, present.N.key|value)")
    if not (folder / filename).is_file() or not (folder / "tokenizer.json").is_file():
        raise ExportError(f"{folder} lacks {filename} or tokenizer.json")
    graph = onnx.load(str(folder / filename), load_external_data=False).graph
    ops = {node.op_type for node in graph.node}
    if "GroupQueryAttention" not in ops:
        raise ExportError(f"{folder / filename} has no GroupQueryAttention: not a shared-buffer decoder")
    variant = "int4" if "MatMulNBits" in ops else "fp16" if "float16" in str(graph.input[-1].type) else "fp32"
    data_files = {init.external_data[i].value for init in graph.initializer for i in range(len(init.external_data))
                  if init.external_data[i].key == "location"}
    missing = sorted(name for name in data_files if not (folder / name).is_file())
    if missing:
        raise ExportError(f"{folder / filename} keeps its weights in {', '.join(missing)}, which is missing")
    version_dir.mkdir(parents=True, exist_ok=True)
    for name in {filename, *data_files}:
        shutil.copyfile(folder / name, version_dir / name)
    _copy_tokenizer_files(folder, folder, version_dir)
    shutil.copyfile(genai_path, version_dir / "genai_config.json")
    tokenizer = Tokenizer.from_file(str(version_dir / "tokenizer.json"))
    eos = model_section.get("eos_token_id")
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    context = min(int(model_section.get("context_length") or DEFAULT_CONTEXT), opts.context or DEFAULT_CONTEXT)
    config = repository_config(
        opts, context, graph, {variant: filename}, variant, f"imported from {folder} (onnxruntime-genai layout)",
        eos_ids, {"pad": model_section.get("pad_token_id"), "bos": model_section.get("bos_token_id")},
        {"model_type": model_section.get("type", "unknown"), "num_layers": layers, "num_heads": heads,
         "num_kv_heads": kv_heads, "head_size": head_size, "hidden_size": decoder.get("hidden_size"),
         "vocab_size": model_section.get("vocab_size"), "tokenizer_vocab_size": tokenizer.get_vocab_size(),
         "context_length": model_section.get("context_length")},
    )
    mixed = write_mixed_steps(version_dir, {variant: filename}, config["architecture"])
    if mixed:
        config["onnx"]["mixed_step"] = {variant: mixed[variant]["file"]}
    prompt_ids, new_tokens = verification_prompts(tokenizer, context, opts.verify_tokens)
    served = served_model(version_dir, config, filename)
    quality: dict[str, Any]
    if checkpoint is not None:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager").eval()
        result = parity(model, served, prompt_ids, new_tokens)
        quality = {"reference": f"PyTorch ({checkpoint})", **result}
        bad = result["token_agreement"] < 1.0 or (variant == "fp32" and result["max_rel_diff"] > PARITY_BOUND)
    else:
        reference = genai_reference(folder, prompt_ids, new_tokens)
        ours = served_greedy(served, prompt_ids, new_tokens, set(eos_ids))
        same = sum(a == b for r, o in zip(reference, ours) for a, b in zip(r, o))
        total = sum(max(len(r), len(o)) for r, o in zip(reference, ours))
        quality = {"reference": "onnxruntime-genai's generator on the same graph", "token_agreement": same / total,
                   "new_tokens": new_tokens}
        bad = reference != ours
    logger.info("%s: greedy agreement %.1f%% with %s over %d tokens", opts.name, 100 * quality["token_agreement"],
                quality["reference"], new_tokens)
    if bad:
        raise VerificationError(f"{opts.name}: greedy generation agrees with {quality['reference']} on "
                                f"{quality['token_agreement']:.1%} of the tokens (all wanted)")
    if mixed:
        quality["mixed_step_max_rel_diff"] = mixed[variant]["max_rel_diff"]
    config["provenance"] = provenance(str(folder), "none", opts.command)
    config["quality"] = {"parity": {variant: quality}, "eval": {}}
    write_json(version_dir / "config.json", config)
    return {"parity": {variant: quality}, "eval": {}, "seconds": round(time.monotonic() - started, 1)}
