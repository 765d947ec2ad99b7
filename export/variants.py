"""Optional variants of the fp32 graph, each verified against PyTorch with bounds suited to it:
- `opt`: onnxruntime.transformers fusions (attention, layer norm, GELU...), fp32;
- `fp16`: the fused graph in float16 (for GPUs; logits and embedding stay float32);
- `int8`: dynamic int8 quantization of the unfused graph (for CPUs).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from torch import nn

from export.errors import ExportError, VerificationError
from export.verify import check, check_embedding, classifier_parity, embedder_parity, generator_parity

logger = logging.getLogger(__name__)

VARIANTS = ("opt", "fp16", "int8")

# Bounds against PyTorch fp32. Fusions only reorder float arithmetic: an absolute bound on the logits (and
# embedding). fp16 rounds every activation to 11 significant bits and int8 every weight to 256 levels per
# tensor, so their bounds are relative to the largest output magnitude. int8's errors reach a third of it in
# MiniLM fine-tuned on SST-2 (which loses half a point of accuracy), so its logits bound only catches a broken
# graph; what holds it is the held-out figure below.
BOUNDS = {"opt": 1e-3, "fp16": 0.02, "int8": 1.0}
RELATIVE = {"opt": False, "fp16": True, "int8": True}
# The least fraction of greedy steps on which the generator variant picks PyTorch's token. Only the fused
# fp32 graph is held to it: rounding may flip near-ties, the more so in untrained models whose logits are
# nearly flat, so fp16 and int8 report their agreement without a bound.
GENERATOR_AGREEMENT = {"opt": 0.95, "fp16": 0.0, "int8": 0.0}
# Embedders: the least cosine similarity of a row of the padded parity batch with PyTorch's vector, which is
# what a nearest-neighbour search sees. all-MiniLM-L6-v2 measures 1 - 1e-7 (fp32, opt), 0.999999 (fp16 on the
# CPU provider) and 0.977 (int8, per-channel; 0.92 per-tensor): the int8 bound leaves room for other models
# and catches a broken graph, whose vectors are unrelated (cosine near 0).
EMBEDDER_COSINE = {"fp32": 0.9999, "opt": 0.9999, "fp16": 0.999, "int8": 0.95}


def check_accuracy_delta(variant: str, delta: float, examples: int) -> None:
    """A variant may cost at most 3 points of held-out accuracy (or 3 examples, on small held-out sets)."""
    allowed = max(0.03, 3 / max(1, examples))
    if delta < -allowed - 1e-9:  # k/n - m/n is not exact in binary: exactly 3 examples must pass
        raise VerificationError(
            f"classifier {variant}: held-out accuracy falls by {-delta:.3f} (at most {allowed:.3f} allowed)"
        )


def check_val_loss_delta(variant: str, delta: float | None, val_loss: float) -> None:
    """A generator variant may raise the validation loss by at most 2% (0.05 nats at least)."""
    allowed = max(0.05, 0.02 * val_loss)
    if delta is not None and (not np.isfinite(delta) or delta > allowed):
        raise VerificationError(
            f"generator {variant}: validation loss rises by {delta:.3f} (at most {allowed:.3f} allowed)"
        )


@dataclass(frozen=True)
class Spec:
    kind: str  # "classifier" | "embedder" | "token_classifier" | "generator"
    model_type: str  # "bert" | "gpt2" (the transformers model_type)
    num_heads: int
    hidden_size: int


def _optimize(spec: Spec, source: Path) -> Any:
    from onnxruntime.transformers.optimizer import optimize_model

    # The ORT optimizer knows BERT-family encoders as "bert" and GPT-2 as "gpt2".
    model_type = "gpt2" if spec.model_type == "gpt2" else "bert"
    # Its modules log every fusion at INFO on loggers of their own (fusion_base, onnx_model_bert...).
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("fusion_", "onnx_model", "float16")):
            logging.getLogger(name).setLevel(logging.WARNING)
    model = optimize_model(
        str(source), model_type=model_type, num_heads=spec.num_heads, hidden_size=spec.hidden_size, opt_level=1,
        use_gpu=False, only_onnxruntime=False,
    )
    logger.info("fusions: %s", model.get_fused_operator_statistics())
    return model


def _quantize(fp32: Path, out: Path, per_channel: bool = False, contrib_ops: bool = False) -> None:
    """Dynamic int8 quantization of the unfused graph: the quantizer knows MatMul and Gather, not the fused
    contrib operators. `per_channel`: a scale per output column instead of per tensor (embedders: it lifts
    MiniLM's least cosine with fp32 from 0.92 to 0.97 for 0.5% more bytes). `contrib_ops`: the graph has
    com.microsoft operators (GroupQueryAttention), whose outputs ONNX's shape inference cannot type: float32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(fp32))
    if contrib_ops:
        _untie_gemm_weights(model)
    # The dynamo exporter records intermediate shapes from the example inputs (a batch of 2, say); the
    # quantizer's shape inference then finds them at odds with the dynamic axes. It infers its own.
    del model.graph.value_info[:]
    unannotated = out.with_name(out.name + ".source.onnx")
    onnx.save(model, str(unannotated))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process goes to the root logger
    try:
        extra = {"op_types_to_quantize": ["MatMul"],
                 "extra_options": {"DefaultTensorType": onnx.TensorProto.FLOAT}} if contrib_ops else {}
        quantize_dynamic(str(unannotated), str(out), weight_type=QuantType.QInt8, per_channel=per_channel, **extra)
    finally:
        root.setLevel(level)
        unannotated.unlink(missing_ok=True)


def _untie_gemm_weights(model: Any) -> None:
    """A Gemm weight that another node also reads (a tied head: GPT-2's token embedding, gathered at the input)
    becomes a copy of its own: the quantizer rewrites a Gemm as a MatMul and transposes its weight in place,
    which would break the other reader."""
    from onnx import numpy_helper

    weights = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "Gemm" or node.input[1] not in weights:
            continue
        if sum(node.input[1] in other.input for other in model.graph.node) > 1:
            copy = numpy_helper.from_array(numpy_helper.to_array(weights[node.input[1]]), f"{node.name}/weight")
            model.graph.initializer.append(copy)
            node.input[1] = copy.name


def produce(
    variant: str, spec: Spec, fp32: Path, out: Path, fusable: Path | None = None, written_fused: bool = False
) -> dict[str, Any]:
    """Writes `out` from the fp32 graph (`fusable`, when given, is the graph to fuse for opt and fp16); returns
    facts about it (the fused operators). `written_fused`: the graph was written with the fused operators
    already (export/gpt2_shared_buffer.py), which the optimizer's pattern matching does not take: no opt
    variant, and fp16 converts it as it is."""
    try:
        if variant == "int8":
            per_channel = spec.kind == "embedder"
            _quantize(fp32, out, per_channel, contrib_ops=written_fused)
            return {"per_channel": True} if per_channel else {}
        if written_fused:
            if variant != "fp16":
                raise ExportError(f"the {variant} variant: this graph is written with its fused operators already")
            from onnxruntime.transformers.onnx_model import OnnxModel

            model = OnnxModel(onnx.load(str(fp32)))
            model.convert_float_to_float16(keep_io_types=["logits"])
            model.save_model_to_file(str(out))
            return {}
        model = _optimize(spec, fusable or fp32)
        fused = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
        if variant == "fp16":
            keep = [o.name for o in model.model.graph.output if o.name in ("logits", "embedding")]
            model.convert_float_to_float16(keep_io_types=keep)
        model.save_model_to_file(str(out))
        return {"fused": fused}
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"producing the {variant} variant failed: {str(exc).splitlines()[0]}") from exc


