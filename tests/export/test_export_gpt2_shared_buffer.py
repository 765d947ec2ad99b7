"""`python -m export generator --kv-cache shared-buffer`: a GPT-2 written as a GroupQueryAttention graph on one
preallocated buffer (export/gpt2_shared_buffer.py), verified through the server's shared-buffer generator; served
with the same tokens as torch.onnx's concatenating graph of the same checkpoint, a prompt whole or in chunks."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from llm_util import gpt2_checkpoint, run_export

from client import Client
from server.process import ServerProcess


def config_of(folder: Path) -> dict:
    return json.loads((folder / "1" / "config.json").read_text())


def test_the_graph_follows_the_shared_buffer_contract(gpt2_repo: Path) -> None:
    config = config_of(gpt2_repo / "gpt2slots")
    concat = config_of(gpt2_repo / "gpt2concat")
    assert (config["format_version"], config["onnx"]["kv_cache"]) == (2, "shared_buffer")
    assert concat["format_version"] == 1 and "kv_cache" not in concat["onnx"]
    assert config["architecture"] | {"model_type": "gpt2", "num_layers": 2, "num_heads": 4, "num_kv_heads": 4,
                                     "head_size": 16} == config["architecture"]
    fp32 = config["quality"]["parity"]["fp32"]
    assert fp32["token_identical"] and fp32["bound_kind"] == "relative"
    for batch in ("batch1", "batch3"):
        assert fp32[batch]["max_rel_diff"] <= fp32[batch]["max_abs_diff"] <= 1e-4
    graph = onnx.load(str(gpt2_repo / "gpt2slots" / "1" / "model.onnx")).graph
    assert [i.name for i in graph.input] == config["onnx"]["inputs"]
    assert config["onnx"]["inputs"][:2] == ["input_ids", "attention_mask"]  # no position ids: from the mask
    assert [o.name for o in graph.output] == config["onnx"]["outputs"]
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == 2
    # Each layer's past goes into its attention op and nowhere else: nothing concatenates or copies it.
    pasts = {f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")}
    readers = {name: [n.op_type for n in graph.node if name in n.input] for name in pasts}
    assert all(ops == ["GroupQueryAttention"] for ops in readers.values()), readers


@pytest.mark.parametrize("chunk", ["0", "5"])
def test_served_tokens_match_the_concatenating_graph(gpt2_repo: Path, chunk: str) -> None:
    """Greedy continuations of the same checkpoint through both contracts, prompts whole (0) or prefilled 5
    tokens a step (a 40-token prompt in 8 chunks): the same tokens."""
    prompts = ["The quick brown fox", "Hello, world! " * 3, " ".join(["numbers 12345 and 2024"] * 5)]
    with ServerProcess(gpt2_repo, ["--prefill-chunk-tokens", chunk]) as srv, Client(srv.target) as client:
        for prompt in prompts:
            concat = client.generate(prompt, model="gpt2concat", max_new_tokens=24)
            slots = client.generate(prompt, model="gpt2slots", max_new_tokens=24)
            assert concat.token_ids and list(slots.token_ids) == list(concat.token_ids), prompt
            assert slots.finish_reason == concat.finish_reason


def test_the_int8_and_fp16_variants_are_verified_and_served(gpt2_repo: Path) -> None:
    config = config_of(gpt2_repo / "gpt2slots")
    assert config["onnx"]["variants"] == {"fp32": "model.onnx", "int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}
    for variant, bound in (("int8", 1.0), ("fp16", 0.02)):
        figures = config["quality"]["parity"][variant]
        assert figures["bound"] == bound and figures["max_rel_diff"] <= bound, variant
    graph = onnx.load(str(gpt2_repo / "gpt2slots" / "1" / "model.fp16.onnx")).graph
    past = next(i for i in graph.input if i.name == "past_key_values.0.key")
    assert past.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16  # the slot cache in float16
    for variant in ("int8", "fp16"):
        with ServerProcess(gpt2_repo, ["--variant", variant]) as srv, Client(srv.target) as client:
            answer = client.generate("The quick brown fox", model="gpt2slots", max_new_tokens=8)
        assert answer.token_ids and answer.finish_reason in ("length", "eos"), variant


def test_a_trained_models_variant_is_held_to_its_held_out_loss(tmp_path: Path) -> None:
    result = run_export("generator", "--corpus", "builtin:quick", "--layers", "2", "--heads", "2", "--width", "64",
                        "--context", "64", "--vocab-size", "300", "--steps", "30", "--kv-cache", "shared-buffer",
                        "--int8", "--out", str(tmp_path / "models" / "trained"))
    assert result.returncode == 0, result.stderr[-2000:]
    config = config_of(tmp_path / "models" / "trained")
    int8 = config["quality"]["parity"]["int8"]
    # the loss on held-out tokens through the served int8 graph against PyTorch's: within the 2% rule
    assert int8["val_loss_tokens"] == 64 and abs(int8["val_loss_delta"]) <= max(0.05, 0.02 * config["quality"]["eval"]["val_loss"])


def test_variants_and_llama_concat_are_refused(llm_checkpoints, tmp_path: Path) -> None:
    checkpoint = tmp_path / "gpt2"
    gpt2_checkpoint(checkpoint)
    result = run_export("generator", "--import", str(checkpoint), "--kv-cache", "shared-buffer", "--optimize",
                        "--out", str(tmp_path / "models" / "x"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --kv-cache shared-buffer has no --optimize variant: its graph is written with the fused operators "
        "already (int8 and fp16 are there)"
    )
    assert not (tmp_path / "models").exists()
    result = run_export("generator", "--import", str(llm_checkpoints["llama"]), "--kv-cache", "concat",
                        "--out", str(tmp_path / "models" / "y"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: Llama-family graphs are shared-buffer only (--kv-cache concat is for GPT-2)"
    )
    assert not (tmp_path / "models").exists()


def test_the_variants_have_mixed_step_graphs(gpt2_repo: Path) -> None:
    """GPT-2's learned positions are computed from the mask and the ids' shape outside the attention op: the
    mixed-step graph computes the rows' from their inputs and the chunk's from its own (export/mixed_step.py).
    The export writes one beside each variant and checks it against the variant's own graph."""
    from export import build_llm, mixed_step

    version = gpt2_repo / "gpt2slots" / "1"
    config = config_of(gpt2_repo / "gpt2slots")
    files = config["onnx"]["variants"]
    assert set(files) == {"fp32", "int8", "fp16"}
    # not int8: its activations are quantized with one scale over a call's tokens (refused by the transform)
    assert config["onnx"]["mixed_step"] == {v: mixed_step.mixed_name(f) for v, f in files.items() if v != "int8"}
    assert not (version / "model.int8.mixed.onnx").exists()
    for variant, name in config["onnx"]["mixed_step"].items():
        assert (version / name).is_file()
        assert config["quality"]["parity"][variant]["mixed_step_max_rel_diff"] <= build_llm.MIXED_STEP_BOUND
    graph = onnx.load(str(version / "model.mixed.onnx"), load_external_data=False).graph
    positions = [n for n in graph.node if n.op_type == "Gather" and n.input[0] == "transformer.wpe.weight"]
    assert len(positions) == 1 and positions[0].input[1].endswith("/mixed")  # the rows' then the chunk's
