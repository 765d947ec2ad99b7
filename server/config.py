"""Settings of the server: a frozen dataclass, filled from command-line flags, then environment variables
(``NLPSERVE_<FLAG>``, e.g. ``NLPSERVE_METRICS_PORT``), then defaults. Per-model batching settings that are left
unset here come from the model's ``config.json``.

This module imports nothing heavy: ``python -m server --help`` and logging set-up come before ONNX Runtime loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os
from collections.abc import Mapping, Sequence
from dataclasses import field
from pathlib import Path
from typing import Any

ENV_PREFIX = "NLPSERVE_"


class ArenaExtend(str, enum.Enum):
    """How ONNX Runtime's CUDA memory arena grows (its `arena_extend_strategy`)."""

    SAME_AS_REQUESTED = "kSameAsRequested"
    NEXT_POWER_OF_TWO = "kNextPowerOfTwo"


class Device(str, enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"
    TENSORRT = "tensorrt"


class DeviceSampling(str, enum.Enum):
    """Where a decode step's logits are ranked for sampling (server/generation/sampling_head.py)."""

    AUTO = "auto"  # on the model's device when it is a GPU
    ON = "on"  # also on the CPU provider (the same path; for tests and comparisons)
    OFF = "off"  # on the host, after copying the logits

    @property
    def enabled(self) -> bool | None:
        return None if self is DeviceSampling.AUTO else self is DeviceSampling.ON


class Toggle(str, enum.Enum):
    ON = "on"
    OFF = "off"

    @property
    def on(self) -> bool:
        return self is Toggle.ON


class Spinning(str, enum.Enum):
    """Whether ONNX Runtime's intra-op threads spin while they wait for work (`session.intra_op.allow_spinning`)."""

    OFF = "off"
    GENERATORS = "generators"  # generators' sessions spin (decode steps come back to back), encoders' do not
    ON = "on"

    def spins(self, generator: bool) -> bool:
        return self is Spinning.ON or (self is Spinning.GENERATORS and generator)


class Variant(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"
    OPT = "opt"


class BatchPolicy(str, enum.Enum):
    # Start a batch as soon as the model is idle; requests gather while a batch runs (no tuning needed).
    ADAPTIVE = "adaptive"
    # Triton-style: hold a batch open until it is full or its oldest request waited max_queue_delay_ms.
    FIXED = "fixed"


class GraphOptimization(str, enum.Enum):
    DISABLED = "disabled"
    BASIC = "basic"
    EXTENDED = "extended"
    ALL = "all"


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the server process can be told. ``None`` means "the model's config.json decides"."""

    models: Path = field(
        default=None,
        metadata=_help("the model repository (one folder per model, one sub-folder per version)"),
    )
    host: str = field(default="0.0.0.0", metadata=_help("address to listen on"))
    port: int = field(default=50051, metadata=_help("gRPC port (0 picks a free one)"))
    metrics_port: int = field(
        default=8000, metadata=_help("Prometheus /metrics HTTP port (0 picks a free one; -1 disables)")
    )
    http_port: int = field(
        default=8080,
        metadata=_help("OpenAI-compatible HTTP API port, /v1/... (0 picks a free one; -1 disables)"),
    )
    device: Device = field(
        default=Device.AUTO,
        metadata=_help("execution provider to use; cuda and tensorrt fail at start-up when not active"),
    )
    variant: Variant | None = field(
        default=None,
        metadata=_help(
            "model file variant; unset: each model's own default (config.json `onnx.default_variant`, else "
            "fp32); a model without the asked variant falls back to fp32 (logged)"
        ),
    )
    intra_op_threads: int = field(
        default=0, metadata=_help("ONNX Runtime intra-op threads per session (0: ONNX Runtime's default)")
    )
    intra_op_spinning: Spinning = field(
        default=Spinning.GENERATORS,
        metadata=_help(
            "ONNX Runtime's intra-op threads spin while they wait for work: generators (their decode steps "
            "come back to back; on 2 Intel cores SmolLM2 int4 gained 39%% at 1 stream and 15%% at 16); off "
            "(they sleep, leaving the CPU to other processes); on (every model)"
        ),
    )
    graph_optimization: GraphOptimization = field(
        default=GraphOptimization.ALL, metadata=_help("ONNX Runtime graph optimization level")
    )
    max_batch_size: int | None = field(
        default=None, metadata=_help("classifiers: sequences per batch (overrides config.json)")
    )
    max_queue_delay_ms: float | None = field(
        default=None, metadata=_help("classifiers: upper bound on a request's wait for its batch")
    )
    batch_policy: BatchPolicy = field(
        default=BatchPolicy.ADAPTIVE, metadata=_help("classifiers: batching policy")
    )
    max_queue_size: int | None = field(
        default=None, metadata=_help("requests waiting per model; past it RESOURCE_EXHAUSTED")
    )
    max_active_sequences: int | None = field(
        default=None, metadata=_help("generators: sequences decoded together")
    )
    kv_cache_tokens: int | None = field(
        default=None,
        metadata=_help(
            "generators: tokens the KV cache holds, all sequences together (default: max_active_sequences "
            "times the context). Shared-buffer decoders allocate it at start, one slot per sequence: less "
            "than that default shortens every sequence; others bound their batch by it. Requests wait for room"
        ),
    )
    cuda_device_id: int = field(default=0, metadata=_help("CUDA and TensorRT: the GPU to run on"))
    cuda_memory_limit_mb: int = field(
        default=0, metadata=_help("CUDA: the most memory ONNX Runtime's arena may take, in MiB (0: no limit)")
    )
    cuda_arena_extend_strategy: ArenaExtend = field(
        default=ArenaExtend.SAME_AS_REQUESTED,
        metadata=_help(
            "CUDA: how the memory arena grows (kSameAsRequested: by what a run asks for, so the cache and the "
            "batches do not round up to powers of two; kNextPowerOfTwo: ONNX Runtime's default)"
        ),
    )
    stream_interval: int = field(
        default=1,
        metadata=_help(
            "generators: tokens per streamed message (1: each token as it comes; more: fewer, larger messages; the "
            "first token and the last message go at once)"
        ),
    )
    prefill_chunk_tokens: int = field(
        default=512,
        metadata=_help(
            "shared-buffer generators: prompt tokens prefilled per decode step, so that a long prompt delays "
            "the running streams by one chunk at most (0: each prompt whole)"
        ),
    )
    prefix_caching: Toggle = field(
        default=Toggle.ON,
        metadata=_help(
            "shared-buffer generators with chunked prefill: a prompt that begins with tokens a KV-cache slot "
            "holds (a shared system prompt, an earlier turn) gets their keys and values copied from there and "
            "is prefilled from there on; slots keep a finished prompt's until reused"
        ),
    )
    mixed_steps: Toggle = field(
        default=Toggle.ON,
        metadata=_help(
            "shared-buffer generators exported with a mixed-step graph: a prompt of up to 256 tokens is "
            "prefilled in the running streams' decode call, not a call of its own (one read of the weights for "
            "both; a second session on the same file). off: each prefill alone"
        ),
    )
    device_sampling: DeviceSampling = field(
        default=DeviceSampling.AUTO,
        metadata=_help(
            "shared-buffer generators: rank each decode step's logits on the model's device (a second small "
            "graph: TopK), so that only each row's top candidates cross to the host; the same tokens either "
            "way. auto: on a GPU; on: also on the CPU; off: on the host"
        ),
    )
    max_texts_per_request: int = field(default=256, metadata=_help("classifiers: texts per Classify request"))
    max_message_bytes: int = field(
        default=4 * 1024 * 1024, metadata=_help("largest gRPC message received or sent")
    )
    grace_seconds: float = field(
        default=30.0, metadata=_help("on SIGTERM/SIGINT, how long in-flight requests may take to finish")
    )
    drain_delay_seconds: float = field(
        default=0.0,
        metadata=_help(
            "on SIGTERM/SIGINT, keep serving this long while health reports NOT_SERVING, so that load balancers "
            "stop sending new calls before the server refuses them"
        ),
    )
    unread_stream_seconds: float = field(
        default=30.0,
        metadata=_help(
            "a stream whose client reads nothing for this long ends with RESOURCE_EXHAUSTED (its sequence "
            "freed): unread streams hold neither slots nor a graceful stop"
        ),
    )
    ready_file: Path | None = field(
        default=None,
        metadata=_help("write {grpc_port, metrics_port, http_port, pid} as JSON here once SERVING"),
    )
    log_level: str = field(default="INFO", metadata=_help("DEBUG, INFO, WARNING or ERROR"))
    # TLS and API keys (server/security.py). The keys themselves never come from a flag, whose value would
    # show in `ps`: from --api-keys-file or the environment variable NLPSERVE_API_KEYS.
    tls_cert: Path | None = field(
        default=None,
        metadata=_help("TLS on the gRPC, HTTP and metrics ports: the server's certificate chain (PEM)"),
    )
    tls_key: Path | None = field(
        default=None, metadata=_help("the private key of --tls-cert (PEM, unencrypted)")
    )
    tls_client_ca: Path | None = field(
        default=None,
        metadata=_help("mTLS: require client certificates signed by one of these CA certificates (PEM)"),
    )
    api_keys_file: Path | None = field(
        default=None,
        metadata=_help(
            "require `authorization: Bearer KEY` on every call, KEY one of this file's lines (blank lines "
            "and # comments ignored); keys can also come from NLPSERVE_API_KEYS (comma-separated)"
        ),
    )
    open_services: str = field(
        default="grpc.health.v1.Health",
        metadata=_help(
            "with API keys: the gRPC services callable without a key, full names, comma-separated ('none': "
            "every service needs one); the metrics port never needs a key"
        ),
    )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _converter(opt: dataclasses.Field) -> Any:
    """The callable that turns a flag's (or environment variable's) text into the field's type."""
    kind = opt.type.replace(" | None", "") if isinstance(opt.type, str) else opt.type
    return {
        "Path": Path,
        "int": int,
        "float": float,
        "str": str,
        "ArenaExtend": ArenaExtend,
        "DeviceSampling": DeviceSampling,
        "Spinning": Spinning,
        "Toggle": Toggle,
        "Device": Device,
        "Variant": Variant,
        "BatchPolicy": BatchPolicy,
        "GraphOptimization": GraphOptimization,
    }[kind]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="The nlpserve gRPC model server. Every flag can also be set with an environment variable "
        f"{ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}METRICS_PORT=9000); flags win over the environment.",
        # No abbreviations: `--api-keys SECRET` would otherwise be taken for --api-keys-file, and the "file
        # name" (the key) echoed in the error.
        allow_abbrev=False,
    )
    for opt in dataclasses.fields(Settings):
        conv = _converter(opt)
        kwargs: dict[str, Any] = {"dest": opt.name, "default": None, "help": opt.metadata["help"]}
        if issubclass(conv, enum.Enum):
            kwargs["choices"] = [m.value for m in conv]
        else:
            kwargs["type"] = conv
        kwargs["help"] += f" [env {_env_name(opt.name)}"
        kwargs["help"] += f", default {_show(opt.default)}]" if opt.default is not None else "]"
        parser.add_argument(_flag(opt.name), **kwargs)
    return parser


