"""The served models: loading (session, provider check, warm-up) and the facade every front calls.

`ModelHub` is the core's entrance: it knows model names and kinds, routes a classification to the model's
batcher and a generation to its scheduler, and raises the core's own exceptions. It imports no gRPC, so the
Open Inference Protocol front can sit on it too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .batching import DynamicBatcher, WorkTimes
from .classify import ClassifierModel, EncoderModel
from .config import Settings
from .embed import EmbedderModel
from .errors import InvalidInput, ModelNotFound, Unavailable, shown
from .generation.model import MAX_STOP_SEQUENCES, make_generator
from .generation.sampling import greedy_tokens
from .generation.scheduler import GenerationScheduler
from .metrics import CLASSIFY, CLASSIFY_TOKENS, EMBED, Metrics
from .repository import (
    CLASSIFIER,
    EMBEDDER,
    ENCODERS,
    GENERATOR,
    KV_SHARED_BUFFER,
    TOKEN_CLASSIFIER,
    ModelConfig,
)
from .runtime import CudaOptions, Session, share_thread_pool, thread_pool_shared
from .token_classify import TokenClassifierModel
from .types import (
    ClassifyRequest,
    ClassifyResult,
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    GenerationChunk,
    ModelDescription,
    TokenClassifyRequest,
    TokenClassifyResult,
)

log = logging.getLogger(__name__)

CONTINUOUS = "continuous"

# Each encoder kind: its model class, the batcher's method label, and a request of given texts (warm-up).
_ENCODERS = {
    CLASSIFIER: (ClassifierModel, CLASSIFY, ClassifyRequest),
    EMBEDDER: (EmbedderModel, EMBED, EmbedRequest),
    TOKEN_CLASSIFIER: (TokenClassifierModel, CLASSIFY_TOKENS, TokenClassifyRequest),
}


@dataclass(eq=False)
class ServedModel:
    description: ModelDescription
    encoder: EncoderModel | None = None  # classifiers, embedders, token classifiers
    batcher: DynamicBatcher | None = None
    scheduler: GenerationScheduler | None = None
    session: Session | None = None
    ready: bool = False

    @property
    def name(self) -> str:
        return self.description.name


def _batching(config: ModelConfig, settings: Settings, key: str, default: float) -> float:
    """A batching setting: the server's flag or environment wins over config.json, which wins over the default."""
    value = getattr(settings, key)
    return value if value is not None else config.batching.get(key, default)


def mixed_step_file(config: ModelConfig, settings: Settings) -> Path | None:
    """The mixed-step graph (export/mixed_step.py) a shared-buffer generator is served with: its prompts'
    chunks are prefilled in the running streams' decode call (--mixed-steps off, or --prefill-chunk-tokens 0,
    turns it off)."""
    if config.kind != GENERATOR or config.kv_cache != KV_SHARED_BUFFER or not settings.mixed_steps.on:
        return None
    if settings.prefill_chunk_tokens <= 0:
        return None
    return config.mixed_step_file(config.model_file(settings.variant.value if settings.variant else None)[0])


def share_mixed_threads(configs: Sequence[ModelConfig], settings: Settings) -> None:
    """Before the first session: when a generator will be served with its mixed-step graph and generators'
    threads spin, every session of the process shares one thread pool (runtime.share_thread_pool): the two
    sessions of that generator take turns on the cores, and two spinning pools would fight over them (on 2
    cores, SmolLM2 fp32 at 16 streams: 0.88x without mixed steps against 1.11x with one pool)."""
    if settings.intra_op_spinning.spins(generator=True) and any(mixed_step_file(c, settings) for c in configs):
        share_thread_pool(settings.intra_op_threads)


