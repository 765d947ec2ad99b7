"""The mixed-step graph of a shared-buffer decoder: decode rows and one prompt chunk in one call.

A decode step of B running sequences reads every weight once for B tokens; a prompt's prefill, run as a call of
its own, reads them all again. On a CPU that second read is most of a short prompt's cost (SmolLM2-135M fp32 on
2 cores: 16 decode rows 38 ms, a 16-token chunk alone 32 ms, both in one call 50 ms). This graph, derived from
the model's own (onnxruntime-genai builder layout: GroupQueryAttention with rotary inside, packed or separate
q/k/v), takes both in one call:

- inputs: the decode rows as in the plain graph (`input_ids` (B, 1), `attention_mask` (B, W),
  `past_key_values.N.key|value` bound to the rows' slots) and the chunk's (`chunk_ids` (1, C), `chunk_mask`
  (1, done + C), `chunk_past_key_values.N.key|value` bound to the chunk's slot);
- the B + C tokens go through every per-token node (embedding, norms, projections, MLP) as one sequence
  (1, B + C); each attention node is split in two: the rows' part reshaped to (B, 1) through one
  GroupQueryAttention on the rows' cache, the chunk's through a second on its slot, the outputs joined again;
- outputs: `logits` (B + 1, 1, vocab), the B rows' then the chunk's last position's, and `present.N.*` /
  `chunk_present.N.*` written in place into the same buffers.

The graph refers to the model's external data file, so the weights are on disk once. It is written beside the
model as `<file stem>.mixed.onnx` (`mixed_name`) and checked against the plain graph (`check`) by the exporter;
the server uses it when it is there (docs/server.md, "Mixed steps").

GPT-2's graph (gpt2_shared_buffer.py) has learned position embeddings: a Gather from a table, its indices
computed from the mask and the ids' shape. The mixed graph keeps that subgraph for the rows and runs a copy of
it on the chunk's inputs, and joins the two (the rows' positions, then the chunk's). Its head slices the last
position before the final norm: there the slice gives way to the pick of the rows' and the chunk's last
positions. Graphs of another layout, or whose activations are quantized per call (dynamic int8), are refused
with UnsupportedGraph and served without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from server.generation.model import CHUNK_PREFIX as CHUNK  # prefix of the chunk's inputs and outputs

GQA = "GroupQueryAttention"
# Per-row nodes between GPT-2's last-position slice and its logits (`_last_position_slice`).
HEAD_PASS = ("Cast", "Unsqueeze", "Reshape", "Gemm", "MatMul", "LayerNormalization")


class UnsupportedGraph(ValueError):
    """The graph is not of the layout this transform knows."""


def mixed_name(filename: str) -> str:
    """`model.int4.onnx` -> `model.int4.mixed.onnx`."""
    return filename[: -len(".onnx")] + ".mixed.onnx"


def _producers(nodes: list[Any]) -> dict[str, Any]:
    return {out: node for node in nodes for out in node.output}


def _upstream(tensors: list[str], producers: dict[str, Any]) -> list[Any]:
    """The nodes computing `tensors`, in graph order (each once)."""
    seen: list[Any] = []

    def visit(name: str) -> None:
        node = producers.get(name)
        if node is None or any(n is node for n in seen):
            return
        for name_in in node.input:
            if name_in:
                visit(name_in)
        seen.append(node)

    for tensor in tensors:
        visit(tensor)
    return seen


def _last_position_slice(producers: dict[str, Any], graph: Any) -> Any:
    """The Slice of the last position (starts -1, axes 1) on the way from `logits` back through the head's
    per-row nodes, or None."""
    from onnx import numpy_helper

    node = producers.get("logits")
    while node is not None and node.op_type in HEAD_PASS:
        node = producers.get(node.input[0])
    if node is None or node.op_type != "Slice" or len(node.input) < 4:
        return None

    def value(name: str) -> list[int] | None:
        tensor = next((t for t in graph.initializer if t.name == name and not t.external_data), None)
        return None if tensor is None else numpy_helper.to_array(tensor).tolist()

    return node if value(node.input[1]) == [-1] and value(node.input[3]) == [1] else None


def transform(model: Any) -> Any:
    """The mixed-step ModelProto of a shared-buffer decoder's ModelProto (loaded without its external data).
    Raises UnsupportedGraph when the layout differs."""
    import onnx
    from onnx import TensorProto, helper

    mixed = onnx.ModelProto()
    mixed.CopyFrom(model)
    graph = mixed.graph
    nodes = list(graph.node)
    attention = [n for n in nodes if n.op_type == GQA]
    if not attention:
        raise UnsupportedGraph("no GroupQueryAttention node")
    if any(n.op_type == "DynamicQuantizeLinear" for n in nodes):  # int8 with activations quantized per call
        raise UnsupportedGraph("dynamic quantization takes one scale over all of a call's tokens: the rows' "
                               "and the chunk's would change each other's numbers")
    lengths, total = attention[0].input[5], attention[0].input[6]
    if any(n.input[5] != lengths or n.input[6] != total for n in attention):
        raise UnsupportedGraph("the attention nodes do not share one length input")
    producers = _producers(nodes)
    graph_inputs = {i.name for i in graph.input}
    mask_nodes = [n for n in _upstream([lengths, total], producers) if n.op_type != "Constant"]
    reads = {i for n in mask_nodes for i in n.input if i in graph_inputs}
    if reads != {"attention_mask"}:
        raise UnsupportedGraph(f"the attention lengths come from {sorted(reads)}, not the attention mask alone")
    # Learned position embeddings (GPT-2): a Gather from a table whose indices are computed from the mask and
    # the ids' shape. Each side computes its own: the rows' subgraph as it is, a copy on the chunk's inputs.
    initializers = {t.name for t in graph.initializer}
    position_gathers = []
    for node in nodes:
        if node.op_type != "Gather" or node.input[0] not in initializers or node.input[1] == "input_ids":
            continue
        upstream = [n for n in _upstream([node.input[1]], producers) if n.op_type != "Constant"]
        if any(i in ("attention_mask", "input_ids") for n in upstream for i in n.input):
            position_gathers.append(node)
    positions = [n.input[1] for n in position_gathers]
    side_nodes = [n for n in _upstream([lengths, total, *positions], producers) if n.op_type != "Constant"]
    side, gathers = {id(n) for n in side_nodes}, {id(n) for n in position_gathers}  # nodes are not hashable
    reads = {i for n in side_nodes for i in n.input if i in graph_inputs}
    if not reads <= {"attention_mask", "input_ids"}:
        raise UnsupportedGraph(f"the attention lengths or positions read {sorted(reads)}")
    # Every other reader of the mask or of what is computed from it would need its own split. The mask is
    # checked over the whole graph before the ids, so that the reason given does not depend on the exporter's
    # node order.
    side_outputs = {out for n in side_nodes for out in n.output}
    for node in nodes:
        if id(node) in side:
            continue
        if node.op_type == GQA:
            used = {name for k, name in enumerate(node.input) if k not in (5, 6)}
        elif id(node) in gathers:
            used = {node.input[0]}
        else:
            used = set(node.input)
        if "attention_mask" in used or used & side_outputs:
            raise UnsupportedGraph(f"{node.name} reads the attention mask outside the lengths and positions")
    for node in nodes:
        if id(node) in side:
            continue
        if "input_ids" in node.input and node.op_type not in ("Gather", "GatherBlockQuantized"):
            raise UnsupportedGraph(f"{node.name} ({node.op_type}) reads input_ids beside the embedding")
    # The head: the projection computing `logits` (through a Cast in fp16 graphs). Its input is the last
    # position's hidden state when the builder pruned it (Gather(-1) + Unsqueeze: skipped here), else every
    # position's; either way the mixed graph gives it the rows' positions and the chunk's last one.
    # GPT-2's graph (gpt2_shared_buffer.py) slices the last position before its final norm and the projection
    # (Slice, LayerNormalization, Reshape to rows, Gemm, Unsqueeze): there the slice is what gives way to the
    # mixed graph's pick, and the nodes after it work on the picked rows as they are.
    last_slice = _last_position_slice(producers, graph)
    head_node = producers.get("logits")
    while head_node is not None and head_node.op_type == "Cast":
        head_node = producers.get(head_node.input[0])
    if last_slice is None and (head_node is None or head_node.op_type not in ("MatMul", "MatMulNBits", "Gemm")):
        raise UnsupportedGraph("logits do not come from a projection")
    skipped: list[Any] = []
    if last_slice is not None:
        head_node, hidden = last_slice, last_slice.input[0]
    else:
        hidden = head_node.input[0]
        unsqueeze = producers.get(hidden)
        if unsqueeze is not None and unsqueeze.op_type == "Unsqueeze":
            prune = producers.get(unsqueeze.input[0])
            axis = next((a.i for a in prune.attribute if a.name == "axis"), 0) if prune is not None else None
            if prune is None or prune.op_type != "Gather" or axis != 1:
                raise UnsupportedGraph(f"{unsqueeze.name}: not the builder's last-position prune")
            skipped, hidden = [prune, unsqueeze], prune.input[0]

    def const(name: str, values: list[int], scalar: bool = False) -> Any:
        return helper.make_node(
            "Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [] if scalar else [len(values)], values)
        )

    m = "/mixed/"
    head = [
        const(m + "zero", [0]), const(m + "one", [1]), const(m + "last", [-1]), const(m + "row", [1, -1]),
        const(m + "zero_s", [0], True), const(m + "one_s", [1], True),
        helper.make_node("Shape", ["input_ids"], [m + "ids_shape"]),
        helper.make_node("Slice", [m + "ids_shape", m + "zero", m + "one"], [m + "rows"]),  # [B]
        helper.make_node("Shape", [CHUNK + "ids"], [m + "chunk_shape"]),
        helper.make_node("Gather", [m + "chunk_shape", m + "one"], [m + "chunk"], axis=0),  # [C]
        helper.make_node("Concat", [m + "rows", m + "chunk"], [m + "split"], axis=0),
        helper.make_node("Reshape", ["input_ids", m + "row"], [m + "row_ids"]),  # (1, B)
        helper.make_node("Concat", [m + "row_ids", CHUNK + "ids"], [m + "ids"], axis=1),  # (1, B + C)
        # the rows' positions and the chunk's last one, for the head
        helper.make_node("Squeeze", [m + "rows"], [m + "rows_s"]),
        helper.make_node("Range", [m + "zero_s", m + "rows_s", m + "one_s"], [m + "row_positions"]),
        helper.make_node("Concat", [m + "row_positions", m + "last"], [m + "picked"], axis=0),
    ]
    renamed = {"attention_mask": CHUNK + "mask", "input_ids": CHUNK + "ids"}
    chunk_mask_nodes = []
    for node in side_nodes:
        clone = onnx.NodeProto()
        clone.CopyFrom(node)
        clone.name = node.name + "/chunk"
        for k, name in enumerate(clone.input):
            clone.input[k] = renamed.get(name, name)
        for k, name in enumerate(clone.output):
            renamed[name] = clone.output[k] = name + "/chunk"
        chunk_mask_nodes.append(clone)

    body = []
    for node in nodes:
        if any(node is n for n in skipped):
            continue
        if node is head_node:
            body.append(helper.make_node("Gather", [hidden, m + "picked"], [m + "picked_hidden"], axis=1))
            # (B + 1, 1, H): the slice's own output (GPT-2), or the head's new input
            picked = node.output[0] if node is last_slice else m + "head_input"
            body.append(helper.make_node("Transpose", [m + "picked_hidden"], [picked], perm=[1, 0, 2]))
            if node is last_slice:
                continue
            node.input[0] = m + "head_input"  # (B + 1, 1, H)
            body.append(node)
            continue
        if id(node) in gathers:  # the rows' positions (B, 1) then the chunk's (1, C)
            index = node.input[1]
            body += [
                helper.make_node("Reshape", [index, m + "row"], [index + "/rows"]),  # (1, B)
                helper.make_node("Concat", [index + "/rows", renamed[index]], [index + "/mixed"], axis=1),
            ]
            node.input[1] = index + "/mixed"
        if node.op_type != GQA:
            if "input_ids" in node.input and id(node) not in side:
                node.input[list(node.input).index("input_ids")] = m + "ids"
            body.append(node)
            continue
        name = node.name
        rows = onnx.NodeProto()
        rows.CopyFrom(node)
        chunk = onnx.NodeProto()
        chunk.CopyFrom(node)
        chunk.name = name + "/chunk"
        for k in (0, 1, 2):  # query (packed q/k/v or q alone), key, value: (1, B + C, D)
            if not node.input[k]:
                continue
            part_rows, part_chunk = f"{name}/in{k}_rows", f"{name}/in{k}_chunk"
            body += [
                helper.make_node("Split", [node.input[k], m + "split"], [part_rows + "_flat", part_chunk], axis=1),
                helper.make_node("Transpose", [part_rows + "_flat"], [part_rows], perm=[1, 0, 2]),  # (B, 1, D)
            ]
            rows.input[k], chunk.input[k] = part_rows, part_chunk
        chunk.input[3], chunk.input[4] = CHUNK + node.input[3], CHUNK + node.input[4]
        chunk.input[5], chunk.input[6] = renamed[lengths], renamed[total]
        rows.output[0], chunk.output[0] = name + "/out_rows", name + "/out_chunk"
        chunk.output[1], chunk.output[2] = CHUNK + node.output[1], CHUNK + node.output[2]
        body += [
            rows,
            chunk,
            helper.make_node("Transpose", [name + "/out_rows"], [name + "/out_rows_flat"], perm=[1, 0, 2]),
            helper.make_node("Concat", [name + "/out_rows_flat", name + "/out_chunk"], [node.output[0]], axis=1),
        ]
    # Graphs whose attention writes its present through an Identity (gpt2_shared_buffer.py): the chunk's too.
    chunk_presents = {n.output[k] for n in nodes if n.op_type == GQA for k in (1, 2)}
    body += [
        helper.make_node("Identity", [CHUNK + n.input[0]], [CHUNK + n.output[0]], name=n.name + "/chunk")
        for n in nodes
        if n.op_type == "Identity" and n.input[0] in chunk_presents and n.output[0].startswith("present.")
    ]
    constants = [n for n in body if n.op_type == "Constant"]
    del graph.node[:]
    graph.node.extend([*constants, *head, *chunk_mask_nodes, *(n for n in body if n.op_type != "Constant")])

    extra_inputs = [
        helper.make_tensor_value_info(CHUNK + "ids", TensorProto.INT64, [1, "chunk_length"]),
        helper.make_tensor_value_info(CHUNK + "mask", TensorProto.INT64, [1, "chunk_total_length"]),
    ]
    def chunk_value(value: Any) -> Any:
        """The chunk's one-row copy of a cache input or output."""
        extra = onnx.ValueInfoProto()
        extra.CopyFrom(value)
        extra.name = CHUNK + value.name
        extra.type.tensor_type.shape.dim[0].dim_value = 1
        return extra

    extra_inputs += [chunk_value(v) for v in graph.input if v.name.startswith("past_key_values.")]
    graph.input.extend(extra_inputs)
    extra_outputs = []
    for value in graph.output:
        if value.name.startswith("present."):
            extra_outputs.append(chunk_value(value))
        elif value.name == "logits":
            value.type.tensor_type.shape.dim[0].dim_param = "rows_and_chunk"
    graph.output.extend(extra_outputs)
    return mixed


