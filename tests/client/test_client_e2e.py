"""The client and its CLI against the real server, started on port 0 with the quick models."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from client import AsyncClient, Client, FinishReason, ModelKind, ServerError, cli

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "Return the"
TEXTS = ["a fine, moving film", "two hours I will never get back", "it was fine"]


def run(*argv: str, stdin: str = "", out: io.StringIO | None = None) -> tuple[int, str, str]:
    """Runs the CLI in this process; returns (exit code, stdout, stderr)."""
    out = out if out is not None else io.StringIO()
    err = io.StringIO()
    code = cli.main(list(argv), stdout=out, stderr=err, stdin=io.StringIO(stdin))
    return code, out.getvalue(), err.getvalue()


def assert_error_line(code: int, err: str, status: str) -> None:
    """A failed call: exit code 1 and exactly one line, `error: STATUS: message`, with no traceback."""
    assert code == 1, err
    assert err.count("\n") == 1 and err.startswith(f"error: {status}: "), err
    assert len(err.strip()) > len(f"error: {status}: ")  # a message, not only the code


@pytest.fixture(scope="module")
def client(target):
    with Client(target, timeout=60) as c:
        yield c


# ---------------------------------------------------------------------------------------------------------
# Models and health


def test_list_and_get_models(client):
    models = {m.name: m for m in client.list_models()}
    assert set(models) == {"sentiment", "minilm-embed", "docgpt"}
    sentiment, docgpt, embedder = models["sentiment"], models["docgpt"], models["minilm-embed"]
    assert sentiment.kind is ModelKind.CLASSIFIER and docgpt.kind is ModelKind.GENERATOR
    assert embedder.kind is ModelKind.EMBEDDER and embedder.normalized and embedder.pooling == "mean"
    assert embedder.embedding_size > 0
    assert len(sentiment.labels) >= 2 and sentiment.limits.max_texts_per_request > 0
    assert docgpt.limits.max_new_tokens > 0 and docgpt.batching.max_active_sequences > 0
    for m in models.values():
        assert m.ready and m.version and m.execution_provider.endswith("ExecutionProvider")
    assert client.get_model("sentiment") == sentiment


def test_models_command(target):
    code, out, err = run("--target", target, "models")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["NAME", "KIND"]
    assert sorted(line.split()[:2] for line in lines[1:]) == [
        ["docgpt", "generator"],
        ["minilm-embed", "embedder"],
        ["sentiment", "classifier"],
    ]

    code, out, _ = run("--target", target, "--json", "models")
    data = json.loads(out)
    assert code == 0 and {m["name"]: m["kind"] for m in data["models"]} == {
        "sentiment": "classifier",
        "minilm-embed": "embedder",
        "docgpt": "generator",
    }

    code, out, _ = run("--target", target, "models", "docgpt", "--json")
    assert code == 0 and json.loads(out)["name"] == "docgpt" and out.count("\n") == 1


def test_unknown_model_is_not_found(client, target):
    with pytest.raises(ServerError) as info:
        client.get_model("nope")
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert_error_line(*run("--target", target, "models", "nope")[::2], "NOT_FOUND")
    assert_error_line(*run("--target", target, "classify", "--model", "nope", "hi")[::2], "NOT_FOUND")
    assert_error_line(*run("--target", target, "generate", "--model", "nope", "hi")[::2], "NOT_FOUND")


def test_health(client, target):
    assert client.health() == "SERVING"
    assert client.health("sentiment") == "SERVING" and client.health("docgpt") == "SERVING"
    assert run("--target", target, "health") == (0, "SERVING\n", "")
    assert run("--target", target, "health", "docgpt") == (0, "SERVING\n", "")
    code, out, _ = run("--target", target, "health", "--json")
    assert code == 0 and json.loads(out) == {"service": "", "status": "SERVING"}
    # The standard health service answers NOT_FOUND for a service it does not know.
    code, out, err = run("--target", target, "health", "nope")
    assert out == ""
    assert_error_line(code, err, "NOT_FOUND")


# ---------------------------------------------------------------------------------------------------------
# Classification


def test_classify(client):
    result = client.classify(TEXTS, return_embedding=True)
    assert result.model == "sentiment" and len(result) == len(TEXTS)
    for r in result:
        assert r.label in result.labels and r.score == max(r.probabilities.values())
        assert list(r.probabilities) == result.labels
        assert math.isclose(sum(r.probabilities.values()), 1.0, rel_tol=1e-4)
        assert not r.truncated and r.num_tokens > 0
        assert r.embedding and len(r.embedding) == client.get_model("sentiment").embedding_size
    # One text as a string; the same answer as inside a batch.
    single = client.classify(TEXTS[1])
    assert len(single) == 1 and single[0].label == result[1].label and single[0].embedding is None
    assert math.isclose(single[0].score, result[1].score, rel_tol=1e-3)


def test_classify_command(client, target):
    expected = client.classify(TEXTS)
    code, out, err = run("--target", target, "classify", *TEXTS)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == len(TEXTS)
    for line, text, r in zip(lines, TEXTS, expected):
        label, score, shown = re.fullmatch(r"(\S+)\s+(\d\.\d{4})  (.*)", line).groups()
        assert (label, shown) == (r.label, text) and abs(float(score) - r.score) < 1e-3

    code, out, err = run("--target", target, "classify", "--json", "--model", "sentiment", *TEXTS)
    assert code == 0, err
    assert out.count("\n") == 1
    data = json.loads(out)
    assert [x["text"] for x in data["results"]] == TEXTS
    assert [x["label"] for x in data["results"]] == [r.label for r in expected]

    # '-' reads one text per line from stdin.
    code, out, _ = run("--target", target, "classify", "-", stdin="\n".join(TEXTS) + "\n")
    assert code == 0 and len(out.splitlines()) == len(TEXTS)


def test_classify_truncation(client, target):
    long_text = "very " * 2000
    assert client.classify([long_text])[0].truncated
    with pytest.raises(ServerError) as info:
        client.classify([long_text], no_truncation=True)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    code, out, _ = run("--target", target, "classify", long_text)
    assert code == 0 and out.rstrip().endswith("[truncated]")
    assert_error_line(
        *run("--target", target, "classify", "--no-truncation", long_text)[::2], "INVALID_ARGUMENT"
    )


def test_classify_bad_input(client, target):
    for texts in ([], [""], ["fine", ""]):
        with pytest.raises(ServerError) as info:
            client.classify(texts)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT, texts
    assert_error_line(*run("--target", target, "classify", "")[::2], "INVALID_ARGUMENT")
    too_many = client.get_model("sentiment").limits.max_texts_per_request + 1
    with pytest.raises(ServerError) as info:
        client.classify(["x"] * too_many)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


# ---------------------------------------------------------------------------------------------------------
# Generation


def test_generate_unary_and_stream_agree(client):
    whole = client.generate(PROMPT, max_new_tokens=12)
    assert whole.model == "docgpt" and whole.finish_reason in (FinishReason.LENGTH, FinishReason.EOS)
    assert whole.usage.prompt_tokens > 0 and 0 < whole.usage.generated_tokens <= 12
    assert len(whole.token_ids) == whole.usage.generated_tokens
    if whole.finish_reason is FinishReason.LENGTH:
        assert whole.usage.generated_tokens == 12
    t = whole.timings
    assert 0 <= t.queue_seconds <= t.time_to_first_token_seconds <= t.total_seconds

    chunks = list(client.generate_stream(PROMPT, max_new_tokens=12))
    assert all(c.finish_reason is None for c in chunks[:-1]) and chunks[-1].is_last
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids
    joined = type(whole).from_chunks(chunks)
    assert (joined.finish_reason, joined.usage) == (whole.finish_reason, whole.usage)


def test_generate_seed_and_logprobs(client):
    kw = {"max_new_tokens": 8, "temperature": 1.0, "top_k": 20, "seed": 1234, "logprobs": True}
    first, second = client.generate(PROMPT, **kw), client.generate(PROMPT, **kw)
    assert first.token_ids == second.token_ids and first.text == second.text
    assert len(first.logprobs) == len(first.token_ids) and all(p <= 0 for p in first.logprobs)


def test_generate_command_streams(client, target):
    whole = client.generate(PROMPT, max_new_tokens=12)
    code, out, err = run("--target", target, "generate", PROMPT, "--max-new-tokens", "12")
    assert code == 0 and err == "" and out == cli._text_line(whole.text)
    code, out, _ = run("--target", target, "generate", PROMPT, "--max-new-tokens", "12", "--no-stream")
    assert code == 0 and out == cli._text_line(whole.text)
    code, out, _ = run("--target", target, "generate", "-", "--max-new-tokens", "12", stdin=PROMPT)
    assert code == 0 and out == cli._text_line(whole.text)


def test_generate_command_prints_each_piece_as_it_arrives(client, target, recording, monkeypatch):
    whole = client.generate(PROMPT, max_new_tokens=32).text
    out = recording
    # How many pieces the stream brings is the server's choice (it joins those that piled up while the client
    # was behind: on a loaded machine all 32 may come as one), so the test follows the real stream as the CLI
    # receives it: by the time the CLI asks for the next piece, the text of every piece so far is flushed.
    # (Several pieces printed one by one, whatever the load: tests/client/test_client_cli.py.)
    received: list[str] = []
    shown_before_next: list[str] = []
    real_stream = Client.generate_stream

    def followed(self, *args, **kwargs):
        for chunk in real_stream(self, *args, **kwargs):
            if received:
                shown_before_next.append(out.flushed[-1] if out.flushed else "")
            received.append(chunk.text)
            yield chunk
        shown_before_next.append(out.flushed[-1] if out.flushed else "")

    monkeypatch.setattr(Client, "generate_stream", followed)
    code, _, err = run("--target", target, "generate", PROMPT, "--max-new-tokens", "32", out=out)
    assert code == 0, err
    assert out.getvalue() == cli._text_line(whole)
    assert "".join(received) == whole and received
    assert shown_before_next == ["".join(received[: i + 1]) for i in range(len(received))]
    assert all(whole.startswith(f) or f == out.getvalue() for f in out.flushed)


def test_generate_command_json_stream_is_one_object_per_line(client, target):
    whole = client.generate(PROMPT, max_new_tokens=12)
    code, out, err = run(
        "--target", target, "--json", "generate", PROMPT, "--max-new-tokens", "12", "--logprobs"
    )
    assert code == 0, err
    # How many messages (so lines) the stream has is not fixed: pieces that pile up while the client reads
    # slowly come joined in one message (all 12 in one, on a loaded machine). What is: each line is one JSON
    # object, their texts and tokens joined are the unary answer, and only the last has the finish reason.
    assert out.endswith("\n")
    objects = [json.loads(line) for line in out.splitlines()]
    assert objects and all(isinstance(o, dict) for o in objects)
    assert "".join(o["text"] for o in objects) == whole.text
    assert [t for o in objects for t in o["token_ids"]] == whole.token_ids
    assert [o["finish_reason"] for o in objects[:-1]] == [None] * (len(objects) - 1)
    last = objects[-1]
    assert last["finish_reason"] == whole.finish_reason.value
    assert last["usage"]["generated_tokens"] == whole.usage.generated_tokens == len(whole.token_ids)
    assert set(last["timings"]) == {"queue_seconds", "time_to_first_token_seconds", "total_seconds"}
    assert [len(o["logprobs"]) for o in objects] == [len(o["token_ids"]) for o in objects]
    assert sum(len(o["logprobs"]) for o in objects) == whole.usage.generated_tokens

    code, out, _ = run(
        "--target", target, "generate", PROMPT, "--max-new-tokens", "12", "--no-stream", "--json"
    )
    assert code == 0 and out.count("\n") == 1 and json.loads(out)["text"] == whole.text


def test_generate_command_stats(target):
    code, out, err = run("--target", target, "generate", PROMPT, "--max-new-tokens", "4", "--stats")
    assert code == 0 and out.endswith("\n")
    assert re.fullmatch(
        r"finish_reason=(length|eos) prompt_tokens=\d+ generated_tokens=\d+ .*total=\S+s\n", err
    )


def test_generate_stop_sequence(client, target):
    # Sampled with a seed (the same seed, the same tokens): the quick model's greedy text is one repeated
    # character, which offers no stop sequence with text before it.
    kw = {"max_new_tokens": 24, "temperature": 1.0, "seed": 11}
    text = client.generate(PROMPT, **kw).text
    # A stop sequence from the output itself, whose first occurrence has text before it.
    stop = next((text[i : i + 2] for i in range(1, len(text) - 1) if text.index(text[i : i + 2]) == i), None)
    assert stop, f"no usable stop sequence in {text!r}"
    stopped = client.generate(PROMPT, **kw, stop=[stop])
    assert stopped.finish_reason is FinishReason.STOP and stopped.text == text[: text.index(stop)]
    flags = ["--max-new-tokens", "24", "--temperature", "1", "--seed", "11", "--stop", stop]
    code, out, _ = run("--target", target, "generate", PROMPT, *flags)
    assert code == 0 and out == cli._text_line(stopped.text)


@pytest.mark.parametrize(
    "flags",
    [
        ("--temperature", "-1"),
        ("--temperature", "nan"),
        ("--top-p", "0"),
        ("--top-p", "1.5"),
        ("--top-k", "-1"),
        ("--max-new-tokens", "0"),
        ("--max-new-tokens", "1000000"),
        ("--stop", ""),
    ],
)
def test_generate_bad_parameters_are_invalid_argument(target, flags):
    code, out, err = run("--target", target, "generate", PROMPT, *flags)
    assert out == ""
    assert_error_line(code, err, "INVALID_ARGUMENT")
    # The message names the field.
    field = flags[0].lstrip("-").replace("-", "_")
    assert field in err, err


def test_generate_empty_prompt(client):
    with pytest.raises(ServerError) as info:
        client.generate("")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in info.value.details


def _sample(url: str, name: str, **labels: str) -> float:
    """The value of one sample on the server's /metrics page (0 when absent: a counter not yet incremented)."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for match in re.finditer(rf"^{name}{{([^}}]*)}} (\S+)$", text, flags=re.MULTILINE):
        if dict(re.findall(r'(\w+)="([^"]*)"', match.group(1))) == labels:
            return float(match.group(2))
    return 0.0