def _providers(variant: str) -> list[str] | None:
    """fp16 is for GPUs: verified on CUDA when there is one, on the CPU provider otherwise."""
    if variant == "fp16" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return None


def verify_classifier(
    variant: str, model: nn.Module, path: Path, batch: dict[str, np.ndarray], outputs: list[str],
    what: str = "classifier",
) -> dict[str, Any]:
    """Also the token classifier's (`what`): the same bounds on its per-token logits."""
    providers = _providers(variant)
    relative = RELATIVE[variant]
    diffs, provider = classifier_parity(model, path, batch, outputs, providers, relative=relative)
    check(diffs, BOUNDS[variant], f"{what} {variant} on {provider}", " relative" if relative else "")
    absolute, _ = classifier_parity(model, path, batch, outputs, providers) if relative else (diffs, provider)
    figures = {"max_abs_diff": max(absolute.values()), "bound": BOUNDS[variant], "verified_on": provider,
               "providers": providers}
    if relative:
        figures["max_rel_diff"] = max(diffs.values())
        figures["bound_kind"] = "relative"
    return figures


def verify_embedder(
    variant: str, model: nn.Module, path: Path, batch: dict[str, np.ndarray]
) -> dict[str, Any]:
    providers = _providers(variant)
    agreement, _, provider = embedder_parity(model, path, batch, providers)
    check_embedding(agreement, EMBEDDER_COSINE[variant], f"embedder {variant} on {provider}")
    return {**agreement, "bound": EMBEDDER_COSINE[variant], "bound_kind": "cosine", "verified_on": provider,
            "providers": providers}


def verify_generator(
    variant: str, model: nn.Module, path: Path, prompts: list[list[int]], new_tokens: int, pad_id: int
) -> dict[str, Any]:
    providers = _providers(variant)
    result = generator_parity(model, path, prompts, new_tokens=new_tokens, pad_id=pad_id, providers=providers)
    return {**check_generator(variant, result), "providers": providers}


def check_generator(variant: str, result: dict[str, Any]) -> dict[str, Any]:
    """A generator variant's parity figures (`max_abs_diff`, `max_rel_diff`, `token_agreement`, `provider`)
    against the variant's bounds: VerificationError when out of them, else the figures to record."""
    bound, agreement = BOUNDS[variant], GENERATOR_AGREEMENT[variant]
    measured = result["max_rel_diff" if RELATIVE[variant] else "max_abs_diff"]
    if not np.isfinite(measured) or measured > bound or result["token_agreement"] < agreement:
        kind = " relative" if RELATIVE[variant] else ""
        raise VerificationError(
            f"generator {variant} on {result['provider']}: logits differ by {measured:.3g}{kind} (bound {bound:g}), "
            f"greedy tokens agree on {result['token_agreement']:.0%} of steps (at least {agreement:.0%} wanted)"
        )
    figures = {
        "max_abs_diff": result["max_abs_diff"], "bound": bound, "token_agreement": result["token_agreement"],
        "verified_on": result["provider"],
    }
    if RELATIVE[variant]:
        figures.update(max_rel_diff=result["max_rel_diff"], bound_kind="relative")
    return figures
