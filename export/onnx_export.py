"""torch.onnx export (the dynamo exporter, which needs onnxscript) with the input and output names of the
repository format (Hugging Face Optimum / onnxruntime-genai conventions)."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from export.errors import ExportError
from export.repository import OPSET

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter prints its progress and many warnings about internals; they go to the debug log."""
    buffer = io.StringIO()
    # torch configures its loggers when it is imported, so their level is set here rather than by the CLI.
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buffer):
            warnings.simplefilter("ignore")
            yield
    finally:
        exporter_log.setLevel(level)
    if buffer.getvalue().strip():
        logger.debug("torch.onnx said:\n%s", buffer.getvalue())


def _reason(exc: Exception) -> str:
    """The line that says what went wrong: the exporter's "Exception summary" when it has one."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    if "## Exception summary" in lines:
        following = lines[lines.index("## Exception summary") + 1:]
        if following:
            return following[0]
    return lines[0] if lines else type(exc).__name__


def _name_outputs(program: torch.onnx.ONNXProgram, names: list[str]) -> None:
    """Names the graph outputs. Done here rather than with output_names=, which fails when an inner value
    already has the name (BERT's embedding lookup yields a value called `embedding`)."""
    graph = program.model.graph
    taken = {value.name: value for node in graph for value in node.outputs}
    taken.update({value.name: value for value in graph.inputs})
    for value, name in zip(graph.outputs, names):
        clash = taken.get(name)
        if clash is not None and clash is not value:
            clash.name = f"{name}_inner"
        value.name = name


def _save(program: torch.onnx.ONNXProgram, path: Path) -> None:
    # One self-contained file (no external data): the models here stay far below protobuf's 2 GB limit.
    program.save(str(path), external_data=False)


def _as_tuple(out: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def export_encoder(
    model: nn.Module, path: Path, inputs: dict[str, torch.Tensor], outputs: list[str], what: str = "encoder"
) -> None:
    """Exports any encoder graph: forward(input_ids, attention_mask[, token_type_ids]) returns a tensor or a
    tuple of tensors, of which the first len(outputs) are kept, named `outputs` (the classifier's `logits`
    [and `embedding`], the embedder's `embedding`, the token classifier's `logits`). Batch and sequence are
    dynamic axes of every input."""

    class Graph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
        ) -> tuple[torch.Tensor, ...]:
            return _as_tuple(self.model(input_ids, attention_mask, token_type_ids))[:len(outputs)]

    batch, sequence = Dim("batch"), Dim("sequence")
    names = list(inputs)
    args = tuple(inputs[name] for name in names)
    shapes = {name: {0: batch, 1: sequence} for name in names}
    try:
        with _quiet():
            program = torch.onnx.export(
                Graph().eval(), args, input_names=names, dynamic_shapes=shapes, dynamo=True, opset_version=OPSET,
                verbose=False,
            )
            _name_outputs(program, outputs)
    except Exception as exc:
        raise ExportError(f"ONNX export of the {what} failed: {_reason(exc)}") from exc
    _save(program, path)


def export_classifier(model: nn.Module, path: Path, inputs: dict[str, torch.Tensor], outputs: list[str]) -> None:
    """forward(...) -> (logits, embedding); `outputs` is `logits` and optionally `embedding`."""
    export_encoder(model, path, inputs, outputs, "classifier")


def export_encoder_for_fusion(
    model: nn.Module,
    path: Path,
    inputs: dict[str, torch.Tensor],
    outputs: list[str],
    what: str = "encoder",
    output_axes: dict[int, str] | None = None,
) -> None:
    """The same graph through the TorchScript exporter (dynamo=False), for the `opt` and `fp16` variants:
    onnxruntime.transformers' fusions recognise the attention and embedding patterns of this graph (with
    eager attention) and find only layer norms and GELUs in the dynamo exporter's. `output_axes` names the
    outputs' dynamic axes (default: batch only; a token classifier's logits also have a sequence axis)."""

    class Graph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return _as_tuple(self.model(*args))[:len(outputs)]

    names = list(inputs)
    axes: dict[str, dict[int, str]] = {name: {0: "batch", 1: "sequence"} for name in names}
    axes.update({name: dict(output_axes or {0: "batch"}) for name in outputs})
    try:
        with _quiet():
            torch.onnx.export(
                Graph().eval(), tuple(inputs[name] for name in names), str(path), input_names=names,
                output_names=outputs, dynamic_axes=axes, dynamo=False, opset_version=OPSET,
            )
    except Exception as exc:
        raise ExportError(f"ONNX export of the {what} (for fusion) failed: {_reason(exc)}") from exc


def export_classifier_for_fusion(
    model: nn.Module, path: Path, inputs: dict[str, torch.Tensor], outputs: list[str]
) -> None:
    export_encoder_for_fusion(model, path, inputs, outputs, "classifier")


class DecoderGraph(nn.Module):
    """GPT-2 with its KV cache as flat tensors: (input_ids, attention_mask, position_ids, logits_positions,
    past...) -> (logits, present...). transformers 5 accepts only Cache objects, so the flat past is wrapped into
    a DynamicCache here, inside the traced function.

    `logits_positions` (int64, 1-D) names the sequence positions whose logits the graph computes: a server
    feeds the last one only, and the language-model head (a 768 x 50,257 matrix on GPT-2) then runs on one
    position per row instead of the whole prompt (a quarter of a GPT-2-small prefill on the CPU, and a logits
    array of batch x prompt x vocabulary floats that is never made); verification feeds every position."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_layers = model.config.n_layer

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
        logits_positions: torch.Tensor, *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for layer in range(self.num_layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=cache, use_cache=True, logits_to_keep=logits_positions,
        )
        present: list[torch.Tensor] = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def generator_names(num_layers: int) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "attention_mask", "position_ids", "logits_positions"]
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def export_generator(model: nn.Module, path: Path) -> None:
    """Exports one decoder graph that does both prefill (fed an empty past) and decode steps."""
    config = model.config
    layers, heads = config.n_layer, config.n_head
    head_size = config.n_embd // heads
    # Sizes of 2 and more everywhere: torch.export specialises dimensions that are 0 or 1 in the example.
    b, s, p = 2, 3, 4
    ids = torch.randint(0, config.vocab_size, (b, s))
    mask = torch.ones(b, p + s, dtype=torch.long)
    positions = torch.arange(p, p + s).expand(b, s)
    keep = torch.arange(s - 2, s)  # two positions: a size of 1 would be specialised too
    past = tuple(torch.randn(b, heads, p, head_size) for _ in range(2 * layers))
    batch, sequence, past_sequence, total = Dim("batch"), Dim("sequence"), Dim("past_sequence"), Dim("total_sequence")
    shapes = (
        {0: batch, 1: sequence}, {0: batch, 1: total}, {0: batch, 1: sequence}, {0: Dim("kept_positions")},
        tuple({0: batch, 2: past_sequence} for _ in past),
    )
    input_names, output_names = generator_names(layers)
    try:
        with _quiet():
            program = torch.onnx.export(
                DecoderGraph(model).eval(), (ids, mask, positions, keep, *past), input_names=input_names,
                dynamic_shapes=shapes, dynamo=True, opset_version=OPSET, verbose=False,
            )
            _name_outputs(program, output_names)
    except Exception as exc:
        raise ExportError(f"ONNX export of the generator failed: {_reason(exc)}") from exc
    _save(program, path)
