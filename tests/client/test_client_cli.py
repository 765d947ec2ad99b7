"""The CLI without a server: flags, one-line errors and exit codes, output formatting."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from client import ServerError, cli
from client.proto import inference_pb2 as pb
from client.types import ClassifyResult, GenerationChunk, ModelInfo

ROOT = Path(__file__).resolve().parents[2]


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), stdout=out, stderr=err, stdin=io.StringIO(""))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def closed_target() -> Iterator[str]:
    """An address where nothing listens: a bound socket that never listens refuses connections."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{s.getsockname()[1]}"


# ---------------------------------------------------------------------------------------------------------
# Flags


def parse(*argv: str):
    return cli.build_parser("nlpserve").parse_args(list(argv))


def test_generate_flags():
    args = parse(
        "generate", "Once upon", "--model", "docgpt", "--max-new-tokens", "12", "--temperature", "0.8",
        "--top-k", "40", "--top-p", "0.95", "--repetition-penalty", "1.1", "--seed", "7",
        "--stop", "\n", "--stop", "END", "--logprobs", "--no-stream",
    )  # fmt: skip
    assert (args.command, args.prompt, args.model) == ("generate", "Once upon", "docgpt")
    assert (args.max_new_tokens, args.temperature, args.top_k, args.top_p) == (12, 0.8, 40, 0.95)
    assert (args.repetition_penalty, args.seed, args.stop) == (1.1, 7, ["\n", "END"])
    assert args.logprobs and args.no_stream


def test_generate_defaults_leave_choices_to_the_server():
    args = parse("generate", "hi")
    assert args.model is None and args.max_new_tokens is None and args.top_p is None and args.seed is None
    assert (args.temperature, args.top_k, args.stop, args.no_stream) == (0.0, 0, [], False)


def test_connection_options_before_or_after_the_command():
    before = parse("--target", "h:1", "--timeout", "2.5", "--json", "classify", "a", "b")
    after = parse("classify", "a", "b", "--target", "h:1", "--timeout", "2.5", "--json")
    for args in (before, after):
        assert (args.target, args.timeout, args.json, args.texts) == ("h:1", 2.5, True, ["a", "b"])
    assert not hasattr(parse("models"), "target")  # the default comes from the environment at run time


def test_health_service_defaults_to_the_whole_server():
    assert parse("health").service == ""
    assert parse("health", "sentiment").service == "sentiment"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ((), "required: COMMAND"),
        (("bogus",), "invalid choice: 'bogus'"),
        (("classify",), "required: TEXT"),
        (("generate",), "required: PROMPT"),
        (("generate", "x", "--seed", "-1"), "argument --seed: expected a non-negative integer"),
        (("generate", "x", "--seed", "lots"), "argument --seed: expected a non-negative integer, got 'lots'"),
        (("generate", "x", "--max-new-tokens", "1e3"), "argument --max-new-tokens: expected an integer"),
        (
            ("generate", "x", "--max-new-tokens", str(2**31)),
            "argument --max-new-tokens: expected an integer in",
        ),
        (("generate", "x", "--temperature", "warm"), "argument --temperature: expected a number, got 'warm'"),
        (("--timeout", "0", "models"), "argument --timeout: expected a number of seconds above 0"),
        (("models", "--frobnicate"), "unrecognized arguments: --frobnicate"),
    ],
)
def test_bad_usage_is_one_line_and_exit_code_2(argv, message):
    code, out, err = run(*argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert "Traceback" not in err


def test_help_exits_0():
    code, out, err = run("--help")
    assert code == 0 and out.startswith("usage: ") and err == ""


def test_values_the_server_judges_are_passed_on():
    # Out-of-range sampling values are the server's to refuse, with a message naming the field.
    args = parse(
        "generate", "x", "--max-new-tokens", "0", "--temperature", "nan", "--top-p", "1.5", "--top-k", "-1"
    )
    assert args.max_new_tokens == 0 and args.temperature != args.temperature and args.top_p == 1.5
    assert args.top_k == -1


# ---------------------------------------------------------------------------------------------------------
# Errors


def test_server_error_is_one_line():
    e = ServerError(grpc.StatusCode.INVALID_ARGUMENT, "top_p must be in (0, 1],\n got 1.5")
    assert str(e) == "INVALID_ARGUMENT: top_p must be in (0, 1], got 1.5"
    assert cli.format_error(e, "h:1") == "error: INVALID_ARGUMENT: top_p must be in (0, 1], got 1.5"
    assert str(ServerError(grpc.StatusCode.CANCELLED, "")) == "CANCELLED"


def test_an_unreachable_server_is_named_in_the_error(closed_target):
    code, out, err = run("--target", closed_target, "models")
    assert code == 1 and out == ""
    assert err.startswith(f"error: UNAVAILABLE: cannot reach the server at {closed_target} (")
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    "argv",
    [
        ("health",),
        ("classify", "a fine film"),
        ("generate", "Once"),
        ("generate", "Once", "--no-stream", "--json"),
    ],
)
def test_every_command_fails_cleanly_when_the_server_is_unreachable(closed_target, argv):
    code, out, err = run("--target", closed_target, *argv)
    assert code == 1 and out == "" and err.startswith("error: UNAVAILABLE: ") and err.count("\n") == 1


