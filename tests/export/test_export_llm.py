"""`python -m export generator --import` for Llama-family checkpoints and GGUF files: the repository folder it
writes (format version 2, a shared-buffer decoder), its verification figures, and its one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from gguf_util import write_gguf
from llm_util import EOS_CONVERSATION, run_export, tiny_llama

from client import Client
from server.process import ServerProcess


def config_of(folder: Path) -> dict:
    return json.loads((folder / "1" / "config.json").read_text())


@pytest.mark.parametrize("name,arch", [("tinyllama", "llama"), ("tinyqwen", "qwen2")])
def test_exported_folder_follows_the_version_2_contract(llm_repo: Path, llm_checkpoints, name: str, arch: str) -> None:
    config = config_of(llm_repo / name)
    facts = json.loads((llm_checkpoints[arch] / "nlpserve-test.json").read_text())
    assert config["format_version"] == 2 and config["kind"] == "generator"
    assert config["onnx"]["kv_cache"] == "shared_buffer"
    assert config["architecture"] | {"model_type": arch, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                                     "head_size": 16} == config["architecture"]
    assert config["generation"]["eos_token_ids"] == facts["eos_ids"]
    fp32 = config["quality"]["parity"]["fp32"]
    assert fp32["token_identical"] and fp32["max_rel_diff"] <= 1e-4 and fp32["bound_kind"] == "relative"
    for batch in ("batch1", "batch3"):  # relative to the largest logit, at least 1: never above the absolute
        assert fp32[batch]["max_rel_diff"] <= fp32[batch]["max_abs_diff"] <= 1e-4
    version = llm_repo / name / "1"
    for file in ("model.onnx", "tokenizer.json", "genai_config.json"):
        assert (version / file).is_file(), file
    assert (version / "chat_template.jinja").is_file() or "chat_template" in json.loads(
        (version / "tokenizer_config.json").read_text()
    )
    graph = onnx.load(str(version / "model.onnx"), load_external_data=False).graph
    ops = {node.op_type for node in graph.node}
    assert "GroupQueryAttention" in ops
    assert [i.name for i in graph.input] == config["onnx"]["inputs"]
    assert [o.name for o in graph.output] == config["onnx"]["outputs"]


@pytest.mark.parametrize("name,variant,op", [("tinyllama", "int4", "MatMulNBits"),
                                             ("tinyqwen", "fp16", "GroupQueryAttention")])
def test_variant_is_verified_and_recorded(llm_repo: Path, name: str, variant: str, op: str) -> None:
    config = config_of(llm_repo / name)
    assert config["onnx"]["variants"][variant] == f"model.{variant}.onnx"
    figures = config["quality"]["parity"][variant]
    assert figures["token_agreement"] >= figures["bound"]["token_agreement"]
    assert figures["perplexity_ratio"] <= figures["bound"]["perplexity_ratio"]
    graph = onnx.load(str(llm_repo / name / "1" / f"model.{variant}.onnx"), load_external_data=False).graph
    assert op in {node.op_type for node in graph.node}
    if variant == "fp16":  # the cache is float16 too: the server's slot buffers take the graph's type
        assert graph.input[-1].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


@pytest.mark.parametrize("name", ["tinyllama", "tinyqwen"])
def test_every_variant_has_a_checked_mixed_step_graph(llm_repo: Path, name: str) -> None:
    """Beside each variant's file, its mixed-step graph (decode rows and a prompt chunk in one call), checked
    against it by the exporter, on the same external data (the weights are on disk once)."""
    config = config_of(llm_repo / name)
    version = llm_repo / name / "1"
    assert set(config["onnx"]["mixed_step"]) == set(config["onnx"]["variants"])
    for variant, file in config["onnx"]["variants"].items():
        mixed = config["onnx"]["mixed_step"][variant]
        assert mixed == file.replace(".onnx", ".mixed.onnx") and (version / mixed).is_file()
        assert config["quality"]["parity"][variant]["mixed_step_max_rel_diff"] <= 1e-4
        graph = onnx.load(str(version / mixed), load_external_data=False).graph
        names = {i.name for i in graph.input}
        assert {"input_ids", "chunk_ids", "chunk_mask", "chunk_past_key_values.0.key"} <= names
        assert {o.name for o in graph.output} >= {"logits", "present.0.key", "chunk_present.0.key"}
        locations = {e.value for t in graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {file + ".data"}
        assert not list(version.glob("*.mixed.onnx.data"))


def test_gguf_file_is_imported(llm_checkpoints, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    source = llm_checkpoints["llama"]
    model = AutoModelForCausalLM.from_pretrained(source)
    gguf_path = tmp_path / "tiny-llama.F32.gguf"
    write_gguf(model, source, gguf_path, "F32")
    result = run_export("generator", "--import", str(gguf_path), "--out", str(tmp_path / "models" / "fromgguf"))
    assert result.returncode == 0, result.stderr[-3000:]
    config = config_of(tmp_path / "models" / "fromgguf")
    assert config["architecture"]["model_type"] == "llama" and config["onnx"]["kv_cache"] == "shared_buffer"
    assert config["quality"]["parity"]["fp32"]["token_identical"]
    assert "GGUF" in config["provenance"]["source"]


def test_unsupported_gguf_tensor_type_is_one_line(llm_checkpoints, tmp_path: Path) -> None:
    source = llm_checkpoints["llama"]
    model = tiny_llama(vocab_size=336, hidden_size=256, intermediate_size=512)
    gguf_path = tmp_path / "tiny.Q8_K.gguf"
    write_gguf(model, source, gguf_path, "Q8_K")
    result = run_export("generator", "--import", str(gguf_path), "--out", str(tmp_path / "models" / "x"))
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "Q8_K is not supported" in line and "Q4_1" in line
    assert not (tmp_path / "models").exists()


def test_unsupported_architecture_is_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "phi"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "phi3", "architectures": ["Phi3ForCausalLM"]}))
    result = run_export("generator", "--import", str(folder), "--out", str(tmp_path / "models" / "phi"))
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "'phi3'" in line and "llama, qwen2, mistral" in line
    assert not (tmp_path / "models").exists()


def test_gguf_that_is_not_a_gguf_file(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf file at all")
    result = run_export("generator", "--import", str(bogus), "--out", str(tmp_path / "models" / "b"))
    assert result.returncode == 2
    assert "not a readable GGUF file" in result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def genai_folder(llm_checkpoints, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder as another tool writes it: the onnxruntime-genai builder run directly, with its defaults."""
    out = tmp_path_factory.mktemp("genai") / "tinyllama-genai"
    result = subprocess.run(
        [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(llm_checkpoints["llama"]), "-o", str(out),
         "-p", "fp32", "-e", "cpu", "-c", str(out.parent / "cache")],
        check=False, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return out


@pytest.mark.parametrize("against", ["genai", "pytorch"])
def test_import_onnx_serves_a_genai_builder_folder(genai_folder: Path, llm_checkpoints, tmp_path: Path,
                                                   against: str) -> None:
    extra = ["--checkpoint", str(llm_checkpoints["llama"])] if against == "pytorch" else []
    result = run_export("import-onnx", str(genai_folder), "--out", str(tmp_path / "models" / "imported"), *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    config = config_of(tmp_path / "models" / "imported")
    assert config["onnx"]["kv_cache"] == "shared_buffer" and config["onnx"]["variants"] == {"fp32": "model.onnx"}
    quality = config["quality"]["parity"]["fp32"]
    assert quality["token_agreement"] == 1.0
    assert ("PyTorch" in quality["reference"]) == (against == "pytorch")
    if against == "pytorch":
        assert quality["max_rel_diff"] <= quality["max_abs_diff"] <= 1e-4
    facts = json.loads((llm_checkpoints["llama"] / "nlpserve-test.json").read_text())
    assert config["generation"]["eos_token_ids"] == facts["eos_ids"]  # both, from genai_config.json
    assert (tmp_path / "models" / "imported" / "1" / "model.onnx.data").is_file()
    assert config["onnx"]["mixed_step"] == {"fp32": "model.mixed.onnx"}
    assert quality["mixed_step_max_rel_diff"] <= 1e-4
    if against == "genai":  # and served: the chat answer PyTorch gives through transformers' template
        with ServerProcess(tmp_path / "models") as srv, Client(srv.target) as client:
            answer = client.chat(EOS_CONVERSATION, model="imported", max_new_tokens=20)
        assert list(answer.token_ids) == facts["answer_ids"] and answer.finish_reason == "eos"


def test_import_onnx_refuses_a_folder_without_genai_config(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    result = run_export("import-onnx", str(tmp_path / "plain"), "--out", str(tmp_path / "models" / "x"))
    assert result.returncode == 2
    assert "genai_config.json" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "models").exists()


def test_a_short_context_is_verified_within_it(llm_checkpoints, tmp_path: Path) -> None:
    result = run_export("generator", "--import", str(llm_checkpoints["qwen2"]), "--out", str(tmp_path / "m" / "short"),
                        "--context", "16")
    assert result.returncode == 0, result.stderr[-2000:]
    config = config_of(tmp_path / "m" / "short")
    assert config["max_sequence_length"] == 16 and config["quality"]["parity"]["fp32"]["token_identical"]


def test_import_onnx_refuses_a_folder_without_its_weights(genai_folder: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(genai_folder, partial, ignore=shutil.ignore_patterns("*.data"))
    result = run_export("import-onnx", str(partial), "--out", str(tmp_path / "models" / "x"))
    assert result.returncode == 2
    assert "model.onnx.data, which is missing" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "models").exists()
