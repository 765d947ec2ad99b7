"""Parity checks of every exported graph against PyTorch. They fail loudly: a VerificationError stops the
export and nothing is written."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from export.errors import VerificationError
from export.tokenization import left_padded

logger = logging.getLogger(__name__)


def session(path: Path, providers: list[str] | None = None) -> ort.InferenceSession:
    """A session on the given providers (the CPU's by default). A provider that cannot start (CUDA listed by
    onnxruntime-gpu on a machine without the CUDA libraries) falls back to the CPU quietly; callers read
    `get_providers()` to know where the check ran."""
    ort.set_default_logger_severity(4)  # a CUDA provider that cannot load is not an error here: see above
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = torch.get_num_threads()  # as many as PyTorch uses (1 for the quick demo)
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def _float_type(sess: ort.InferenceSession, name: str) -> type:
    kind = next(i.type for i in sess.get_inputs() if i.name == name)
    return np.float16 if "float16" in kind else np.float32


@torch.inference_mode()
def classifier_parity(
    model: nn.Module,
    path: Path,
    inputs: dict[str, np.ndarray],
    outputs: list[str],
    providers: list[str] | None = None,
    *,
    relative: bool = False,
) -> tuple[dict[str, float], str]:
    """Max abs difference of each output between ONNX Runtime and PyTorch on one padded batch (divided by the
    output's largest magnitude when `relative`), and the execution provider that ran the graph."""
    model.eval()
    sess = session(path, providers)
    names = [i.name for i in sess.get_inputs()]
    onnx_out = sess.run(outputs, {name: inputs[name] for name in names})
    torch_out = model(*(torch.from_numpy(inputs[name]) for name in names))
    if isinstance(torch_out, torch.Tensor):  # one output (a token classifier's logits)
        torch_out = (torch_out,)
    diffs = {}
    for name, got, want in zip(outputs, onnx_out, torch_out):
        want_np = want.float().numpy()
        diffs[name] = float(np.abs(got.astype(np.float32) - want_np).max())
        if relative:
            # Relative to the largest magnitude, but never to one below 1: a chance-level model's logits are all
            # near 0 (the quick demo's), and a relative bound on them measures rounding noise, not the graph.
            diffs[name] /= max(float(np.abs(want_np).max()), 1.0)
    return diffs, sess.get_providers()[0]


def check(diffs: dict[str, float], bound: float, what: str, kind: str = "") -> None:
    worst = max(diffs.values())
    if not np.isfinite(worst) or worst > bound:
        shown = ", ".join(f"{name} {value:.3g}" for name, value in diffs.items())
        raise VerificationError(
            f"{what}: ONNX Runtime differs from PyTorch by {worst:.3g}{kind} (bound {bound:g}; {shown})"
        )
    logger.info("%s: max abs diff %.3g (bound %g)", what, worst, bound)


@torch.inference_mode()
def embedder_parity(
    model: nn.Module, path: Path, inputs: dict[str, np.ndarray], providers: list[str] | None = None
) -> tuple[dict[str, float], np.ndarray, str]:
    """An embedder's `embedding` from ONNX Runtime against PyTorch on one padded batch: the agreement
    figures (see `embedding_agreement`), the ONNX vectors, and the provider that ran the graph."""
    model.eval()
    sess = session(path, providers)
    names = [i.name for i in sess.get_inputs()]
    got = sess.run(["embedding"], {name: inputs[name] for name in names})[0].astype(np.float32)
    want = model(*(torch.from_numpy(inputs[name]) for name in names)).float().numpy()
    return embedding_agreement(got, want), got, sess.get_providers()[0]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of a with the same row of b."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return (a * b).sum(axis=1) / norms


def embedding_agreement(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    """The least cosine similarity of a row with its reference row (what a nearest-neighbour search sees),
    the max abs difference, and that difference relative to the largest magnitude (at least 1, as in
    classifier_parity: it also catches a vector of the right direction and the wrong length)."""
    if got.shape != want.shape:
        raise VerificationError(f"embedding shape {got.shape} differs from the reference's {want.shape}")
    diff = float(np.abs(got - want).max())
    return {"min_cosine": float(cosine_rows(got, want).min()), "max_abs_diff": diff,
            "max_rel_diff": diff / max(float(np.abs(want).max()), 1.0)}


def check_embedding(agreement: dict[str, float], cosine: float, what: str, relative: float | None = None) -> None:
    """At least `cosine` on every row and, when given, at most `relative` difference."""
    low, rel = agreement["min_cosine"], agreement["max_rel_diff"]
    if not np.isfinite(low) or low < cosine or (relative is not None and not rel <= relative):
        shown = f"; relative diff {rel:.3g} (bound {relative:g})" if relative is not None else ""
        raise VerificationError(f"{what}: least cosine similarity {low:.6f} (bound {cosine:g}){shown}")
    logger.info("%s: least cosine %.7f (bound %g), max abs diff %.3g", what, low, cosine, agreement["max_abs_diff"])


def onnx_classify(
    path: Path, encode: Any, texts: list[str], batch_size: int = 64, providers: list[str] | None = None
) -> np.ndarray:
    """Logits from the ONNX graph; `encode(texts)` gives the padded inputs."""
    sess = session(path, providers)
    names = [i.name for i in sess.get_inputs()]
    result = []
    for start in range(0, len(texts), batch_size):
        inputs = encode(texts[start:start + batch_size])
        result.append(sess.run(["logits"], {name: inputs[name] for name in names})[0].astype(np.float32))
    return np.concatenate(result)


@torch.inference_mode()
def generator_parity(
    model: nn.Module,
    path: Path,
    prompts: list[list[int]],
    *,
    new_tokens: int,
    pad_id: int,
    providers: list[str] | None = None,
) -> dict[str, Any]:
    """Greedy generation through the ONNX KV-cache graph against PyTorch recomputing the full sequence at every
    step. PyTorch's token is fed to both at every step (so that one early disagreement does not hide the rest);
    returns the largest logits difference over the prefill (real positions) and every step (also relative to
    the largest logit), and the fraction of steps whose ONNX greedy token equals PyTorch's: 1.0 means that
    greedy generation through the graph is token-identical to PyTorch's."""
    model.eval()
    sess = session(path, providers)
    layers, heads = model.config.n_layer, model.config.n_head
    head_size = model.config.n_embd // heads
    dtype = _float_type(sess, "past_key_values.0.key")
    batch = left_padded(prompts, pad_id)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    n = len(prompts)
    # The prefill asks for the logits of every position (all are compared), a step for its one new position.
    feed: dict[str, np.ndarray] = dict(batch)
    for i in range(layers):
        for kind in ("key", "value"):
            feed[f"past_key_values.{i}.{kind}"] = np.zeros((n, heads, 0, head_size), dtype=dtype)
    output_names = [o.name for o in sess.get_outputs()]
    worst = 0.0
    scale = 0.0
    matches = 0
    full_ids, full_mask = ids, mask
    generated: list[list[int]] = [[] for _ in range(n)]
    for step in range(new_tokens + 1):
        results = dict(zip(output_names, sess.run(output_names, feed)))
        onnx_logits = results["logits"].astype(np.float32)
        full_positions = np.clip(np.cumsum(full_mask, axis=1) - 1, 0, None)
        torch_logits = model(
            input_ids=torch.from_numpy(full_ids), attention_mask=torch.from_numpy(full_mask),
            position_ids=torch.from_numpy(full_positions),
        ).logits.float().numpy()
        if step == 0:  # the prefill: compare every real position
            real = mask.astype(bool)
            worst = max(worst, float(np.abs(onnx_logits[real] - torch_logits[real]).max()))
            scale = max(scale, float(np.abs(torch_logits[real]).max()))
        else:
            worst = max(worst, float(np.abs(onnx_logits[:, -1] - torch_logits[:, -1]).max()))
            scale = max(scale, float(np.abs(torch_logits[:, -1]).max()))
        if step == new_tokens:
            break
        want = torch_logits[:, -1].argmax(axis=-1)
        matches += int((onnx_logits[:, -1].argmax(axis=-1) == want).sum())
        for row in range(n):
            generated[row].append(int(want[row]))
        token = want.astype(np.int64)[:, None]
        full_ids = np.concatenate([full_ids, token], axis=1)
        full_mask = np.concatenate([full_mask, np.ones((n, 1), dtype=np.int64)], axis=1)
        feed = {
            "input_ids": token,
            "attention_mask": full_mask,
            "position_ids": full_positions[:, -1:] + 1,
            "logits_positions": np.zeros(1, dtype=np.int64),
        }
        for i in range(layers):
            for kind in ("key", "value"):
                feed[f"past_key_values.{i}.{kind}"] = results[f"present.{i}.{kind}"]
    return {
        "max_abs_diff": worst,
        "max_rel_diff": worst / max(scale, 1.0),  # as classifier_parity: a scale of at least 1
        "token_agreement": matches / max(1, n * new_tokens),
        "batch": n,
        "new_tokens": new_tokens,
        "generated": generated,
        "provider": sess.get_providers()[0],
    }