@pytest.fixture
def silent_target() -> Iterator[str]:
    """A port that accepts connections and never answers: every call waits for its deadline."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield f"127.0.0.1:{s.getsockname()[1]}"


def test_a_passed_deadline_is_deadline_exceeded(silent_target):
    from client import AsyncClient, Client

    with Client(silent_target, timeout=0.2) as c, pytest.raises(ServerError) as info:
        list(c.generate_stream("Once"))
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED

    async def use_async() -> None:
        async with AsyncClient(silent_target) as c:
            await c.classify(["x"], timeout=0.2)

    with pytest.raises(ServerError) as info:
        asyncio.run(use_async())
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    code, out, err = run("--target", silent_target, "--timeout", "0.2", "classify", "hi")
    assert (code, out, err) == (1, "", "error: DEADLINE_EXCEEDED: Deadline Exceeded\n")


def test_target_from_the_environment(closed_target, monkeypatch):
    monkeypatch.setenv("NLPSERVE_TARGET", closed_target)
    code, _, err = run("health")
    assert code == 1 and closed_target in err


def test_the_library_raises_server_error_with_the_code(closed_target):
    from client import Client

    with Client(closed_target, timeout=5) as c, pytest.raises(ServerError) as info:
        c.list_models()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and "\n" not in info.value.details


def test_the_console_script_runs_without_a_traceback(closed_target):
    # The real entry point, in a fresh interpreter: `python -m client`.
    result = subprocess.run(
        [sys.executable, "-m", "client", "--target", closed_target, "generate", "Once"],
        check=False, capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("error: UNAVAILABLE: ") and result.stderr.count("\n") == 1


# ---------------------------------------------------------------------------------------------------------
# Output


def _models() -> list[ModelInfo]:
    return [
        ModelInfo.from_pb(
            pb.ModelInfo(
                name="sentiment", version="1", kind=pb.MODEL_KIND_CLASSIFIER, labels=["negative", "positive"],
                limits=pb.ModelLimits(max_sequence_length=128, max_texts_per_request=64),
                batching=pb.BatchingSettings(max_batch_size=32, max_queue_delay_ms=2, policy="adaptive"),
                execution_provider="CPUExecutionProvider", variant="fp32", ready=True,
            )
        ),
        ModelInfo.from_pb(
            pb.ModelInfo(
                name="docgpt", version="1", kind=pb.MODEL_KIND_GENERATOR,
                limits=pb.ModelLimits(max_sequence_length=256, max_new_tokens=200, default_max_new_tokens=64),
                batching=pb.BatchingSettings(max_active_sequences=8, policy="continuous"),
                execution_provider="CPUExecutionProvider", variant="int8", ready=False,
            )
        ),
    ]  # fmt: skip


def test_models_table():
    lines = cli.format_models(_models()).splitlines()
    assert lines[0].split() == ["NAME", "KIND", "VERSION", "READY", "PROVIDER", "VARIANT", "DETAILS"]
    assert lines[1].split()[:6] == ["sentiment", "classifier", "1", "yes", "CPUExecutionProvider", "fp32"]
    assert "labels negative,positive" in lines[1] and "batch 32 (adaptive, 2 ms)" in lines[1]
    assert lines[2].split()[:6] == ["docgpt", "generator", "1", "no", "CPUExecutionProvider", "int8"]
    assert "max_new_tokens 200 (default 64)" in lines[2] and "8 sequences (continuous)" in lines[2]
    # Columns line up.
    assert lines[1].index("classifier") == lines[2].index("generator") == lines[0].index("KIND")


def test_classifications_one_line_per_text():
    result = ClassifyResult.from_pb(
        pb.ClassifyResponse(
            labels=["negative", "positive"],
            results=[
                pb.Classification(label="positive", score=0.96875, probabilities=[0.03125, 0.96875]),
                pb.Classification(label="negative", score=0.5, probabilities=[0.5, 0.5], truncated=True),
            ],
        )
    )
    text = cli.format_classifications(["a fine\nfilm", "long"], result)
    assert text.splitlines() == ["positive  0.9688  a fine film", "negative  0.5000  long  [truncated]"]
    data = cli.classify_json(["a fine\nfilm", "long"], result)
    assert data["results"][0]["text"] == "a fine\nfilm" and data["results"][1]["truncated"] is True
    assert json.loads(cli.to_json(data)) == data and "\n" not in cli.to_json(data)


def _chunks() -> list[GenerationChunk]:
    last = pb.GenerateResponse(
        text=" world", token_ids=[3], finish_reason=pb.FINISH_REASON_LENGTH,
        usage=pb.Usage(prompt_tokens=2, generated_tokens=3), timings=pb.Timings(total_seconds=0.5),
    )  # fmt: skip
    messages = [
        pb.GenerateResponse(text="Hel", token_ids=[1]),
        pb.GenerateResponse(text="lo", token_ids=[2]),
        last,
    ]
    return [GenerationChunk.from_pb(m) for m in messages]


def test_a_stream_is_printed_and_flushed_piece_by_piece(recording):
    out = recording
    last = cli._print_stream(iter(_chunks()), as_json=False, out=out)
    assert out.flushed[:3] == ["Hel", "Hello", "Hello world"]
    assert out.getvalue() == "Hello world\n" and last.finish_reason == "length"
    assert cli.format_stats(last).split() == [
        "finish_reason=length", "prompt_tokens=2", "generated_tokens=3",
        "queue=0.0000s", "time_to_first_token=0.0000s", "total=0.5000s",
    ]  # fmt: skip


def test_a_json_stream_is_one_object_per_line_as_it_arrives(recording):
    out = recording
    cli._print_stream(iter(_chunks()), as_json=True, out=out)
    lines = out.getvalue().splitlines()
    assert len(out.flushed) == 3 and [len(f.splitlines()) for f in out.flushed] == [1, 2, 3]
    objects = [json.loads(line) for line in lines]
    assert [o["text"] for o in objects] == ["Hel", "lo", " world"]
    assert [o["finish_reason"] for o in objects] == [None, None, "length"]
    assert objects[-1]["usage"] == {"prompt_tokens": 2, "generated_tokens": 3}


def test_a_stream_that_fails_midway_ends_its_line_before_the_error():
    def failing():
        yield _chunks()[0]
        raise ServerError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")

    out = io.StringIO()
    with pytest.raises(ServerError):
        cli._print_stream(failing(), as_json=False, out=out)
    assert out.getvalue() == "Hel\n"


# ---------------------------------------------------------------------------------------------------------
# `health` against the standard health service (grpcio-health-checking's, as the server uses), in process


@pytest.fixture
def health_service() -> Iterator[tuple[str, object]]:
    from concurrent import futures

    from grpc_health.v1 import health, health_pb2_grpc

    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)


def test_health_exit_code_is_0_only_when_serving(health_service):
    from grpc_health.v1 import health_pb2

    target, servicer = health_service
    status = health_pb2.HealthCheckResponse.ServingStatus
    servicer.set("", status.SERVING)
    servicer.set("docgpt", status.NOT_SERVING)
    assert run("--target", target, "health") == (0, "SERVING\n", "")
    assert run("--target", target, "health", "docgpt") == (1, "NOT_SERVING\n", "")
    code, out, _ = run("--target", target, "health", "docgpt", "--json")
    assert code == 1 and json.loads(out) == {"service": "docgpt", "status": "NOT_SERVING"}
    servicer.enter_graceful_shutdown()  # what the server does on SIGTERM
    assert run("--target", target, "health") == (1, "NOT_SERVING\n", "")
    # The standard service answers an unknown name with a bare NOT_FOUND; the CLI says what it means.
    code, out, err = run("--target", target, "health", "unknown-model")
    assert (code, out, err) == (1, "", "error: NOT_FOUND: the server has no health service 'unknown-model'\n")
