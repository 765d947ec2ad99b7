"""Domain objects of the core, and their conversion to and from the nlpserve.v1 protos.

The conversion lives here, on the dataclasses, so that the proto never reaches the batcher, the scheduler or
the model code (they see only these dataclasses), and a second front can convert from its own wire format.
"""

from __future__ import annotations

import dataclasses
import enum

from client.proto import inference_pb2 as pb

from .errors import InvalidInput
from .repository import CLASSIFIER, EMBEDDER, GENERATOR, TOKEN_CLASSIFIER

_KINDS = {
    CLASSIFIER: pb.MODEL_KIND_CLASSIFIER,
    EMBEDDER: pb.MODEL_KIND_EMBEDDER,
    TOKEN_CLASSIFIER: pb.MODEL_KIND_TOKEN_CLASSIFIER,
    GENERATOR: pb.MODEL_KIND_GENERATOR,
}


# ------------------------------------------------------------------------------------------------------------
# Classification


@dataclasses.dataclass(frozen=True, slots=True)
class ClassifyRequest:
    model: str
    texts: tuple[str, ...]
    return_embedding: bool = False
    no_truncation: bool = False
    # Token ids given by the client instead of texts (the Open Inference Protocol's input_ids): one row per
    # input, `texts` then holds as many empty placeholders; type ids per row, or none (all 0).
    token_ids: tuple[tuple[int, ...], ...] = ()
    token_type_ids: tuple[tuple[int, ...], ...] = ()

    @classmethod
    def from_pb(cls, req: pb.ClassifyRequest) -> ClassifyRequest:
        return cls(req.model, tuple(req.texts), req.return_embedding, req.no_truncation)


@dataclasses.dataclass(slots=True)
class Classification:
    label: str
    score: float
    probabilities: list[float]
    truncated: bool
    num_tokens: int
    embedding: list[float] | None = None


@dataclasses.dataclass(slots=True)
class ClassifyResult:
    model: str
    version: str
    labels: tuple[str, ...]
    results: list[Classification]

    def to_pb(self) -> pb.ClassifyResponse:
        return pb.ClassifyResponse(
            model=self.model,
            model_version=self.version,
            labels=self.labels,
            results=[
                pb.Classification(
                    label=r.label,
                    score=r.score,
                    probabilities=r.probabilities,
                    truncated=r.truncated,
                    num_tokens=r.num_tokens,
                    embedding=r.embedding or (),
                )
                for r in self.results
            ],
        )


# ------------------------------------------------------------------------------------------------------------
# Embeddings


@dataclasses.dataclass(frozen=True, slots=True)
class EmbedRequest:
    model: str
    texts: tuple[str, ...]
    no_truncation: bool = False
    dimensions: int = 0  # 0: all of them
    token_ids: tuple[tuple[int, ...], ...] = ()  # as ClassifyRequest's
    token_type_ids: tuple[tuple[int, ...], ...] = ()

    @classmethod
    def from_pb(cls, req: pb.EmbedRequest) -> EmbedRequest:
        return cls(req.model, tuple(req.texts), req.no_truncation, req.dimensions)


@dataclasses.dataclass(slots=True)
class Embedding:
    values: list[float]
    truncated: bool
    num_tokens: int


@dataclasses.dataclass(slots=True)
class EmbedResult:
    model: str
    version: str
    dimensions: int
    normalized: bool
    embeddings: list[Embedding]

    def to_pb(self) -> pb.EmbedResponse:
        return pb.EmbedResponse(
            model=self.model,
            model_version=self.version,
            dimensions=self.dimensions,
            normalized=self.normalized,
            embeddings=[
                pb.Embedding(values=e.values, truncated=e.truncated, num_tokens=e.num_tokens)
                for e in self.embeddings
            ],
        )


# ------------------------------------------------------------------------------------------------------------
# Token classification

# The aggregation strategies by their transformers names; AGGREGATION_UNSPECIFIED is "simple".
AGGREGATIONS = {
    pb.AGGREGATION_UNSPECIFIED: "simple",
    pb.AGGREGATION_NONE: "none",
    pb.AGGREGATION_SIMPLE: "simple",
    pb.AGGREGATION_FIRST: "first",
    pb.AGGREGATION_AVERAGE: "average",
    pb.AGGREGATION_MAX: "max",
}


@dataclasses.dataclass(frozen=True, slots=True)
class TokenClassifyRequest:
    model: str
    texts: tuple[str, ...]
    aggregation: str = "simple"  # a transformers aggregation_strategy name
    no_truncation: bool = False

    @classmethod
    def from_pb(cls, req: pb.ClassifyTokensRequest) -> TokenClassifyRequest:
        if req.aggregation not in AGGREGATIONS:
            raise InvalidInput("aggregation", f"unknown value {req.aggregation}")
        return cls(req.model, tuple(req.texts), AGGREGATIONS[req.aggregation], req.no_truncation)


@dataclasses.dataclass(frozen=True, slots=True)
class Entity:
    label: str
    score: float
    start: int  # Unicode code points into the original text
    end: int
    byte_start: int  # UTF-8 bytes
    byte_end: int
    text: str
    token_index: int = -1  # aggregation "none" only


@dataclasses.dataclass(slots=True)
class TokenClassification:
    entities: list[Entity]
    truncated: bool
    num_tokens: int


@dataclasses.dataclass(slots=True)
class TokenClassifyResult:
    model: str
    version: str
    labels: tuple[str, ...]
    results: list[TokenClassification]

    def to_pb(self) -> pb.ClassifyTokensResponse:
        return pb.ClassifyTokensResponse(
            model=self.model,
            model_version=self.version,
            labels=self.labels,
            results=[
                pb.TokenClassification(
                    entities=[pb.Entity(**dataclasses.asdict(e)) for e in r.entities],
                    truncated=r.truncated,
                    num_tokens=r.num_tokens,
                )
                for r in self.results
            ],
        )


