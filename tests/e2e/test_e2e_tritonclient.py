"""Triton's own clients against the real server's Open Inference Protocol front: tritonclient[grpc] 2.51.0 and
the perf_analyzer binary its wheel carries, from .cache/tritonclient-venv (made by deploy/test-tools.sh, which
`make test` runs first: tritonclient needs protobuf < 7, the project >= 7, so it lives in a venv of its own).
Each check is a small script run in that venv (a subprocess, bounded by a timeout) against the server on
127.0.0.1; the wire itself is checked too: every field of our proto against tritonclient's compiled one."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor

from bench.triton import LIBB64_DIR, TRITONCLIENT_VENV, perf_analyzer_env
from client.proto import inference_pb2 as nl
from server.servicers.oip import grpc_service_pb2 as pb

VENV = TRITONCLIENT_VENV
TEXTS = ["I loved this movie", "What a waste of time.", "fine", "Café 東京 🙂"]
TIMEOUT = 180  # seconds for any one script or perf_analyzer run


@pytest.fixture(scope="module")
def venv() -> Path:
    for path in (VENV / "bin" / "python", VENV / "bin" / "perf_analyzer", LIBB64_DIR / "libb64.so.0d"):
        assert path.exists(), f"{path} is missing: run `make tools` (bash deploy/test-tools.sh) first"
    return VENV


def run_script(venv: Path, script: str, *args: str) -> dict:
    """Runs a Python script in the tritonclient venv; returns the JSON it prints last."""
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-c", script, *args],
        capture_output=True, text=True, timeout=TIMEOUT, env=perf_analyzer_env(), cwd=venv, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def perf_analyzer(venv: Path, tmp_path: Path, *args: str) -> list[dict[str, str]]:
    """Runs perf_analyzer; asserts it exited 0; returns its CSV rows (one per concurrency)."""
    report = tmp_path / "report.csv"
    result = subprocess.run(
        [str(venv / "bin" / "perf_analyzer"), "-i", "grpc", "-f", str(report), *args],
        capture_output=True, text=True, timeout=TIMEOUT, env=perf_analyzer_env(), cwd=tmp_path, check=False,
    )  # fmt: skip
    assert result.returncode == 0, (
        f"perf_analyzer exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-2000:]}"
    )
    with report.open() as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------------------------
# tritonclient


HEALTH_AND_METADATA = """
import json, sys
import tritonclient.grpc as g
c = g.InferenceServerClient(sys.argv[1])
print(json.dumps({
    "live": c.is_server_live(), "ready": c.is_server_ready(),
    "models_ready": {m: c.is_model_ready(m) for m in ("sentiment", "minilm-embed", "docgpt")},
    "server": c.get_server_metadata(as_json=True),
    "metadata": {m: c.get_model_metadata(m, as_json=True) for m in ("sentiment", "docgpt")},
    "config": {m: c.get_model_config(m, as_json=True)["config"] for m in ("sentiment", "docgpt")},
    "index": c.get_model_repository_index(as_json=True),
}))
"""


def test_health_metadata_and_config(venv, srv):
    out = run_script(venv, HEALTH_AND_METADATA, srv.target)
    assert out["live"] and out["ready"] and all(out["models_ready"].values())
    assert "statistics" in out["server"]["extensions"]
    sentiment = out["metadata"]["sentiment"]
    assert sentiment["inputs"][0] == {"name": "text", "datatype": "BYTES", "shape": ["-1", "1"]}
    assert [i["name"] for i in sentiment["inputs"][1:]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert {o["name"] for o in sentiment["outputs"]} == {"label", "probabilities", "embedding"}
    assert out["metadata"]["docgpt"]["outputs"] == [
        {"name": "text_output", "datatype": "BYTES", "shape": ["-1", "1"]}
    ]
    assert out["config"]["docgpt"]["model_transaction_policy"] == {"decoupled": True}
    assert int(out["config"]["sentiment"]["max_batch_size"]) > 0
    assert {m["name"] for m in out["index"]["models"]} == {"sentiment", "minilm-embed", "docgpt"}


INFER = """
import json, sys
import numpy as np
import tritonclient.grpc as g
c = g.InferenceServerClient(sys.argv[1])
texts = json.loads(sys.argv[2])
text = g.InferInput("text", [len(texts), 1], "BYTES")
text.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object))
r = c.infer("sentiment", [text], request_id="t1",
            outputs=[g.InferRequestedOutput("label"), g.InferRequestedOutput("probabilities")])