def _show(value: Any) -> str:
    return value.value if isinstance(value, enum.Enum) else str(value)


def load_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Flags first, then ``NLPSERVE_*`` environment variables, then defaults. Exits (argparse) on bad values."""
    parser = build_parser()
    args = parser.parse_args(argv)
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for opt in dataclasses.fields(Settings):
        conv = _converter(opt)
        raw = getattr(args, opt.name)
        source = _flag(opt.name)
        if raw is None and environ.get(_env_name(opt.name), "") != "":
            raw, source = environ[_env_name(opt.name)], _env_name(opt.name)
        if raw is None:
            continue
        try:
            values[opt.name] = conv(raw)
        except ValueError as exc:
            parser.error(f"{source}: {exc}")
    if "models" not in values:
        parser.error(f"--models (or {_env_name('models')}) is required")
    settings = Settings(**values)
    _check(settings, parser)
    return settings


def _check(s: Settings, parser: argparse.ArgumentParser) -> None:
    problems = []
    if not 0 <= s.port <= 65535:
        problems.append("--port must be in 0..65535")
    if not -1 <= s.metrics_port <= 65535:
        problems.append("--metrics-port must be in -1..65535")
    if not -1 <= s.http_port <= 65535:
        problems.append("--http-port must be in -1..65535")
    for name in ("max_batch_size", "max_queue_size", "max_active_sequences", "kv_cache_tokens"):
        value = getattr(s, name)
        if value is not None and value < 1:
            problems.append(f"{_flag(name)} must be at least 1")
    for name, least in (
        ("cuda_device_id", 0), ("cuda_memory_limit_mb", 0), ("stream_interval", 1), ("prefill_chunk_tokens", 0)
    ):
        if getattr(s, name) < least:
            problems.append(f"{_flag(name)} must be {'0 or more' if least == 0 else f'at least {least}'}")
    if s.max_queue_delay_ms is not None and not s.max_queue_delay_ms >= 0:
        problems.append("--max-queue-delay-ms must be 0 or more")
    if s.intra_op_threads < 0:
        problems.append("--intra-op-threads must be 0 or more")
    if s.max_texts_per_request < 1:
        problems.append("--max-texts-per-request must be at least 1")
    if s.max_message_bytes < 1024:
        problems.append("--max-message-bytes must be at least 1024")
    if not s.grace_seconds >= 0:
        problems.append("--grace-seconds must be 0 or more")
    if not s.drain_delay_seconds >= 0:
        problems.append("--drain-delay-seconds must be 0 or more")
    if not s.unread_stream_seconds > 0:
        problems.append("--unread-stream-seconds must be more than 0")
    if s.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        problems.append("--log-level must be DEBUG, INFO, WARNING or ERROR")
    if (s.tls_cert is None) != (s.tls_key is None):
        problems.append("--tls-cert and --tls-key go together")
    if s.tls_client_ca is not None and s.tls_cert is None:
        problems.append("--tls-client-ca needs --tls-cert and --tls-key (mTLS is TLS with client certs)")
    if problems:
        parser.error("; ".join(problems))