def load_model(config: ModelConfig, settings: Settings, metrics: Metrics) -> ServedModel:
    """Creates the session (raising StartupError when the asked provider is not active) and the model's
    batcher or scheduler, then warms it up. Blocking: call it off the event loop."""
    variant, path = config.model_file(settings.variant.value if settings.variant else None)
    cuda = CudaOptions(
        settings.cuda_device_id, settings.cuda_memory_limit_mb, settings.cuda_arena_extend_strategy.value
    )
    spinning = settings.intra_op_spinning.spins(generator=config.kind == GENERATOR)
    mixed_path = mixed_step_file(config, settings)
    session = Session(
        path,
        settings.device,
        settings.intra_op_threads,
        settings.graph_optimization,
        cuda=cuda,
        spinning=spinning,
    )
    queue_size = int(_batching(config, settings, "max_queue_size", 1024))
    version = str(config.version)
    if config.kind in ENCODERS:
        model_class, method, request_of = _ENCODERS[config.kind]
        max_batch = int(_batching(config, settings, "max_batch_size", 32))
        delay = float(_batching(config, settings, "max_queue_delay_ms", 5.0))
        model = model_class(config, session, settings.max_texts_per_request, max_batch)
        description = ModelDescription(
            name=config.name,
            version=version,
            kind=config.kind,
            provider=session.provider,
            variant=variant,
            max_sequence_length=config.max_sequence_length,
            policy=settings.batch_policy.value,
            max_queue_size=queue_size,
            labels=config.labels,
            embedding_size=getattr(model, "embedding_size", 0),
            max_texts_per_request=settings.max_texts_per_request,
            max_batch_size=max_batch,
            max_queue_delay_ms=delay,
            architecture=str(config.architecture.get("model_type", "")),
            pooling=config.pooling if config.kind != TOKEN_CLASSIFIER else "",
            normalized=config.normalize and config.kind == EMBEDDER,
        )
        batcher = DynamicBatcher(
            model.run,
            max_batch_size=max_batch,
            max_queue_delay_ms=delay,
            max_queue_size=queue_size,
            policy=settings.batch_policy,
            size=lambda r: len(r.texts),
            name=config.name,
            method=method,
            metrics=metrics,
        )
        started = time.monotonic()
        model.warm_up(lambda texts: request_of(config.name, texts))
        served = ServedModel(description, encoder=model, batcher=batcher, session=session)
    else:
        active = int(_batching(config, settings, "max_active_sequences", 16))
        mixed = None
        if mixed_path is not None:
            mixed = Session(
                mixed_path,
                settings.device,
                settings.intra_op_threads,
                settings.graph_optimization,
                cuda=cuda,
                # Two pools that both spin take turns on the cores (in-process, 16 streams: 0.88x); without
                # the shared pool (share_mixed_threads) the second one sleeps.
                spinning=spinning and thread_pool_shared(),
            )
        model = make_generator(
            config,
            session,
            active,
            int(_batching(config, settings, "kv_cache_tokens", 0)),
            settings.device_sampling.enabled,
            mixed,
        )
        description = ModelDescription(
            name=config.name,
            version=version,
            kind=GENERATOR,
            provider=session.provider,
            variant=variant,
            max_sequence_length=model.sequence_limit,
            policy=CONTINUOUS,
            max_queue_size=queue_size,
            max_active_sequences=active,
            max_new_tokens=model.max_new_tokens,
            default_max_new_tokens=model.default_max_new_tokens,
            max_stop_sequences=MAX_STOP_SEQUENCES,
            kv_cache_tokens=model.kv_cache_tokens,
            architecture=str(config.architecture.get("model_type", "")),
            chat=model.chat_template is not None,
        )
        scheduler = GenerationScheduler(
            model,
            max_active_sequences=active,
            max_queue_size=queue_size,
            metrics=metrics,
            prefill_chunk_tokens=settings.prefill_chunk_tokens,
            stream_interval=settings.stream_interval,
            prefix_caching=settings.prefix_caching.on,
        )
        started = time.monotonic()
        # Within a sequence's limit (a short --kv-cache-tokens makes short slots): the prompt and 2 fed tokens.
        ids = (model.tokenizer.encode("warm up").ids or [0])[: max(1, model.sequence_limit - 2)]
        prompts = [ids, ids[:1]][: max(1, active)]  # a shared-buffer model has `active` cache slots
        logits, cache = model.prefill(prompts)
        for step in range(min(2, model.sequence_limit - len(ids))):
            logits, cache = model.decode(
                greedy_tokens(logits), [len(p) + step for p in prompts], cache
            )
        if mixed is not None and model.pool.free and max(cache.lengths) < model.sequence_limit:
            # the mixed-step graph's first call, not a client's
            slot = model.pool.take()
            model.decode_with_chunk(greedy_tokens(logits), cache, slot, ids[:1], 0)
            model.pool.release([slot])
        cache.release()
        served = ServedModel(description, scheduler=scheduler, session=session)
    log.info(
        "model %s v%s (%s, %s, %s) warmed up in %.2fs",
        config.name,
        version,
        config.kind,
        variant,
        session.provider,
        time.monotonic() - started,
    )
    metrics.model_info.labels(config.name, version, config.kind, session.provider, variant).set(1)
    return served


def _named(kind: str) -> str:
    return kind.replace("_", " ")


def _a(kind: str) -> str:
    """ "a classifier", "an embedder"."""
    name = _named(kind)
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _shifted(exc: InvalidInput, offset: int) -> InvalidInput:
    """`exc` with its `texts[i]` field counted from the whole request's start, not its part's."""
    match = re.fullmatch(r"texts\[(\d+)\]", exc.field)
    if match is None or offset == 0:
        return exc
    field = f"texts[{int(match.group(1)) + offset}]"
    return InvalidInput(field, str(exc).removeprefix(f"{exc.field}: "))