def test_leaving_a_stream_early_cancels_the_call(client, client_server):
    url = client_server.metrics_url
    limit = client.get_model("docgpt").limits
    max_new_tokens = min(limit.max_new_tokens, limit.max_sequence_length - 8)

    def ended(code: str) -> float:
        return _sample(url, "nlpserve_requests_total", model="docgpt", method="GenerateStream", code=code)

    # The quick model generates a stream in a fraction of a second: on a loaded machine its pieces may all
    # come joined in the first message, or the server may send its last one before the cancellation reaches
    # it (then the call ends OK). Either way the server counts the call once, and the attempt is repeated
    # until one was cancelled mid-stream (the bound only stops a client that never cancels).
    for _ in range(20):
        before = {code: ended(code) for code in ("CANCELLED", "OK")}
        stream = client.generate_stream(PROMPT, max_new_tokens=max_new_tokens)
        first = next(stream)
        stream.close()  # what leaving a for loop early does to the generator
        # The server sees the cancellation and frees the slot at its next step; poll (the bound is generous,
        # and no duration is asserted).
        deadline = time.monotonic() + 60
        while sum(ended(code) - before[code] for code in before) < 1:
            assert time.monotonic() < deadline, "the server never counted the call"
            time.sleep(0.05)
        if first.finish_reason is None and ended("CANCELLED") > before["CANCELLED"]:
            break
    else:
        pytest.fail("no stream was cancelled mid-generation in 20 attempts")
    deadline = time.monotonic() + 60
    while _sample(url, "nlpserve_active_sequences", model="docgpt") != 0:
        assert time.monotonic() < deadline, "the server kept the cancelled sequence's slot"
        time.sleep(0.05)
    assert client.generate(PROMPT, max_new_tokens=2).usage.generated_tokens <= 2


