"""Llama-family models end to end: the real server on tiny exported Llama and Qwen2 checkpoints (shared-buffer
decoders), chat through their templates over gRPC, several end-of-sequence ids, and the client's chat."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from e2e_util import start

from client import Client, ServerError
from client.cli import main as cli
from client.proto import inference_pb2 as pb
from client.proto import inference_pb2_grpc
from server.process import ServerProcess

CONVERSATION = [("user", "Hello, world! How are you today?")]  # llm_util.EOS_CONVERSATION


@pytest.fixture(scope="module")
def llm_srv(llm_repo: Path) -> Iterator[ServerProcess]:
    with start(llm_repo) as running:
        yield running


@pytest.fixture(scope="module")
def stub(llm_srv: ServerProcess) -> Iterator[inference_pb2_grpc.InferenceServiceStub]:
    with grpc.insecure_channel(llm_srv.target) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


def checkpoint_facts(llm_checkpoints: dict[str, Path], arch: str) -> dict:
    return json.loads((llm_checkpoints[arch] / "nlpserve-test.json").read_text())


def chat_request(model: str, messages=CONVERSATION, **params) -> pb.GenerateRequest:
    request = pb.GenerateRequest(model=model, parameters=pb.GenerationParameters(**params))
    for role, content in messages:
        request.messages.add(role=role, content=content)
    return request


@pytest.mark.parametrize("model,arch", [("tinyllama", "llama"), ("tinyqwen", "qwen2")])
def test_chat_stops_at_the_second_end_of_sequence_id(stub, llm_checkpoints, model: str, arch: str) -> None:
    facts = checkpoint_facts(llm_checkpoints, arch)
    reply = stub.Generate(chat_request(model, max_new_tokens=20))
    assert reply.finish_reason == pb.FINISH_REASON_EOS
    # PyTorch's greedy answer through transformers' own template, up to and with its second EOS id.
    assert list(reply.token_ids) == facts["answer_ids"]
    assert reply.token_ids[-1] == facts["eos_ids"][1]
    assert reply.usage.prompt_tokens == len(facts["prompt_ids"])


def test_chat_stream_equals_unary(stub) -> None:
    unary = stub.Generate(chat_request("tinyllama", max_new_tokens=20))
    chunks = list(stub.GenerateStream(chat_request("tinyllama", max_new_tokens=20)))
    assert "".join(c.text for c in chunks) == unary.text
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    assert chunks[-1].finish_reason == pb.FINISH_REASON_EOS


def test_prompt_generation_and_model_info(stub) -> None:
    reply = stub.Generate(pb.GenerateRequest(model="tinyqwen", prompt="The quick brown fox",
                                             parameters=pb.GenerationParameters(max_new_tokens=5)))
    assert reply.usage.generated_tokens >= 1
    info = stub.GetModel(pb.GetModelRequest(name="tinyllama"))
    assert info.chat and info.architecture == "llama"
    assert info.kind == pb.MODEL_KIND_GENERATOR and info.limits.max_sequence_length == 256


@pytest.mark.parametrize(
    "request_, field",
    [
        (pb.GenerateRequest(model="tinyllama", prompt="x", messages=[pb.ChatMessage(role="user", content="y")]),
         "messages"),
        (pb.GenerateRequest(model="tinyllama"), "prompt"),
    ],
)
def test_bad_chat_requests_name_the_field(stub, request_, field: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(request_)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details()


def test_client_chat_and_cli(llm_srv: ServerProcess, llm_checkpoints) -> None:
    facts = checkpoint_facts(llm_checkpoints, "llama")
    with Client(llm_srv.target) as client:
        answer = client.chat([{"role": "user", "content": CONVERSATION[0][1]}], model="tinyllama", max_new_tokens=20)
        streamed = "".join(c.text for c in client.chat_stream(CONVERSATION, model="tinyllama", max_new_tokens=20))
    assert list(answer.token_ids) == facts["answer_ids"] and streamed == answer.text
    out, err = io.StringIO(), io.StringIO()
    code = cli(["--target", llm_srv.target, "chat", "--model", "tinyllama", CONVERSATION[0][1],
                "--max-new-tokens", "20"], stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    assert out.getvalue() == answer.text + "\n"


def test_cli_interactive_chat_keeps_the_conversation(llm_srv: ServerProcess) -> None:
    with Client(llm_srv.target) as client:
        first = client.chat([("user", "Hello")], model="tinyllama", max_new_tokens=8).text
        second = client.chat([("user", "Hello"), ("assistant", first), ("user", "And you?")], model="tinyllama",
                             max_new_tokens=8).text
    out, err = io.StringIO(), io.StringIO()
    code = cli(["--target", llm_srv.target, "chat", "-i", "--model", "tinyllama", "--max-new-tokens", "8"],
               stdout=out, stderr=err, stdin=io.StringIO("Hello\n\nAnd you?\n"))
    assert code == 0, err.getvalue()
    assert out.getvalue() == f"{first}\n{second}\n"


def test_cli_chat_without_message_is_a_usage_error(llm_srv: ServerProcess) -> None:
    err = io.StringIO()
    assert cli(["--target", llm_srv.target, "chat", "--model", "tinyllama"], stdout=io.StringIO(), stderr=err) == 2
    assert "MESSAGE" in err.getvalue()


def test_cli_interactive_chat_survives_a_failed_turn(llm_srv: ServerProcess) -> None:
    out, err = io.StringIO(), io.StringIO()
    too_long = "Hello, world! " * 200  # past the tiny model's context of 256 tokens
    code = cli(["--target", llm_srv.target, "chat", "-i", "--model", "tinyllama", "--max-new-tokens", "4"],
               stdout=out, stderr=err, stdin=io.StringIO(f"{too_long}\nHello\n"))
    assert code == 1
    assert err.getvalue().startswith("error: INVALID_ARGUMENT: messages: ") and err.getvalue().count("\n") == 1
    with Client(llm_srv.target) as client:  # the failed turn was left out of the conversation
        assert out.getvalue() == client.chat([("user", "Hello")], model="tinyllama", max_new_tokens=4).text + "\n"


def test_a_single_cache_slot_serves(llm_repo: Path) -> None:
    with start(llm_repo, "--max-active-sequences", "1") as one, Client(one.target) as client:
        answers = [client.chat(CONVERSATION, model="tinyllama", max_new_tokens=20) for _ in range(3)]
    assert len({tuple(a.token_ids) for a in answers}) == 1


def test_device_sampling_gives_the_same_answers(llm_srv: ServerProcess, llm_repo: Path) -> None:
    # The sampling head (on the CPU provider here, as on a GPU by default): greedy, top-k and top-p sampled with
    # a seed, and a penalty (a host copy), the same tokens and log-probabilities as the host's sampler.
    asks = [{}, {"temperature": 0.9, "top_k": 20, "top_p": 0.9, "seed": 3}, {"temperature": 0.7, "seed": 4},
            {"repetition_penalty": 1.3, "temperature": 0.8, "top_k": 10, "seed": 5}]

    def answers(target: str) -> list:
        with Client(target) as client:
            return [(a.token_ids, a.logprobs) for a in (
                client.chat(CONVERSATION, model="tinyllama", max_new_tokens=16, logprobs=True, **ask) for ask in asks)]

    with start(llm_repo, "--device-sampling", "on") as head:
        assert answers(head.target) == answers(llm_srv.target)
        assert "decode steps rank their logits on CPUExecutionProvider (the sampling head)" in head.logs()
    assert "the sampling head" not in llm_srv.logs()  # auto: on a GPU only


def test_kv_cache_tokens_are_reported_and_bound_sequences(llm_repo: Path) -> None:
    # 2 sequences in 256 tokens: slots of 128 tokens, less than the tiny model's context of 256.
    from e2e_util import sample, scrape

    with start(llm_repo, "--max-active-sequences", "2", "--kv-cache-tokens", "256") as srv, Client(
        srv.target
    ) as client:
        info = client.get_model("tinyllama")
        assert (info.limits.max_sequence_length, info.limits.kv_cache_tokens) == (128, 256)
        assert info.limits.max_new_tokens == 127
        assert sample(scrape(srv), "nlpserve_kv_cache_capacity_tokens", model="tinyllama") == 256
        answer = client.chat(CONVERSATION, model="tinyllama", max_new_tokens=20)
        assert answer.usage.generated_tokens >= 1
        with pytest.raises(ServerError) as refused:
            client.chat([("user", "Hello, world! " * 20)], model="tinyllama", max_new_tokens=100)
    assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "tokens one sequence may hold in the KV cache of 256" in refused.value.details


def test_a_kv_cache_too_small_for_a_sequence_is_a_start_up_error(llm_repo: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "server", "--models", str(llm_repo), "--port", "0", "--metrics-port", "-1",
         "--http-port", "-1", "--max-active-sequences", "4", "--kv-cache-tokens", "7"],
        capture_output=True, text=True, timeout=180, check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "a KV cache of 7 tokens leaves each of its 4 sequences (max_active_sequences) 1 tokens" in result.stderr
    # The smallest cache that fits: slots of 2 tokens (the warm-up stays within them).
    with start(llm_repo, "--max-active-sequences", "4", "--kv-cache-tokens", "8") as srv, Client(srv.target) as client:
        limits = client.get_model("tinyllama").limits
        assert (limits.max_sequence_length, limits.max_new_tokens, limits.kv_cache_tokens) == (2, 1, 8)


def test_prefix_caching_gives_the_same_answers_and_is_counted(llm_srv: ServerProcess, llm_repo: Path) -> None:
    # Chats with one system prompt: on the default server the later ones start from what the first's prompt left
    # in the KV cache (counted in nlpserve_prompt_tokens_cached_total); the answers are those of a server
    # without prefix caching.
    from e2e_util import sample, scrape

    system = ("system", "You are a careful assistant. You answer every question in one short sentence.")
    chats = [[system, ("user", question)] for question in ("Hello, world!", "How are you today?", "Two and two?")]

    def answers(target: str) -> list:
        with Client(target) as client:
            return [tuple(client.chat(chat, model="tinyllama", max_new_tokens=12).token_ids) for chat in chats]

    before = sample(scrape(llm_srv), "nlpserve_prompt_tokens_cached_total", model="tinyllama")
    cached = answers(llm_srv.target)
    reused = sample(scrape(llm_srv), "nlpserve_prompt_tokens_cached_total", model="tinyllama") - before
    assert reused >= 2 * 10  # the system prompt's tokens, at least, for the second and third chats
    with start(llm_repo, "--prefix-caching", "off") as plain:
        assert answers(plain.target) == cached
        assert sample(scrape(plain), "nlpserve_prompt_tokens_cached_total", model="tinyllama") == 0


def test_mixed_steps_share_one_thread_pool_and_give_the_same_answers(llm_srv: ServerProcess, llm_repo: Path) -> None:
    # tinyllama's export wrote a mixed-step graph: the default server loads it beside model.onnx, and every
    # session of the process runs on one shared pool of spinning threads. Chats sent together (some of them
    # prefilled inside another's decode call, as they happen to arrive) get the answers of a server without
    # mixed steps, which keeps a thread pool per session.
    from concurrent.futures import ThreadPoolExecutor

    from e2e_util import scrape

    system = ("system", "You are a careful assistant. You answer every question in one short sentence.")
    chats = [[system, ("user", f"Question number {i}: what is {i} and {i}?")] for i in range(8)]

    def answers(target: str) -> list:
        with Client(target) as client, ThreadPoolExecutor(len(chats)) as pool:
            return list(pool.map(lambda c: tuple(client.chat(c, model="tinyllama", max_new_tokens=16).token_ids), chats))

    together = answers(llm_srv.target)
    assert "every session shares one pool of" in llm_srv.logs()
    assert ("nlpserve_prompt_tokens_in_decode_total", (("model", "tinyllama"),)) in scrape(llm_srv)
    with start(llm_repo, "--mixed-steps", "off") as plain:
        assert answers(plain.target) == together
        assert "every session shares one pool of" not in plain.logs()