def write(path: Path) -> Path:
    """Writes the mixed-step graph of the model file `path` beside it, sharing its external data; returns its
    path. Raises UnsupportedGraph (nothing written) when the layout differs."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    out = path.with_name(mixed_name(path.name))
    mixed = transform(model)
    partial = out.with_name(out.name + ".partial")
    onnx.save(mixed, str(partial))
    partial.replace(out)
    return out


def check(plain: Any, mixed: Any, num_layers: int, kv_heads: int, head_size: int, dtype: Any, seed: int = 0) -> float:
    """Runs both graphs (ONNX Runtime sessions) on the same small batch: two rows decoding and a prompt written
    in two chunks into a third slot, the plain graph as a decode call and a prefill call, the mixed one as one
    call each step. Returns the largest logit difference over the largest logit (at least 1); the caches must
    match to the same bound."""
    rng = np.random.default_rng(seed)
    vocab = int(plain.get_outputs()[0].shape[-1]) if isinstance(plain.get_outputs()[0].shape[-1], int) else 0
    vocab = vocab or 32
    length = 32
    names = [(f"past_key_values.{i}.{kv}", f"present.{i}.{kv}") for i in range(num_layers) for kv in ("key", "value")]
    pools = [[np.zeros((3, kv_heads, length, head_size), dtype) for _ in names] for _ in range(2)]

    def bind(binding: Any, pool: list[np.ndarray], first: int, rows: int, prefix: str = "") -> None:
        for (past, present), buffer in zip(names, pool):
            pointer = buffer.ctypes.data + first * buffer[0].nbytes
            shape = (rows, kv_heads, length, head_size)
            binding.bind_input(prefix + past, "cpu", 0, dtype, shape, pointer)
            binding.bind_output(prefix + present, "cpu", 0, dtype, shape, pointer)

    def run(session: Any, binding: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output("logits")
        session.run_with_iobinding(binding)
        return binding.get_outputs()[-1].numpy()[:, -1].astype(np.float64)

    def rows_feeds(tokens: list[int], lengths: list[int]) -> dict[str, np.ndarray]:
        held = np.array(lengths)
        return {"input_ids": np.array(tokens, np.int64).reshape(-1, 1),
                "attention_mask": (np.arange(held.max() + 1) <= held[:, None]).astype(np.int64)}

    prompts = [rng.integers(1, vocab, n).tolist() for n in (5, 3)]
    for pool in pools:
        for slot, ids in enumerate(prompts):
            binding = plain.io_binding()
            bind(binding, pool, slot, 1)
            run(plain, binding, {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)})
    chunk = rng.integers(1, vocab, 7).tolist()
    lengths = [len(p) for p in prompts]
    worst = 0.0
    for done, part in ((0, chunk[:4]), (4, chunk[4:])):
        tokens = rng.integers(1, vocab, 2).tolist()
        plain_pool, mixed_pool = pools
        binding = plain.io_binding()
        bind(binding, plain_pool, 0, 2)
        plain_rows = run(plain, binding, rows_feeds(tokens, lengths))
        binding = plain.io_binding()
        bind(binding, plain_pool, 2, 1)
        plain_chunk = run(plain, binding, {"input_ids": np.array([part], np.int64),
                                           "attention_mask": np.ones((1, done + len(part)), np.int64)})
        binding = mixed.io_binding()
        bind(binding, mixed_pool, 0, 2)
        bind(binding, mixed_pool, 2, 1, CHUNK)
        feeds = rows_feeds(tokens, lengths)
        feeds.update({CHUNK + "ids": np.array([part], np.int64),
                      CHUNK + "mask": np.ones((1, done + len(part)), np.int64)})
        both = run(mixed, binding, feeds)
        expected = np.concatenate([plain_rows, plain_chunk])
        scale = max(1.0, float(np.abs(expected).max()))
        worst = max(worst, float(np.abs(both - expected).max()) / scale)
        lengths = [n + 1 for n in lengths]
    for plain_buffer, mixed_buffer in zip(*pools):
        for slot, held in enumerate([*lengths, len(chunk)]):
            a, b = plain_buffer[slot, :, :held].astype(np.float64), mixed_buffer[slot, :, :held].astype(np.float64)
            worst = max(worst, float(np.abs(a - b).max()) / max(1.0, float(np.abs(a).max())))
    return worst