embed = g.InferInput("text", [len(texts)], "BYTES")
embed.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
e = c.infer("minilm-embed", [embed])
stats = c.get_inference_statistics("sentiment", as_json=True)["model_stats"][0]
print(json.dumps({
    "id": r.get_response().id,
    "labels": [x.decode() for x in r.as_numpy("label")],
    "probabilities": r.as_numpy("probabilities").tolist(),
    "embedding_shape": list(e.as_numpy("embedding").shape),
    "success": int(stats["inference_stats"]["success"].get("count", 0)),
}))
"""


def test_infer_bytes_text(venv, srv, stub):
    out = run_script(venv, INFER, srv.target, json.dumps(TEXTS))
    reference = stub.Classify(nl.ClassifyRequest(model="sentiment", texts=TEXTS), timeout=30)
    assert out["id"] == "t1"
    assert out["labels"] == [r.label for r in reference.results]
    for got, want in zip(out["probabilities"], reference.results):
        assert got == pytest.approx(list(want.probabilities), abs=1e-6)
    embedding = stub.Embed(nl.EmbedRequest(model="minilm-embed", texts=TEXTS[:1]), timeout=30)
    assert out["embedding_shape"] == [len(TEXTS), embedding.dimensions]
    assert out["success"] >= 1


STREAM = """
import json, queue, sys
import numpy as np
import tritonclient.grpc as g
c = g.InferenceServerClient(sys.argv[1])
results = queue.Queue()
c.start_stream(callback=lambda result, error: results.put((result, error)))
def inputs(prompt, max_tokens):
    text = g.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[prompt.encode()]], dtype=object))
    tokens = g.InferInput("max_tokens", [1, 1], "INT32")
    tokens.set_data_from_numpy(np.array([[max_tokens]], dtype=np.int32))
    stream = g.InferInput("stream", [1, 1], "BOOL")
    stream.set_data_from_numpy(np.array([[True]], dtype=bool))
    return [text, tokens, stream]
c.async_stream_infer("docgpt", inputs("def ", 24), request_id="a", enable_empty_final_response=True)
c.async_stream_infer("docgpt", inputs("Return the", 24), request_id="b")
pieces, finals, errors = {"a": [], "b": []}, {"a": [], "b": []}, []
while sum(f[-1] for f in finals.values() if f) < 2:
    result, error = results.get(timeout=60)
    if error is not None:
        errors.append(str(error)); break
    response = result.get_response()
    out = result.as_numpy("text_output")
    pieces[response.id].append(None if out is None else out.reshape(-1)[0].decode())
    finals[response.id].append(response.parameters["triton_final_response"].bool_param)
c.stop_stream()
print(json.dumps({"pieces": pieces, "finals": finals, "errors": errors}))
"""


def test_stream_infer_generation(venv, srv, stub):
    out = run_script(venv, STREAM, srv.target)
    assert out["errors"] == []
    for request_id, prompt in (("a", "def "), ("b", "Return the")):
        reference = stub.Generate(
            nl.GenerateRequest(
                model="docgpt", prompt=prompt, parameters=nl.GenerationParameters(max_new_tokens=24)
            ),
            timeout=30,
        ).text
        finals, pieces = out["finals"][request_id], out["pieces"][request_id]
        assert finals == [False] * (len(finals) - 1) + [True]
        assert "".join(p for p in pieces if p is not None) == reference
    assert out["pieces"]["a"][-1] is None  # asked for: Triton's empty final response
    assert out["pieces"]["b"][-1] is not None  # not asked for: the last piece carries the flag


# The wire: every message, field, enum value and RPC of our proto is in tritonclient's compiled protos, with
# the same numbers and types (what makes the two talk; names are checked too, for JSON and for readers).
DESCRIPTORS = """
import json
from tritonclient.grpc import service_pb2, model_config_pb2
messages, enums = {}, {}
def walk(d):
    messages[d.full_name] = {f.name: [f.number, f.type, f.label == f.LABEL_REPEATED,
                                      f.message_type.full_name if f.message_type else
                                      f.enum_type.full_name if f.enum_type else ""] for f in d.fields}
    for n in d.nested_types: walk(n)
    for e in d.enum_types: enums[e.full_name] = {v.name: v.number for v in e.values}