# ------------------------------------------------------------------------------------------------------------
# Generation


class FinishReason(enum.Enum):
    LENGTH = pb.FINISH_REASON_LENGTH
    STOP = pb.FINISH_REASON_STOP
    EOS = pb.FINISH_REASON_EOS


GREEDY_BELOW = 1e-5  # temperatures below this decode greedily


@dataclasses.dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request sampling. ``max_new_tokens`` None means the model's default; temperature 0 is greedy."""

    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False

    @classmethod
    def from_pb(cls, p: pb.GenerationParameters) -> SamplingParams:
        return cls(
            max_new_tokens=p.max_new_tokens if p.HasField("max_new_tokens") else None,
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p if p.HasField("top_p") else 1.0,
            repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else 1.0,
            seed=p.seed if p.HasField("seed") else None,
            stop=tuple(p.stop),
            logprobs=p.logprobs,
        )

    @property
    def greedy(self) -> bool:
        # A temperature this small picks the most likely token anyway; dividing logits by it (1e-310) would
        # overflow to inf and give NaN probabilities. vLLM draws the same line.
        return self.temperature < GREEDY_BELOW


@dataclasses.dataclass(frozen=True, slots=True)
class GenerateRequest:
    """A prompt to continue, or a conversation (role, content) to answer with the model's chat template."""

    model: str
    prompt: str
    params: SamplingParams = SamplingParams()
    messages: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_pb(cls, req: pb.GenerateRequest) -> GenerateRequest:
        messages = tuple((m.role, m.content) for m in req.messages)
        return cls(req.model, req.prompt, SamplingParams.from_pb(req.parameters), messages)


@dataclasses.dataclass(slots=True)
class Usage:
    prompt_tokens: int
    generated_tokens: int


@dataclasses.dataclass(slots=True)
class Timings:
    queue_seconds: float
    time_to_first_token_seconds: float
    total_seconds: float


@dataclasses.dataclass(slots=True)
class GenerationChunk:
    """A piece of generated text and the tokens behind it. The last chunk of a sequence carries `finish`,
    `usage` and `timings`; its text may be empty."""

    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    finish: FinishReason | None = None
    usage: Usage | None = None
    timings: Timings | None = None

    def to_pb(self, model: str, version: str) -> pb.GenerateResponse:
        msg = pb.GenerateResponse(
            text=self.text,
            token_ids=self.token_ids,
            logprobs=self.logprobs or (),
            model=model,
            model_version=version,
        )
        if self.finish is not None:
            msg.finish_reason = self.finish.value
        if self.usage is not None:
            msg.usage.prompt_tokens = self.usage.prompt_tokens
            msg.usage.generated_tokens = self.usage.generated_tokens
        if self.timings is not None:
            msg.timings.queue_seconds = self.timings.queue_seconds
            msg.timings.time_to_first_token_seconds = self.timings.time_to_first_token_seconds
            msg.timings.total_seconds = self.timings.total_seconds
        return msg


def join_chunks(chunks: list[GenerationChunk]) -> GenerationChunk:
    """The unary result: the concatenation of a stream's chunks (so unary and streaming agree by design)."""
    last = chunks[-1]
    logprobs = [lp for c in chunks for lp in (c.logprobs or ())] if last.logprobs is not None else None
    return GenerationChunk(
        text="".join(c.text for c in chunks),
        token_ids=[t for c in chunks for t in c.token_ids],
        logprobs=logprobs,
        finish=last.finish,
        usage=last.usage,
        timings=last.timings,
    )


# ------------------------------------------------------------------------------------------------------------
# Models


@dataclasses.dataclass(frozen=True, slots=True)
class ModelDescription:
    name: str
    version: str
    kind: str
    provider: str
    variant: str
    max_sequence_length: int
    policy: str
    max_queue_size: int
    labels: tuple[str, ...] = ()
    embedding_size: int = 0
    max_texts_per_request: int = 0
    max_batch_size: int = 0
    max_queue_delay_ms: float = 0.0
    max_active_sequences: int = 0
    max_new_tokens: int = 0
    default_max_new_tokens: int = 0
    max_stop_sequences: int = 0
    kv_cache_tokens: int = 0
    architecture: str = ""
    chat: bool = False
    pooling: str = ""
    normalized: bool = False

    def to_pb(self, ready: bool) -> pb.ModelInfo:
        return pb.ModelInfo(
            name=self.name,
            version=self.version,
            kind=_KINDS[self.kind],
            labels=self.labels,
            limits=pb.ModelLimits(
                max_sequence_length=self.max_sequence_length,
                max_texts_per_request=self.max_texts_per_request,
                max_new_tokens=self.max_new_tokens,
                default_max_new_tokens=self.default_max_new_tokens,
                max_stop_sequences=self.max_stop_sequences,
                kv_cache_tokens=self.kv_cache_tokens,
            ),
            batching=pb.BatchingSettings(
                max_batch_size=self.max_batch_size,
                max_queue_delay_ms=self.max_queue_delay_ms,
                max_queue_size=self.max_queue_size,
                max_active_sequences=self.max_active_sequences,
                policy=self.policy,
            ),
            execution_provider=self.provider,
            variant=self.variant,
            embedding_size=self.embedding_size,
            ready=ready,
            chat=self.chat,
            architecture=self.architecture,
            pooling=self.pooling,
            normalized=self.normalized,
        )
