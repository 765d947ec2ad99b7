"""The load generator: asyncio gRPC on the raw stubs (the least client overhead), closed-loop concurrency and
open-loop constant rates against a running server, with the server's own figures read from /metrics; and chat
streams through the project's own `AsyncClient` (`chat_closed_loop`, the Llama-family comparison).

Each measurement has a warm-up that is not counted, then a window that lasts at least `duration_s` and until at
least `min_requests` requests completed in it (at most `max_duration_s`). Throughput counts what completed
inside the window; latencies are those of the requests that completed inside it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from bench.stats import latency_summary
from client.aio import AsyncClient
from client.errors import ServerError
from client.proto import inference_pb2 as pb
from client.proto import inference_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

clock = time.perf_counter

# One connection carries every concurrent request, as one client process would; no message size limits.
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]

# Open loop: requests still waiting beyond this many are not sent (counted as `dropped`), so that an overloaded
# server cannot make the load generator itself run out of memory.
MAX_OUTSTANDING = 2048


@dataclass(frozen=True)
class Window:
    """How long to warm up and to measure one point."""

    warmup_s: float = 2.0
    duration_s: float = 5.0
    min_requests: int = 200
    max_duration_s: float = 30.0


# ------------------------------------------------------------------------------------------------- /metrics


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str | None, timeout: float = 10.0) -> Samples:
    """Every sample of the server's /metrics, keyed by (sample name, sorted labels); empty when `url` is None."""
    if url is None:
        return {}
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode("utf-8")
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample_sum(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(value for (n, ls), value in samples.items() if n == name and wanted <= set(ls))


def histogram_mean(before: Samples, after: Samples, name: str, **labels: str) -> float | None:
    """The mean of what a histogram observed between two scrapes (None when it observed nothing)."""
    count = sample_sum(after, f"{name}_count", **labels) - sample_sum(before, f"{name}_count", **labels)
    total = sample_sum(after, f"{name}_sum", **labels) - sample_sum(before, f"{name}_sum", **labels)
    return round(total / count, 3) if count > 0 else None


async def scrape_async(url: str | None) -> Samples:
    return await asyncio.to_thread(scrape, url)


async def wait_idle(url: str | None, model: str, timeout: float = 15.0) -> None:
    """Waits until the server has no active sequence and nothing queued for `model` (cancelled streams are freed
    at the server's next step), so that the next measurement starts from an idle server."""
    if url is None:
        return
    deadline = clock() + timeout
    while clock() < deadline:
        samples = await scrape_async(url)
        busy = sample_sum(samples, "nlpserve_active_sequences", model=model) + sample_sum(
            samples, "nlpserve_queue_depth", model=model
        )
        if busy <= 0:
            return
        await asyncio.sleep(0.05)
    logger.warning("server still busy with %s after %.0f s", model, timeout)


# ------------------------------------------------------------------------------------------- the window


@dataclass
class _Measuring:
    start: float | None = None
    end: float | None = None
    completed: int = 0
    stop: bool = False

    def inside(self, t: float) -> bool:
        return self.start is not None and t >= self.start and (self.end is None or t <= self.end)


def cpu_seconds(pid: int | None = None) -> float | None:
    """CPU time (user + system) a process has used so far: this one when `pid` is None (None if unreadable)."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """The share of one CPU the load generator (this process) and the server used during the window: on a small
    machine the client's own cost is part of the picture."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self.start = (clock(), cpu_seconds(), cpu_seconds(server_pid) if server_pid else None)

    def stop(self) -> dict[str, float | None]:
        t0, client0, server0 = self.start
        seconds = clock() - t0
        client1 = cpu_seconds()
        server1 = cpu_seconds(self.server_pid) if self.server_pid else None
        return {
            "client_cpu_percent": round(100 * (client1 - client0) / seconds, 1) if client0 is not None else None,
            "server_cpu_percent": (round(100 * (server1 - server0) / seconds, 1)
                                   if server0 is not None and server1 is not None else None),
        }


async def _run_window(
    state: _Measuring, window: Window, metrics_url: str | None, server_pid: int | None = None
) -> tuple[Samples, Samples, dict[str, float | None]]:
    """Warms up, opens the window, keeps it open as long as `window` asks, closes it; returns the two scrapes
    and the CPU shares of client and server during the window."""
    await asyncio.sleep(window.warmup_s)
    before = await scrape_async(metrics_url)
    meter = CpuMeter(server_pid)
    state.start = clock()
    while True:
        await asyncio.sleep(0.05)
        elapsed = clock() - state.start
        enough = elapsed >= window.duration_s and state.completed >= window.min_requests
        if enough or elapsed >= window.max_duration_s:
            break
    state.end = clock()
    cpu = meter.stop()
    after = await scrape_async(metrics_url)
    state.stop = True
    return before, after, cpu


# ---------------------------------------------------------------------------------------- classification


def classify_requests(model: str, texts: Sequence[str], texts_per_request: int = 1) -> list[pb.ClassifyRequest]:
    """The requests to send, built once before the clock starts."""
    k = texts_per_request
    return [pb.ClassifyRequest(model=model, texts=list(texts[i : i + k])) for i in range(0, len(texts) - k + 1, k)]


async def classify_closed_loop(
    target: str,
    requests: Sequence[pb.ClassifyRequest],
    concurrency: int,
    window: Window,
    metrics_url: str | None = None,
    server_pid: int | None = None,
) -> dict[str, Any]:
    """`concurrency` clients each send a request as soon as their previous one came back."""
    model = requests[0].model
    state = _Measuring()
    latencies: list[float] = []
    codes: Counter[str] = Counter()
    sequences = 0
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        await channel.channel_ready()
        stub = pb_grpc.InferenceServiceStub(channel)

        async def client(index: int) -> None:
            nonlocal sequences
            k = index
            while not state.stop:
                request = requests[k % len(requests)]
                k += concurrency
                t0 = clock()
                try:
                    await stub.Classify(request)
                    code = "OK"
                except grpc.aio.AioRpcError as e:
                    code = e.code().name
                t1 = clock()
                if state.inside(t1):
                    codes[code] += 1
                    if code == "OK":
                        latencies.append(t1 - t0)
                        sequences += len(request.texts)
                        state.completed += 1

        clients = [asyncio.create_task(client(i)) for i in range(concurrency)]
        before, after, cpu = await _run_window(state, window, metrics_url, server_pid)
        await asyncio.gather(*clients)
    assert state.start is not None and state.end is not None
    seconds = state.end - state.start
    return {
        "concurrency": concurrency,
        "window_s": round(seconds, 3),
        "requests": state.completed,
        "codes": dict(codes),
        "sequences_per_s": round(sequences / seconds, 2),
        "latency_ms": latency_summary(latencies),
        "mean_batch_size": histogram_mean(before, after, "nlpserve_batch_size", model=model, method="Classify"),
        "server_queue_ms": _ms(histogram_mean(before, after, "nlpserve_queue_duration_seconds", model=model)),
        "server_compute_ms_per_batch": _ms(
            histogram_mean(before, after, "nlpserve_compute_duration_seconds", model=model, method="Classify")
        ),
        **cpu,
        "load_average": round(os.getloadavg()[0], 2),
    }


async def classify_open_loop(
    target: str,
    requests: Sequence[pb.ClassifyRequest],
    rate: float,
    window: Window,
    metrics_url: str | None = None,
) -> dict[str, Any]:
    """Requests sent at a constant `rate` per second whatever the server does; a request's latency counts from
    when it was due to be sent, so a server that falls behind shows it (no coordinated omission)."""
    model = requests[0].model
    latencies: list[float] = []
    codes: Counter[str] = Counter()
    dropped = 0
    outstanding: set[asyncio.Task[None]] = set()
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        await channel.channel_ready()
        stub = pb_grpc.InferenceServiceStub(channel)
        start = clock() + 0.01
        window_start = start + window.warmup_s
        window_end = window_start + window.duration_s

        async def send(request: pb.ClassifyRequest, due: float) -> None:
            try:
                await stub.Classify(request)
                code = "OK"
            except grpc.aio.AioRpcError as e:
                code = e.code().name
            if due >= window_start:
                codes[code] += 1
                if code == "OK":
                    latencies.append(clock() - due)

        async def scrape_at_window_start() -> Samples:
            await asyncio.sleep(max(0.0, window_start - clock()))
            return await scrape_async(metrics_url)

        first_scrape = asyncio.create_task(scrape_at_window_start())
        i = 0
        while True:
            due = start + i / rate
            if due >= window_end:
                break
            wait = due - clock()
            if wait > 0:
                await asyncio.sleep(wait)
            if len(outstanding) >= MAX_OUTSTANDING:
                dropped += due >= window_start
            else:
                task = asyncio.create_task(send(requests[i % len(requests)], due))
                outstanding.add(task)
                task.add_done_callback(outstanding.discard)
            i += 1
        await asyncio.gather(*outstanding)
        before = await first_scrape
        after = await scrape_async(metrics_url)
    ok = codes.get("OK", 0)
    return {
        "rate": rate,
        "window_s": window.duration_s,
        "sent": sum(codes.values()),
        "dropped": dropped,
        "codes": dict(codes),
        "sequences_per_s": round(ok * len(requests[0].texts) / window.duration_s, 2),
        "latency_ms": latency_summary(latencies),
        "mean_batch_size": histogram_mean(before, after, "nlpserve_batch_size", model=model, method="Classify"),
        "load_average": round(os.getloadavg()[0], 2),
    }


# -------------------------------------------------------------------------------------------- generation


@dataclass
class _Stream:
    """What one GenerateStream call did: when it was sent, when each token-bearing message arrived."""

    sent: float
    arrivals: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    done: float | None = None
    code: str = "OK"
    server_ttft: float | None = None  # the server's own figure, from the last message's timings


def generate_request(model: str, prompt: str, max_new_tokens: int, **sampling: Any) -> pb.GenerateRequest:
    """Greedy decoding of exactly what is asked (greedy: the same work for every run), or with `sampling`
    (temperature, top_k, top_p, seed: GenerationParameters' fields)."""
    return pb.GenerateRequest(
        model=model,
        prompt=prompt,
        parameters=pb.GenerationParameters(max_new_tokens=max_new_tokens, **{"temperature": 0.0, **sampling}),
    )


async def generate_closed_loop(
    target: str,
    requests: Sequence[pb.GenerateRequest],
    streams: int,
    window: Window,
    metrics_url: str | None = None,
    server_pid: int | None = None,
) -> dict[str, Any]:
    """`streams` clients each open a GenerateStream as soon as their previous one ended.

    Aggregate tokens/s counts the tokens that arrived inside the window; time to first token is that of the
    streams whose first token arrived inside it (so that streams queued behind others count); inter-token latency is the gap before each token-bearing message, shared among the
    tokens it carries; per-stream tokens/s is generated tokens over the stream's whole time, for the streams
    that ended inside the window. Streams still open when the window closes are cancelled.
    """
    model = requests[0].model
    state = _Measuring()
    done: list[_Stream] = []
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        await channel.channel_ready()
        stub = pb_grpc.InferenceServiceStub(channel)

        async def client(index: int) -> None:
            k = index
            while not state.stop:
                request = requests[k % len(requests)]
                k += streams
                record = _Stream(sent=clock())
                done.append(record)
                try:
                    async for message in stub.GenerateStream(request):
                        if message.token_ids:
                            record.arrivals.append(clock())
                            record.tokens.append(len(message.token_ids))
                        if message.finish_reason:
                            record.server_ttft = message.timings.time_to_first_token_seconds
                except grpc.aio.AioRpcError as e:
                    record.code = e.code().name
                record.done = clock()
                if state.inside(record.done):
                    state.completed += 1

        before, after, cpu = await _drive(client, streams, state, window, metrics_url, server_pid)
    await wait_idle(metrics_url, model)
    assert state.start is not None and state.end is not None
    return _generation_point(streams, state, done, before, after, model) | cpu


async def _drive(
    client: Callable[[int], Awaitable[None]],
    streams: int,
    state: _Measuring,
    window: Window,
    metrics_url: str | None,
    server_pid: int | None,
) -> tuple[Samples, Samples, dict[str, float | None]]:
    """Runs `streams` closed-loop clients through the measuring window, then cancels the streams still open."""
    clients = [asyncio.create_task(client(i)) for i in range(streams)]
    measured = await _run_window(state, window, metrics_url, server_pid)
    for task in clients:
        task.cancel()
    await asyncio.gather(*clients, return_exceptions=True)
    return measured


async def chat_closed_loop(
    target: str,
    model: str,
    conversations: Sequence[Sequence[dict[str, str]]],
    streams: int,
    max_new_tokens: int,
    window: Window,
    arrival_s: float = 0.0,
    metrics_url: str | None = None,
    server_pid: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """`streams` clients of the project's own `AsyncClient` (what a user's program runs, not the raw stubs),
    each starting at a random time within the first `arrival_s` seconds, then sending its next conversation
    (`chat_stream`: the server applies the model's chat template) as soon as the previous one ended; greedy,
    `max_new_tokens` each. The figures are those of `generate_closed_loop`; `mean_generated_tokens` says how
    many tokens the streams that ended in the window generated (fewer than asked when the model ended a
    sequence on its end-of-sequence token)."""
    state = _Measuring()
    done: list[_Stream] = []
    rng = random.Random(seed)
    starts = [rng.uniform(0.0, arrival_s) if streams > 1 else 0.0 for _ in range(streams)]
    async with AsyncClient(target, options=CHANNEL_OPTIONS) as chat:
        await chat.health()  # connected before the first stream is timed

        async def client(index: int) -> None:
            await asyncio.sleep(starts[index])
            k = index
            while not state.stop:
                messages = conversations[k % len(conversations)]
                k += streams
                record = _Stream(sent=clock())
                done.append(record)
                try:
                    async for chunk in chat.chat_stream(messages, model=model, max_new_tokens=max_new_tokens):
                        if chunk.token_ids:
                            record.arrivals.append(clock())
                            record.tokens.append(len(chunk.token_ids))
                        if chunk.timings is not None:
                            record.server_ttft = chunk.timings.time_to_first_token_seconds
                except ServerError as e:
                    record.code = e.code.name
                record.done = clock()
                if state.inside(record.done):
                    state.completed += 1

        before, after, cpu = await _drive(client, streams, state, window, metrics_url, server_pid)
    await wait_idle(metrics_url, model)
    point = _generation_point(streams, state, done, before, after, model) | cpu
    return point | {"arrival_s": arrival_s, "max_new_tokens": max_new_tokens}


def _generation_point(
    streams: int, state: _Measuring, records: list[_Stream], before: Samples, after: Samples, model: str
) -> dict[str, Any]:
    assert state.start is not None and state.end is not None
    seconds = state.end - state.start
    tokens_in_window = 0
    ttft: list[float] = []
    itl: list[float] = []
    per_stream: list[float] = []
    generated: list[int] = []
    server_ttft: list[float] = []
    codes: Counter[str] = Counter()
    for r in records:
        for i, (t, n) in enumerate(zip(r.arrivals, r.tokens)):
            if state.inside(t):
                tokens_in_window += n
                if i > 0:
                    itl.extend([(t - r.arrivals[i - 1]) / n] * n)
        if r.arrivals and state.inside(r.arrivals[0]):
            ttft.append(r.arrivals[0] - r.sent)
        if r.done is not None and state.inside(r.done) and r.code != "CANCELLED":
            codes[r.code] += 1
            if r.code == "OK" and r.tokens:
                per_stream.append(sum(r.tokens) / (r.done - r.sent))
                generated.append(sum(r.tokens))
                if r.server_ttft is not None:
                    server_ttft.append(r.server_ttft)
    return {
        "streams": streams,
        "window_s": round(seconds, 3),
        "requests": state.completed,
        "codes": dict(codes),
        "tokens_per_s": round(tokens_in_window / seconds, 2),
        "ttft_ms": latency_summary(ttft),
        # The server's time to first token (arrival to first token, its Timings): the client sees a token only
        # when its text is complete UTF-8, which random weights may delay to the end of the stream.
        "server_ttft_ms": latency_summary(server_ttft),
        "itl_ms": latency_summary(itl),
        "per_stream_tokens_per_s": round(sum(per_stream) / len(per_stream), 2) if per_stream else None,
        # fewer than max_new_tokens when a stream ended on its end-of-sequence token
        "mean_generated_tokens": round(sum(generated) / len(generated), 2) if generated else None,
        "mean_batch_size": histogram_mean(before, after, "nlpserve_batch_size", model=model, method="Generate"),
        "load_average": round(os.getloadavg()[0], 2),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)