for module in (service_pb2, model_config_pb2):
    for d in module.DESCRIPTOR.message_types_by_name.values(): walk(d)
    for e in module.DESCRIPTOR.enum_types_by_name.values(): enums[e.full_name] = {v.name: v.number for v in e.values}
service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
methods = {m.name: [m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming]
           for m in service.methods}
print(json.dumps({"messages": messages, "enums": enums, "methods": methods}))
"""


def _ours(d: Descriptor, messages: dict, enums: dict) -> None:
    messages[d.full_name] = {
        f.name: [
            f.number,
            f.type,
            f.is_repeated,
            f.message_type.full_name if f.message_type else f.enum_type.full_name if f.enum_type else "",
        ]
        for f in d.fields
    }
    for nested in d.nested_types:  # map entries too (ParametersEntry): the same on both sides
        _ours(nested, messages, enums)
    for e in d.enum_types:
        enums[e.full_name] = {v.name: v.number for v in e.values}


def test_our_proto_is_a_wire_compatible_subset_of_tritons(venv):
    theirs = run_script(venv, DESCRIPTORS)
    messages: dict = {}
    enums = {
        e.full_name: {v.name: v.number for v in e.values} for e in pb.DESCRIPTOR.enum_types_by_name.values()
    }
    for d in pb.DESCRIPTOR.message_types_by_name.values():
        _ours(d, messages, enums)
    for name, fields in messages.items():
        assert name in theirs["messages"], f"{name}: not a message of Triton's protos"
        for field, spec in fields.items():
            assert theirs["messages"][name].get(field) == spec, (
                f"{name}.{field}: ours {spec}, Triton's {theirs['messages'][name].get(field)}"
            )
    for name, values in enums.items():
        for value, number in values.items():
            assert theirs["enums"][name].get(value) == number, f"{name}.{value}"
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    for method in service.methods:
        ours = [
            method.input_type.full_name,
            method.output_type.full_name,
            method.client_streaming,
            method.server_streaming,
        ]
        assert theirs["methods"][method.name] == ours, method.name


# ------------------------------------------------------------------------------------------------------------
# perf_analyzer

# Bounded by count windows: each concurrency measures windows of 30 requests, at most 3, and the stability
# check is off (no timing threshold: this is a test that it runs and measures, not a benchmark).
WINDOWS = ["--measurement-mode", "count_windows", "--measurement-request-count", "30",
           "--max-trials", "3", "--stability-percentage", "999"]  # fmt: skip


def test_perf_analyzer_on_the_classifier(venv, srv, tmp_path):
    data = tmp_path / "texts.json"
    data.write_text(json.dumps({"data": [{"text": [t]} for t in TEXTS]}))
    rows = perf_analyzer(
        venv, tmp_path, "-m", "sentiment", "-u", srv.target, "--input-data", str(data),
        "--concurrency-range", "1:4", *WINDOWS,
    )  # fmt: skip
    assert sorted(int(r["Concurrency"]) for r in rows) == [1, 2, 3, 4]
    for row in rows:
        assert float(row["Inferences/Second"]) > 0, row
        # The server-side columns come from ModelStatistics (perf_analyzer asks since "statistics" is listed).
        assert float(row["Server Compute Infer"]) > 0, row


def test_perf_analyzer_streaming_the_generator(venv, srv, tmp_path):
    data = tmp_path / "prompts.json"
    prompts = ["def ", "Return the", "import "]
    data.write_text(
        json.dumps({"data": [{"text_input": [p], "max_tokens": [16], "stream": [True]} for p in prompts]})
    )
    rows = perf_analyzer(
        venv, tmp_path, "-m", "docgpt", "-u", srv.target, "--streaming", "--input-data", str(data),
        "--concurrency-range", "1:2", *WINDOWS,
    )  # fmt: skip
    assert sorted(int(r["Concurrency"]) for r in rows) == [1, 2]
    for row in rows:
        assert float(row["Inferences/Second"]) > 0, row
