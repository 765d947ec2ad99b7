"""A GPT-2 decoder written as a shared-buffer graph: the contract of the onnxruntime-genai builder's Llama-family
graphs (docs/model-repository.md, "shared-buffer decoders"), which its builder does not write for GPT-2.

Inputs `input_ids` (batch, sequence) and `attention_mask` (batch, total); per layer `past_key_values.{i}.key|value`
(batch, heads, max_length, head_size), which the server binds to the same memory as `present.{i}.key|value`:
each layer's GroupQueryAttention (com.microsoft; as many key/value heads as query heads, no rotary) writes the new
tokens' keys and values in place, at each row's length, so nothing is concatenated or copied at a step (the
torch.onnx export of GPT-2 concatenates past and new into a fresh present at every step: 19% of the profiled kernel
time of a 16-row decode step of GPT-2-small on 2 CPU cores). Output `logits` (batch, 1, vocabulary): the last
position's only.

GPT-2 adds a learned position embedding, which the Llama-family graphs do not have (they rotate inside the
attention op). Its positions come from the mask, as the op's own lengths do: a row of `total` ones whose call
brings `sequence` tokens holds them at positions total - sequence ... total - 1. That is right for a row's
prompt (or a chunk of it) and for a decode step; a batch of right-padded prompts of different lengths in one call
is not (the server prefills one prompt per call).

Written node by node with onnx.helper from the PyTorch module's weights: no library writes this graph (the
builder has no GPT-2, torch.onnx has no in-place cache), and the export is verified against PyTorch like every
other (export/build_generator.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.errors import ExportError

OPSET = 18
MS = "com.microsoft"
IR_VERSION = 10  # what ONNX Runtime 1.31 reads (onnx 1.23 writes 14 by default)
# onnx.save refuses a single file past protobuf's 2 GB; larger models keep their weights beside the graph.
SINGLE_FILE_BYTES = 1 << 30
ACTIVATIONS = {"gelu_new": "FastGelu", "gelu_pytorch_tanh": "FastGelu", "gelu": "Gelu"}


def graph_names(num_layers: int) -> tuple[list[str], list[str]]:
    inputs, outputs = ["input_ids", "attention_mask"], ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def check_supported(config: Any) -> None:
    """GPT-2 options this graph does not carry raise ExportError."""
    if config.activation_function not in ACTIVATIONS:
        raise ExportError(f"activation {config.activation_function!r}: the shared-buffer graph knows "
                          f"{', '.join(ACTIVATIONS)}")
    unsupported = [name for name in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn")
                   if getattr(config, name, False)]
    if not getattr(config, "scale_attn_weights", True):
        unsupported.append("scale_attn_weights=False")
    if getattr(config, "add_cross_attention", False):
        unsupported.append("add_cross_attention")
    if unsupported:
        raise ExportError(f"GPT-2 options the shared-buffer graph does not carry: {', '.join(unsupported)}")


def write_gpt2(model: Any, path: Path) -> None:
    """The graph of `model` (a transformers GPT2LMHeadModel, float32) at `path`."""
    config = model.config
    check_supported(config)
    layers, heads, width = config.n_layer, config.n_head, config.n_embd
    head_size = width // heads
    weights = {name: value.detach().float().numpy() for name, value in model.state_dict().items()}
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []

    def weight(name: str) -> str:
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(weights[name]), name))
        return name

    def const(name: str, value: Any, dtype: Any = np.int64) -> str:
        initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(op: str, inputs: list[str], name: str, domain: str = "", outputs: int = 1, **attrs: Any) -> list[str]:
        names = [f"{name}/output_{k}" for k in range(outputs)]
        nodes.append(helper.make_node(op, inputs, names, name=name, domain=domain, **attrs))
        return names

    # Lengths and positions, from the mask (see the module's docstring).
    total = node("ReduceSum", ["attention_mask", const("axis_1", [1])], "/lengths/total", keepdims=1)[0]  # (B, 1)
    seqlens = node("Sub", [total, const("one", [1])], "/lengths/seqlens")[0]
    seqlens_k = node("Cast", [node("Squeeze", [seqlens, const("squeeze_1", [1])], "/lengths/squeeze")[0]],
                     "/lengths/seqlens_k", to=TensorProto.INT32)[0]
    mask_shape = node("Shape", ["attention_mask"], "/lengths/mask_shape")[0]
    width_i64 = node("Gather", [mask_shape, const("index_1", 1)], "/lengths/width", axis=0)[0]
    total_len = node("Cast", [width_i64], "/lengths/total_sequence_length", to=TensorProto.INT32)[0]
    ids_shape = node("Shape", ["input_ids"], "/positions/ids_shape")[0]
    new = node("Gather", [ids_shape, const("index_1b", 1)], "/positions/new", axis=0)[0]
    start = node("Sub", [total, new], "/positions/start")[0]  # (B, 1)
    steps = node("Range", [const("zero", 0), new, const("step", 1)], "/positions/range")[0]  # (S,)
    positions = node("Add", [start, steps], "/positions/ids")[0]  # (B, S)

    tokens = node("Gather", [weight("transformer.wte.weight"), "input_ids"], "/embed/tokens")[0]
    placed = node("Gather", [weight("transformer.wpe.weight"), positions], "/embed/positions")[0]
    hidden = node("Add", [tokens, placed], "/embed/add")[0]
    eps = float(config.layer_norm_epsilon)
    activation = ACTIVATIONS[config.activation_function]
    for i in range(layers):
        p = f"transformer.h.{i}"
        ln1 = node("LayerNormalization", [hidden, weight(f"{p}.ln_1.weight"), weight(f"{p}.ln_1.bias")],
                   f"/layers.{i}/ln_1", axis=-1, epsilon=eps)[0]
        qkv = node("MatMul", [ln1, weight(f"{p}.attn.c_attn.weight")], f"/layers.{i}/attn/qkv")[0]
        qkv = node("Add", [qkv, weight(f"{p}.attn.c_attn.bias")], f"/layers.{i}/attn/qkv_bias")[0]
        attn, present_k, present_v = node(
            "GroupQueryAttention",
            [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total_len],
            f"/layers.{i}/attn/gqa", domain=MS, outputs=3, num_heads=heads, kv_num_heads=heads,
            scale=float(head_size) ** -0.5, do_rotary=0,
        )
        nodes.append(helper.make_node("Identity", [present_k], [f"present.{i}.key"], name=f"/layers.{i}/present_k"))
        nodes.append(helper.make_node("Identity", [present_v], [f"present.{i}.value"], name=f"/layers.{i}/present_v"))
        out = node("MatMul", [attn, weight(f"{p}.attn.c_proj.weight")], f"/layers.{i}/attn/proj")[0]
        out = node("Add", [out, weight(f"{p}.attn.c_proj.bias")], f"/layers.{i}/attn/proj_bias")[0]
        hidden = node("Add", [hidden, out], f"/layers.{i}/attn/residual")[0]
        ln2 = node("LayerNormalization", [hidden, weight(f"{p}.ln_2.weight"), weight(f"{p}.ln_2.bias")],
                   f"/layers.{i}/ln_2", axis=-1, epsilon=eps)[0]
        up = node("MatMul", [ln2, weight(f"{p}.mlp.c_fc.weight")], f"/layers.{i}/mlp/fc")[0]
        up = node("Add", [up, weight(f"{p}.mlp.c_fc.bias")], f"/layers.{i}/mlp/fc_bias")[0]
        up = node(activation, [up], f"/layers.{i}/mlp/act", domain=MS)[0]
        down = node("MatMul", [up, weight(f"{p}.mlp.c_proj.weight")], f"/layers.{i}/mlp/proj")[0]
        down = node("Add", [down, weight(f"{p}.mlp.c_proj.bias")], f"/layers.{i}/mlp/proj_bias")[0]
        hidden = node("Add", [hidden, down], f"/layers.{i}/mlp/residual")[0]

    # The last position only, then the final norm and the head (tied to the token embedding: Gemm transB).
    last = node("Slice", [hidden, const("minus_one", [-1]), const("end", [np.iinfo(np.int64).max]),
                          const("axis_1b", [1])], "/head/last")[0]  # (B, 1, E)
    normed = node("LayerNormalization", [last, weight("transformer.ln_f.weight"), weight("transformer.ln_f.bias")],
                  "/head/ln_f", axis=-1, epsilon=eps)[0]
    flat = node("Reshape", [normed, const("rows", [-1, width])], "/head/flat")[0]  # (B, E)
    head = "lm_head.weight" if "lm_head.weight" in weights and not _tied(model) else "transformer.wte.weight"
    if head == "lm_head.weight":
        weight(head)
    scores = node("Gemm", [flat, head], "/head/gemm", transB=1)[0]  # (B, V)
    nodes.append(helper.make_node("Unsqueeze", [scores, const("axis_1c", [1])], ["logits"], name="/head/logits"))

    input_names, output_names = graph_names(layers)
    cache_shape = ["batch_size", heads, "max_sequence_length", head_size]
    graph_inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        *(helper.make_tensor_value_info(name, TensorProto.FLOAT, cache_shape) for name in input_names[2:]),
    ]
    graph_outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", 1, config.vocab_size]),
        *(helper.make_tensor_value_info(name, TensorProto.FLOAT, cache_shape) for name in output_names[1:]),
    ]
    graph = helper.make_graph(nodes, "gpt2_shared_buffer", graph_inputs, graph_outputs, initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                              producer_name="nlpserve export", ir_version=IR_VERSION)
    onnx.checker.check_model(proto, full_check=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    if sum(t.ByteSize() for t in initializers) < SINGLE_FILE_BYTES:
        onnx.save_model(proto, str(path))
    else:
        onnx.save_model(proto, str(path), save_as_external_data=True, location=f"{path.name}.data")


def _tied(model: Any) -> bool:
    """Whether the head shares the token embedding's weights (GPT-2's default)."""
    return model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