class ModelHub:
    """The served models by name; what every front calls."""

    def __init__(
        self, loading: tuple[str, ...] = (), on_unhealthy: Callable[[str], None] | None = None
    ) -> None:
        self.models: dict[str, ServedModel] = {}
        # Names of models still loading: requests for them get UNAVAILABLE, not NOT_FOUND.
        self.loading = set(loading)
        # Told a model's name when its device fails (from a worker thread), so that its health turns NOT_SERVING.
        self.on_unhealthy = on_unhealthy

    def add(self, served: ServedModel) -> None:
        self.models[served.name] = served
        self.loading.discard(served.name)
        if served.session is not None:
            served.session.on_device_lost = functools.partial(self.device_lost, served)

    @property
    def all_ready(self) -> bool:
        """Every model is loaded and serving (none loading, none failed)."""
        return bool(self.models) and not self.loading and all(m.ready for m in self.models.values())

    def device_lost(self, served: ServedModel) -> None:
        """The model's device is unusable: it stops taking requests (UNAVAILABLE), the others serve on."""
        served.ready = False
        log.error("model %s: its device failed; it no longer serves (restart the server)", served.name)
        if self.on_unhealthy is not None:
            self.on_unhealthy(served.name)

    def start(self) -> None:
        """Starts the batchers and schedulers on the running event loop; the models are ready after this."""
        loop = asyncio.get_running_loop()
        for served in self.models.values():
            if served.batcher is not None:
                served.batcher.start()
            if served.scheduler is not None:
                served.scheduler.start(loop)
            served.ready = True

    async def close(self) -> None:
        """Stops every batcher and scheduler after their queued work (called once requests are drained)."""
        for served in self.models.values():
            served.ready = False
            if served.batcher is not None:
                await served.batcher.close()
            if served.scheduler is not None:
                await asyncio.to_thread(served.scheduler.close, 10.0)

    def get(self, name: str) -> ServedModel:
        try:
            return self.models[name]
        except KeyError:
            if name in self.loading:
                raise Unavailable(f"model {name} is loading") from None
            raise ModelNotFound(f"no model named {shown(name)}") from None

    def pick(self, name: str, kind: str) -> ServedModel:
        """The model `name`, or the only model of `kind` when `name` is empty."""
        if not name:
            of_kind = [m for m in self.models.values() if m.description.kind == kind]
            if not of_kind:
                if self.loading:
                    raise Unavailable("models are loading")
                raise ModelNotFound(f"this server hosts no {_named(kind)}")
            if len(of_kind) > 1:
                raise InvalidInput(
                    "model",
                    f"required: this server hosts several {_named(kind)}s ({', '.join(m.name for m in of_kind)})",
                )
            served = of_kind[0]
        else:
            served = self.get(name)
            if served.description.kind != kind:
                raise InvalidInput(
                    "model", f"{shown(name)} is {_a(served.description.kind)}, not {_a(kind)}"
                )
        if not served.ready:
            raise Unavailable(f"model {served.name} is not ready")
        return served

    async def _encode(
        self, served: ServedModel, request: Any, deadline: float | None, times: WorkTimes | None = None
    ) -> list[Any]:
        """One result per text of an encoder request, through the model's batcher (`times`: see WorkTimes)."""
        served.encoder.validate(request)
        # A request of more texts than a batch holds goes in batch-sized parts, one after the other, so that
        # other callers' requests are batched between them rather than waiting for all of it (237 texts of the
        # longest kind held every other Classify for 30 s).
        size = served.batcher.max_batch_size
        results = []
        for start in range(0, len(request.texts), size):
            part = dataclasses.replace(request, texts=request.texts[start : start + size])
            try:
                results.extend(await served.batcher.submit(part, deadline, times))
            except InvalidInput as exc:  # its field counts texts from the part's start
                raise _shifted(exc, start) from None
        return results

    async def classify(
        self,
        served: ServedModel,
        request: ClassifyRequest,
        deadline: float | None,
        times: WorkTimes | None = None,
    ) -> ClassifyResult:
        results = await self._encode(served, request, deadline, times)
        d = served.description
        return ClassifyResult(d.name, d.version, d.labels, results)

    async def embed(
        self,
        served: ServedModel,
        request: EmbedRequest,
        deadline: float | None,
        times: WorkTimes | None = None,
    ) -> EmbedResult:
        results = await self._encode(served, request, deadline, times)
        d = served.description
        return EmbedResult(d.name, d.version, request.dimensions or d.embedding_size, d.normalized, results)

    async def classify_tokens(
        self,
        served: ServedModel,
        request: TokenClassifyRequest,
        deadline: float | None,
        times: WorkTimes | None = None,
    ) -> TokenClassifyResult:
        results = await self._encode(served, request, deadline, times)
        d = served.description
        return TokenClassifyResult(d.name, d.version, d.labels, results)

    def generate_stream(
        self, served: ServedModel, request: GenerateRequest, deadline: float | None
    ) -> AsyncIterator[GenerationChunk]:
        return served.scheduler.stream(request, deadline)

    async def generate(
        self, served: ServedModel, request: GenerateRequest, deadline: float | None
    ) -> GenerationChunk:
        return await served.scheduler.generate(request, deadline)

    def token_texts(self, served: ServedModel, token_ids: list[int]) -> list[str]:
        """Each generated token decoded alone (a front's per-token logprobs name their token). A token that is
        part of a character holds U+FFFD: the chunks' text, not these, is the generated text."""
        tokenizer = served.scheduler.model.tokenizer
        return [tokenizer.decode([token], skip_special_tokens=False) for token in token_ids]
