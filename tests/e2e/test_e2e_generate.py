"""Generate and GenerateStream end to end: the real server on port 0, raw stubs over loopback."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from e2e_util import sample, scrape, wait_streams_ended
from tokenizers import Tokenizer

from client.proto import inference_pb2 as pb

PROMPTS = ["def load(path):", "import os\n", "The quick brown fox", "class Parser:\n    def"]
LENGTH, STOP, EOS = pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP, pb.FINISH_REASON_EOS


def request(prompt: str, **params) -> pb.GenerateRequest:
    stop = params.pop("stop", ())
    return pb.GenerateRequest(prompt=prompt, parameters=pb.GenerationParameters(stop=stop, **params))


def unary(stub, prompt: str, **params) -> pb.GenerateResponse:
    return stub.Generate(request(prompt, **params), timeout=60)


def stream(stub, prompt: str, **params) -> list[pb.GenerateResponse]:
    return list(stub.GenerateStream(request(prompt, **params), timeout=60))


def status_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as exc:
        call()
    return exc.value.code(), exc.value.details()


def test_unary_generation(stub):
    r = unary(stub, PROMPTS[0], max_new_tokens=12)
    assert r.model == "docgpt" and r.model_version
    assert r.finish_reason in (LENGTH, EOS)
    assert r.usage.generated_tokens == len(r.token_ids) <= 12 and r.usage.prompt_tokens > 0
    t = r.timings
    assert 0 <= t.queue_seconds <= t.time_to_first_token_seconds <= t.total_seconds
    assert not r.logprobs


def test_stream_ends_with_the_finish_reason_and_equals_unary(stub):
    for params in ({"max_new_tokens": 30}, {"max_new_tokens": 30, "temperature": 1.0, "seed": 11}):
        messages = stream(stub, PROMPTS[2], **params)
        assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
        last = messages[-1]
        assert last.finish_reason in (LENGTH, EOS) and last.usage.generated_tokens > 0
        assert last.timings.total_seconds > 0
        whole = unary(stub, PROMPTS[2], **params)
        assert "".join(m.text for m in messages) == whole.text
        assert [t for m in messages for t in m.token_ids] == list(whole.token_ids)
        assert last.usage == whole.usage
        assert sum(len(m.token_ids) for m in messages) == last.usage.generated_tokens  # no message lost


def test_greedy_is_the_same_alone_batched_and_streamed(stub):
    params = {"max_new_tokens": 24, "repetition_penalty": 1.3}
    alone = [unary(stub, p, **params).token_ids for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS) * 2) as pool:
        unaries = [pool.submit(unary, stub, p, **params) for p in PROMPTS]
        streams = [pool.submit(stream, stub, p, **params) for p in PROMPTS]
        together = [f.result().token_ids for f in unaries]
        streamed = [[t for m in f.result() for t in m.token_ids] for f in streams]
    assert together == alone
    assert streamed == [list(a) for a in alone]


def test_seed_gives_the_same_sample_whatever_else_runs(stub):
    params = {"max_new_tokens": 24, "temperature": 1.0, "top_k": 40, "top_p": 0.9, "seed": 2024}
    first = unary(stub, PROMPTS[1], **params)
    with ThreadPoolExecutor(6) as pool:
        noise = [pool.submit(unary, stub, p, max_new_tokens=24, temperature=1.5) for p in PROMPTS]
        again = pool.submit(unary, stub, PROMPTS[1], **params)
        [f.result() for f in noise]
    assert again.result().token_ids == first.token_ids
    assert unary(stub, PROMPTS[1], **{**params, "seed": 7}).token_ids != first.token_ids


def test_stop_sequence_across_tokens_is_not_returned(stub, models):
    # Where the texts of two generated tokens meet, from the model's own tokenizer (not from the stream's
    # messages, which carry several tokens when the server joins pieces that piled up): a two-character stop
    # sequence whose first occurrence straddles such a boundary spans two tokens, with text before it. The
    # first seed whose sample has such a place is used (the sampler's draws, not the server, decide which).
    version = stub.GetModel(pb.GetModelRequest(name="docgpt"), timeout=30).version
    tokenizer = Tokenizer.from_file(str(models / "docgpt" / version / "tokenizer.json"))
    tried = []
    for seed in range(3, 23):
        params = {"max_new_tokens": 40, "temperature": 1.0, "seed": seed}
        whole = unary(stub, PROMPTS[0], **params)
        text = whole.text
        ends = [len(tokenizer.decode(list(whole.token_ids[:k]))) for k in range(1, len(whole.token_ids) + 1)]
        stop = next(
            (
                text[end - 1 : end + 1]
                for k, end in enumerate(ends[:-1])
                if 1 < end < ends[k + 1] <= len(text)  # text before it, and the next token adds some
                and tokenizer.decode(list(whole.token_ids[: k + 1])) == text[:end]
                and text.find(text[end - 1 : end + 1]) == end - 1
            ),
            None,
        )
        if stop:
            break
        tried.append(text)
    assert stop, f"no two tokens of any of {tried!r} meet where a stop sequence could span them"
    expected = text[: text.find(stop)]
    r = unary(stub, PROMPTS[0], **params, stop=["no such text", stop])
    assert r.finish_reason == STOP and r.text == expected
    streamed = stream(stub, PROMPTS[0], **params, stop=[stop])
    assert "".join(m.text for m in streamed) == expected and streamed[-1].finish_reason == STOP


def test_streamed_text_is_utf8_safe(stub):
    # The quick model's vocabulary splits rare characters into byte tokens; sampling makes broken bytes likely.
    for seed in range(4):
        params = {"max_new_tokens": 60, "temperature": 1.2, "seed": seed}
        messages = stream(stub, "日本語 😀 naïve café", **params)
        assert not any("\ufffd" in m.text for m in messages)
        assert "".join(m.text for m in messages) == unary(stub, "日本語 😀 naïve café", **params).text


def test_logprobs(stub):
    r = unary(stub, PROMPTS[3], max_new_tokens=10, temperature=0.7, seed=1, logprobs=True)
    assert len(r.logprobs) == len(r.token_ids) and all(lp <= 0 for lp in r.logprobs)
    messages = stream(stub, PROMPTS[3], max_new_tokens=10, temperature=0.7, seed=1, logprobs=True)
    assert [lp for m in messages for lp in m.logprobs] == pytest.approx(list(r.logprobs))


@pytest.mark.parametrize(
    "prompt, params, field",
    [
        ("", {}, "prompt"),
        ("x", {"temperature": -1.0}, "temperature"),
        ("x", {"temperature": float("nan")}, "temperature"),
        ("x", {"top_p": 0.0}, "top_p"),
        ("x", {"top_p": 1.01}, "top_p"),
        ("x", {"top_k": -3}, "top_k"),
        ("x", {"max_new_tokens": 0}, "max_new_tokens"),
        ("x", {"max_new_tokens": 100_000}, "max_new_tokens"),
        ("x", {"repetition_penalty": -1.0}, "repetition_penalty"),
        ("x", {"stop": [""]}, "stop[0]"),
        ("x", {"stop": [str(i) for i in range(9)]}, "stop"),
        ("word " * 1000, {}, "prompt"),
        ("word " * 20_000, {}, "prompt"),  # long enough to be tokenized off the event loop
    ],
)
@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_bad_input_gets_invalid_argument_naming_the_field(stub, method, prompt, params, field):
    call = getattr(stub, method)
    code, details = status_of(
        lambda: (
            list(call(request(prompt, **params), timeout=30))
            if method == "GenerateStream"
            else call(request(prompt, **params), timeout=30)
        )
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT and field in details


def test_prompt_too_long_names_both_numbers(stub):
    limit = stub.GetModel(pb.GetModelRequest(name="docgpt"), timeout=30).limits.max_sequence_length
    code, details = status_of(lambda: unary(stub, "word " * 40, max_new_tokens=limit - 10))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert f"max_new_tokens {limit - 10}" in details and str(limit) in details


def test_unknown_model_and_wrong_kind(stub):
    code, _ = status_of(lambda: stub.Generate(pb.GenerateRequest(model="nope", prompt="x"), timeout=30))
    assert code is grpc.StatusCode.NOT_FOUND
    code, details = status_of(
        lambda: stub.Generate(pb.GenerateRequest(model="sentiment", prompt="x"), timeout=30)
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "model" in details


def test_deadline_exceeded(stub):
    code, _ = status_of(lambda: stub.Generate(request(PROMPTS[0], max_new_tokens=100), timeout=0.001))
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert unary(stub, PROMPTS[0], max_new_tokens=2).usage.generated_tokens >= 1  # still serving


def test_cancelled_stream_frees_its_slot(stub, srv):
    limit = stub.GetModel(pb.GetModelRequest(name="docgpt"), timeout=30).limits.max_sequence_length
    max_new = limit - 8
    labels = {"model": "docgpt"}

    # Three streams cancelled after their first message. The quick model generates a stream in a fraction of a
    # second, so one may have ended (OK, every token generated) before its cancellation reached the server,
    # more likely the more loaded the machine: the round counts how each call ended, once the server has
    # counted all three, and repeats until three were cancelled mid-stream and one of its rounds generated
    # fewer tokens than its streams asked for (the bound only stops a server that never cancels).
    cancelled = 0
    left_early = False
    for _ in range(20):
        before = scrape(srv)
        calls = [stub.GenerateStream(request("hello", max_new_tokens=max_new), timeout=60) for _ in range(3)]
        for call in calls:
            next(call)  # generating (or, when its pieces were joined, already at its end)
            call.cancel()
        counted, after = wait_streams_ended(srv, before, "GenerateStream", 3)
        assert sum(counted.values()) == 3, counted  # each call ended once: cancelled, or finished first
        cancelled += counted["CANCELLED"]
        generated = sample(after, "nlpserve_generated_tokens_total", **labels) - sample(
            before, "nlpserve_generated_tokens_total", **labels
        )
        left_early |= counted["CANCELLED"] > 0 and generated < 3 * max_new  # left before their max_new_tokens
        if cancelled >= 3 and left_early:
            break
    assert cancelled >= 3 and left_early, (cancelled, left_early)
    # The slots are free: a new stream is admitted and runs to its end.
    assert unary(stub, "hello", max_new_tokens=2).usage.generated_tokens >= 1