# ---------------------------------------------------------------------------------------------------------
# The asyncio client


def test_async_client(target, client):
    sync_whole = client.generate(PROMPT, max_new_tokens=10)

    async def scenario() -> None:
        async with AsyncClient(target, timeout=60) as c:
            models = await c.list_models()
            assert {m.name for m in models} == {"sentiment", "minilm-embed", "docgpt"}
            assert (await c.get_model("docgpt")).kind is ModelKind.GENERATOR
            assert await c.health() == "SERVING"
            # Concurrent requests: the server may batch them; each gets its own answer, in order.
            results = await asyncio.gather(*(c.classify([t]) for t in TEXTS))
            assert [r[0].label for r in results] == [r.label for r in client.classify(TEXTS)]
            whole = await c.generate(PROMPT, max_new_tokens=10)
            assert whole.text == sync_whole.text
            chunks = [chunk async for chunk in c.generate_stream(PROMPT, max_new_tokens=10)]
            assert "".join(ch.text for ch in chunks) == whole.text and chunks[-1].is_last
            # Leaving a stream early: closing it cancels the call, and the client stays usable.
            async with contextlib.aclosing(c.generate_stream(PROMPT, max_new_tokens=10)) as stream:
                async for _ in stream:
                    break
            with pytest.raises(ServerError) as info:
                await c.classify(["x"], model="nope")
            assert info.value.code == grpc.StatusCode.NOT_FOUND
            with pytest.raises(ServerError) as info:
                async for _ in c.generate_stream(PROMPT, temperature=-1.0):
                    pass
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(scenario())


