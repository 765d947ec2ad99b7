"""Every Prometheus metric of the server, declared once.

The metrics live on a ``Metrics`` object bound to a registry rather than on the global default registry, so
that tests (and several servers in one process) each get a fresh ``CollectorRegistry``. Labels are bounded:
the model name (only names the server hosts), the RPC method, the gRPC status code name.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latencies from 1 ms to 60 s: classification batches take milliseconds, long generations take seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# A decode step or a small batch can take well under a millisecond on a tiny model.
STEP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# Batch-level metrics use these method labels (whether the request came through Generate or GenerateStream).
CLASSIFY = "Classify"
EMBED = "Embed"
CLASSIFY_TOKENS = "ClassifyTokens"
GENERATE = "Generate"


class Metrics:
    """The server's metrics, registered on `registry` (a fresh ``CollectorRegistry()`` in tests)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "nlpserve_requests",
            "Requests handled, by gRPC status code.",
            ["model", "method", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "nlpserve_request_duration_seconds",
            "Time from arrival to the last response message (or the error), by gRPC status code.",
            ["model", "method", "code"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "nlpserve_queue_duration_seconds",
            "Time a request waited before its batch (or prefill) started.",
            ["model", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_duration = Histogram(
            "nlpserve_compute_duration_seconds",
            "Time of one batch (classifiers) or one decode step "
            "(generators), tokenization and sampling included.",
            ["model", "method"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.prefill_duration = Histogram(
            "nlpserve_prefill_duration_seconds",
            "Generators: time of one prefill (a batch of prompts of similar length), sampling included.",
            ["model"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "nlpserve_batch_size",
            "Sequences per batch (classifiers) or per decode step (generators).",
            ["model", "method"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "nlpserve_queue_depth", "Requests waiting in the model's queue.", ["model"], registry=r
        )
        self.active_sequences = Gauge(
            "nlpserve_active_sequences",
            "Generators: sequences in the running decode batch.",
            ["model"],
            registry=r,
        )
        self.kv_cache_capacity = Gauge(
            "nlpserve_kv_cache_capacity_tokens",
            "Generators: tokens the KV cache holds for all sequences together (--kv-cache-tokens).",
            ["model"],
            registry=r,
        )
        self.kv_cache_reserved = Gauge(
            "nlpserve_kv_cache_reserved_tokens",
            "Generators: KV-cache tokens reserved by the admitted sequences (shared-buffer decoders: a whole "
            "slot each; others: rows times the longest prompt plus max_new_tokens). A request waits while it "
            "would take this past the capacity.",
            ["model"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "nlpserve_prompt_tokens",
            "Prompt tokens of the requests started (those reused from the KV cache too: nlpserve_prompt_tokens_cached).",
            ["model"],
            registry=r,
        )
        self.prompt_tokens_cached = Counter(
            "nlpserve_prompt_tokens_cached",
            "Prompt tokens not prefilled: their keys and values were copied from the KV cache (prefix caching).",
            ["model"],
            registry=r,
        )
        self.prompt_tokens_in_decode = Counter(
            "nlpserve_prompt_tokens_in_decode",
            "Prompt tokens prefilled inside the running streams' decode call (mixed steps), not a call of their own.",
            ["model"],
            registry=r,
        )
        self.generated_tokens = Counter(
            "nlpserve_generated_tokens",
            "Tokens generated for clients (not those of a step whose client had gone).",
            ["model"],
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "nlpserve_time_to_first_token_seconds",
            "Time from arrival to the delivery of the first generated token to the front.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "nlpserve_inter_token_latency_seconds",
            "Time between the deliveries of two tokens of one sequence to the front (0 for tokens delivered "
            "together, as when a slow client's tokens pile up).",
            ["model"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.model_info = Gauge(
            "nlpserve_model_info",
            "Models served (value 1), with the execution provider actually in use.",
            ["model", "version", "kind", "provider", "variant"],
            registry=r,
        )