def test_async_client_made_before_the_loop_runs(target):
    # As an application object might be: the channel opens at the first call, inside the loop.
    c = AsyncClient(target, timeout=60)

    async def scenario() -> tuple[str, list]:
        async with c:
            return await c.health(), [ch async for ch in c.generate_stream(PROMPT, max_new_tokens=3)]

    status, chunks = asyncio.run(scenario())
    assert status == "SERVING" and chunks[-1].is_last


# ---------------------------------------------------------------------------------------------------------
# The real entry point, in a fresh interpreter


def test_python_m_client_against_the_server(target):
    def cli_run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "client", "--target", target, *argv],
            check=False, capture_output=True, text=True, cwd=ROOT, timeout=120,
        )  # fmt: skip

    result = cli_run("generate", PROMPT, "--max-new-tokens", "6")
    assert result.returncode == 0 and result.stderr == "" and result.stdout.endswith("\n")
    result = cli_run("generate", PROMPT, "--temperature", "-1")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("error: INVALID_ARGUMENT: ") and result.stderr.count("\n") == 1


# ---------------------------------------------------------------------------------------------------------
# --model's default, on a server with no classifier and two generators


@pytest.fixture(scope="module")
def two_generators_target(quick_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    from server.process import ServerProcess

    repo = tmp_path_factory.mktemp("two-generators")
    for name in ("docgpt", "docgpt2"):
        shutil.copytree(quick_repo / "docgpt", repo / name)
        for config_path in (repo / name).glob("*/config.json"):
            config = json.loads(config_path.read_text())
            config["name"] = name
            config_path.write_text(json.dumps(config))
    with ServerProcess(repo) as srv:
        yield srv.target


def test_model_default_needs_exactly_one_model_of_the_kind(two_generators_target):
    target = two_generators_target
    code, out, err = run("--target", target, "classify", "hi")
    assert (code, out) == (1, "") and err == f"error: the server at {target} hosts no classifier\n"
    code, out, err = run("--target", target, "generate", "hi")
    assert (code, out) == (2, "")
    assert err == "error: the server hosts several generators (docgpt, docgpt2): choose one with --model\n"
    code, out, err = run("--target", target, "generate", "hi", "--model", "docgpt2", "--max-new-tokens", "2")
    assert code == 0 and err == ""
