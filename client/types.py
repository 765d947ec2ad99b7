"""Typed results of the client: plain dataclasses built from the protos, so callers never handle a proto.

Every result has `to_dict()`, a JSON-ready dict (what the CLI prints with `--json`).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .proto import inference_pb2 as pb


class FinishReason(str, enum.Enum):
    """Why a generation ended. A `str` enum: `FinishReason.LENGTH == "length"`."""

    LENGTH = "length"  # max_new_tokens reached
    STOP = "stop"  # a stop sequence was generated (its text is not returned)
    EOS = "eos"  # the model generated its end-of-sequence token

    @classmethod
    def from_pb(cls, value: int) -> FinishReason | None:
        """The finish reason of a proto `FinishReason`, or None for FINISH_REASON_UNSPECIFIED (not finished)."""
        return _FINISH_REASONS.get(value)


_FINISH_REASONS = {
    pb.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    pb.FINISH_REASON_STOP: FinishReason.STOP,
    pb.FINISH_REASON_EOS: FinishReason.EOS,
}


class ModelKind(str, enum.Enum):
    """What a model does. A `str` enum: `ModelKind.CLASSIFIER == "classifier"`."""

    UNSPECIFIED = "unspecified"
    CLASSIFIER = "classifier"
    GENERATOR = "generator"
    EMBEDDER = "embedder"
    TOKEN_CLASSIFIER = "token_classifier"

    @classmethod
    def from_pb(cls, value: int) -> ModelKind:
        """The kind of a proto `ModelKind`; a value this client does not know reads as UNSPECIFIED."""
        return _MODEL_KINDS.get(value, cls.UNSPECIFIED)

    def to_pb(self) -> int:
        """The proto `ModelKind` value."""
        return {v: k for k, v in _MODEL_KINDS.items()}.get(self, pb.MODEL_KIND_UNSPECIFIED)


_MODEL_KINDS = {
    pb.MODEL_KIND_CLASSIFIER: ModelKind.CLASSIFIER,
    pb.MODEL_KIND_GENERATOR: ModelKind.GENERATOR,
    pb.MODEL_KIND_EMBEDDER: ModelKind.EMBEDDER,
    pb.MODEL_KIND_TOKEN_CLASSIFIER: ModelKind.TOKEN_CLASSIFIER,
}


def _plain(value: Any) -> Any:
    """JSON-ready form of a result field: enums become their string value."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class _Result:
    """Shared behaviour of the result dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of this result (enums as strings, nested results as dicts)."""
        return _plain(dataclasses.asdict(self))  # type: ignore[call-overload]


# ---------------------------------------------------------------------------------------------------------
# Classification


@dataclass(frozen=True)
class Classification(_Result):
    """The classification of one text.

    Attributes:
        label: The most probable label.
        score: Its probability.
        probabilities: The probability of every label, in the model's label order.
        truncated: True when the text was cut to the model's maximum sequence length.
        num_tokens: Tokens the model saw for this text (special tokens included).
        embedding: The pooled sentence vector, when it was asked for; otherwise None.
    """

    label: str
    score: float
    probabilities: dict[str, float]
    truncated: bool = False
    num_tokens: int = 0
    embedding: list[float] | None = None

    @classmethod
    def from_pb(
        cls, msg: pb.Classification, labels: list[str], with_embedding: bool = False
    ) -> Classification:
        """Builds the result from its proto; `labels` are the response's labels, in probability order."""
        if len(msg.probabilities) != len(labels):
            raise ValueError(f"server sent {len(msg.probabilities)} probabilities for {len(labels)} labels")
        return cls(
            label=msg.label,
            score=msg.score,
            probabilities=dict(zip(labels, msg.probabilities)),
            truncated=msg.truncated,
            num_tokens=msg.num_tokens,
            embedding=list(msg.embedding) if with_embedding or msg.embedding else None,
        )


@dataclass(frozen=True)
class ClassifyResult(_Result):
    """The answer to one classify call: one `Classification` per text, in the order of the texts.

    Iterating over it, indexing it and `len()` work on `results`.

    Attributes:
        model: The model that answered.
        model_version: Its version.
        labels: The model's labels, in the order of every `Classification.probabilities`.
        results: One classification per input text.
    """

    model: str
    model_version: str
    labels: list[str]
    results: list[Classification] = field(default_factory=list)

    @classmethod
    def from_pb(cls, msg: pb.ClassifyResponse, with_embedding: bool = False) -> ClassifyResult:
        """Builds the result from a `ClassifyResponse`."""
        labels = list(msg.labels)
        return cls(
            model=msg.model,
            model_version=msg.model_version,
            labels=labels,
            results=[Classification.from_pb(r, labels, with_embedding) for r in msg.results],
        )

    def __iter__(self) -> Iterator[Classification]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, index: int) -> Classification:
        return self.results[index]


# ---------------------------------------------------------------------------------------------------------
# Embeddings


@dataclass(frozen=True)
class Embedding(_Result):
    """The sentence vector of one text.

    Attributes:
        values: The vector.
        truncated: True when the text was cut to the model's maximum sequence length.
        num_tokens: Tokens the model saw for this text (special tokens included).
    """

    values: list[float]
    truncated: bool = False
    num_tokens: int = 0

    @classmethod
    def from_pb(cls, msg: pb.Embedding) -> Embedding:
        return cls(values=list(msg.values), truncated=msg.truncated, num_tokens=msg.num_tokens)


@dataclass(frozen=True)
class EmbedResult(_Result):
    """The answer to one embed call: one `Embedding` per text, in the order of the texts.

    Iterating over it, indexing it and `len()` work on `embeddings`.

    Attributes:
        model: The model that answered.
        model_version: Its version.
        dimensions: Values per vector.
        normalized: True when every vector has L2 norm 1 (cosine similarity is then a dot product).
        embeddings: One vector per input text.
    """

    model: str
    model_version: str
    dimensions: int
    normalized: bool
    embeddings: list[Embedding] = field(default_factory=list)

    @classmethod
    def from_pb(cls, msg: pb.EmbedResponse) -> EmbedResult:
        return cls(
            model=msg.model,
            model_version=msg.model_version,
            dimensions=msg.dimensions,
            normalized=msg.normalized,
            embeddings=[Embedding.from_pb(e) for e in msg.embeddings],
        )

    @property
    def vectors(self) -> list[list[float]]:
        """The vectors alone, in the order of the texts."""
        return [e.values for e in self.embeddings]

    def __iter__(self) -> Iterator[Embedding]:
        return iter(self.embeddings)

    def __len__(self) -> int:
        return len(self.embeddings)

    def __getitem__(self, index: int) -> Embedding:
        return self.embeddings[index]


# ---------------------------------------------------------------------------------------------------------
# Token classification


@dataclass(frozen=True)
class Entity(_Result):
    """An entity (or, with aggregation "none", one labelled token) found in a text.

    Attributes:
        label: The entity type ("PER"); with aggregation "none" the token's label ("B-PER").
        score: Its probability (averaged over the entity's tokens or words).
        start: Where it starts in the text, in characters (`text[start:end]` is the entity)...
        end: ... and ends.
        byte_start: The same span in UTF-8 bytes (`text.encode()[byte_start:byte_end]`).
        byte_end: See byte_start.
        text: The entity's text, as it stands in the input.
        token_index: Aggregation "none": the token's position in the model's input; otherwise -1.
    """

    label: str
    score: float
    start: int
    end: int
    byte_start: int
    byte_end: int
    text: str
    token_index: int = -1

    @classmethod
    def from_pb(cls, msg: pb.Entity) -> Entity:
        return cls(
            label=msg.label,
            score=msg.score,
            start=msg.start,
            end=msg.end,
            byte_start=msg.byte_start,
            byte_end=msg.byte_end,
            text=msg.text,
            token_index=msg.token_index,
        )


@dataclass(frozen=True)
class TokenClassification(_Result):
    """The entities of one text, in order.

    Iterating over it, indexing it and `len()` work on `entities`.

    Attributes:
        entities: The entities found (tokens outside any entity, "O", are left out).
        truncated: True when the text was cut to the model's maximum sequence length.
        num_tokens: Tokens the model saw for this text (special tokens included).
    """

    entities: list[Entity] = field(default_factory=list)
    truncated: bool = False
    num_tokens: int = 0

    @classmethod
    def from_pb(cls, msg: pb.TokenClassification) -> TokenClassification:
        return cls(
            entities=[Entity.from_pb(e) for e in msg.entities], truncated=msg.truncated, num_tokens=msg.num_tokens
        )

    def __iter__(self) -> Iterator[Entity]:
        return iter(self.entities)

    def __len__(self) -> int:
        return len(self.entities)

    def __getitem__(self, index: int) -> Entity:
        return self.entities[index]


@dataclass(frozen=True)
class TokenClassifyResult(_Result):
    """The answer to one classify_tokens call: one `TokenClassification` per text, in the order of the texts.

    Attributes:
        model: The model that answered.
        model_version: Its version.
        labels: The model's token labels.
        results: One result per input text.
    """

    model: str
    model_version: str
    labels: list[str]
    results: list[TokenClassification] = field(default_factory=list)

    @classmethod
    def from_pb(cls, msg: pb.ClassifyTokensResponse) -> TokenClassifyResult:
        return cls(
            model=msg.model,
            model_version=msg.model_version,
            labels=list(msg.labels),
            results=[TokenClassification.from_pb(r) for r in msg.results],
        )

    def __iter__(self) -> Iterator[TokenClassification]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, index: int) -> TokenClassification:
        return self.results[index]


# ---------------------------------------------------------------------------------------------------------
# Generation


@dataclass(frozen=True)
class Usage(_Result):
    """Token counts of one generation.

    Attributes:
        prompt_tokens: Tokens in the prompt.
        generated_tokens: Tokens generated (a stop sequence's tokens included, though its text is not returned).
    """

    prompt_tokens: int
    generated_tokens: int

    @property
    def total_tokens(self) -> int:
        """Prompt and generated tokens together."""
        return self.prompt_tokens + self.generated_tokens

    @classmethod
    def from_pb(cls, msg: pb.Usage) -> Usage:
        """Builds the counts from a `Usage` proto."""
        return cls(prompt_tokens=msg.prompt_tokens, generated_tokens=msg.generated_tokens)


@dataclass(frozen=True)
class Timings(_Result):
    """Server-side timings of one generation, in seconds from the request's arrival.

    Attributes:
        queue_seconds: Until the prefill started.
        time_to_first_token_seconds: Until the first generated token.
        total_seconds: Until the end of generation.
    """

    queue_seconds: float
    time_to_first_token_seconds: float
    total_seconds: float

    @classmethod
    def from_pb(cls, msg: pb.Timings) -> Timings:
        """Builds the timings from a `Timings` proto."""
        return cls(
            queue_seconds=msg.queue_seconds,
            time_to_first_token_seconds=msg.time_to_first_token_seconds,
            total_seconds=msg.total_seconds,
        )


@dataclass(frozen=True)
class GenerationChunk(_Result):
    """One message of a generation stream: a new piece of text and the tokens behind it.

    Only the last chunk of a stream has `finish_reason`, `usage` and `timings` set.

    Attributes:
        text: The new text piece (never a broken UTF-8 character; may be empty).
        token_ids: The token ids behind `text`.
        logprobs: The log-probability of each of `token_ids`, when asked for; otherwise empty.
        finish_reason: Why generation ended, on the last chunk; None before.
        usage: Token counts, on the last chunk; None before.
        timings: Server-side timings, on the last chunk; None before.
        model: The model that answered.
        model_version: Its version.
    """

    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    model: str = ""
    model_version: str = ""

    @property
    def is_last(self) -> bool:
        """True for the last chunk of a stream (the one that carries the finish reason)."""
        return self.finish_reason is not None

    @classmethod
    def from_pb(cls, msg: pb.GenerateResponse) -> GenerationChunk:
        """Builds a chunk from a `GenerateResponse` of a stream."""
        finish = FinishReason.from_pb(msg.finish_reason)
        return cls(
            text=msg.text,
            token_ids=list(msg.token_ids),
            logprobs=list(msg.logprobs),
            finish_reason=finish,
            usage=Usage.from_pb(msg.usage) if msg.HasField("usage") else None,
            timings=Timings.from_pb(msg.timings) if msg.HasField("timings") else None,
            model=msg.model,
            model_version=msg.model_version,
        )


@dataclass(frozen=True)
class Generation(_Result):
    """A whole generation: the answer of a unary generate call.

    Attributes:
        text: The generated text (the prompt is not repeated; a stop sequence's text is not included).
        token_ids: The generated token ids.
        logprobs: The log-probability of each of `token_ids`, when asked for; otherwise empty.
        finish_reason: Why generation ended.
        usage: Token counts.
        timings: Server-side timings.
        model: The model that answered.
        model_version: Its version.
    """

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    model: str = ""
    model_version: str = ""

    @classmethod
    def from_pb(cls, msg: pb.GenerateResponse) -> Generation:
        """Builds the result from the `GenerateResponse` of a unary call."""
        finish = FinishReason.from_pb(msg.finish_reason)
        if finish is None:
            raise ValueError("the server's answer has no finish reason")
        return cls(
            text=msg.text,
            token_ids=list(msg.token_ids),
            logprobs=list(msg.logprobs),
            finish_reason=finish,
            usage=Usage.from_pb(msg.usage),
            timings=Timings.from_pb(msg.timings),
            model=msg.model,
            model_version=msg.model_version,
        )

    @classmethod
    def from_chunks(cls, chunks: list[GenerationChunk]) -> Generation:
        """Joins the chunks of a whole stream into one result (as the unary call would have returned it).

        Raises:
            ValueError: When the last chunk carries no finish reason (the stream is incomplete).
        """
        if not chunks or chunks[-1].finish_reason is None:
            raise ValueError("the stream is incomplete: its last chunk has no finish reason")
        last = chunks[-1]
        return cls(
            text="".join(c.text for c in chunks),
            token_ids=[t for c in chunks for t in c.token_ids],
            logprobs=[p for c in chunks for p in c.logprobs],
            finish_reason=last.finish_reason,
            usage=last.usage or Usage(0, 0),
            timings=last.timings or Timings(0.0, 0.0, 0.0),
            model=last.model,
            model_version=last.model_version,
        )


# ---------------------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class ModelLimits(_Result):
    """What a model accepts.

    Attributes:
        max_sequence_length: Tokens per text (classifiers) or prompt plus generated tokens (generators).
        max_texts_per_request: Classifiers: texts per request.
        max_new_tokens: Generators: the largest `max_new_tokens` accepted.
        default_max_new_tokens: Generators: the `max_new_tokens` used when a request sets none.
        max_stop_sequences: Generators: stop sequences per request.
        kv_cache_tokens: Generators: tokens the server's KV cache holds for all sequences together.
    """

    max_sequence_length: int = 0
    max_texts_per_request: int = 0
    max_new_tokens: int = 0
    default_max_new_tokens: int = 0
    max_stop_sequences: int = 0
    kv_cache_tokens: int = 0

    @classmethod
    def from_pb(cls, msg: pb.ModelLimits) -> ModelLimits:
        """Builds the limits from a `ModelLimits` proto."""
        return cls(
            max_sequence_length=msg.max_sequence_length,
            max_texts_per_request=msg.max_texts_per_request,
            max_new_tokens=msg.max_new_tokens,
            default_max_new_tokens=msg.default_max_new_tokens,
            max_stop_sequences=msg.max_stop_sequences,
            kv_cache_tokens=msg.kv_cache_tokens,
        )


@dataclass(frozen=True)
class BatchingSettings(_Result):
    """How the server batches a model's requests.

    Attributes:
        policy: "adaptive" or "fixed" for classifiers, "continuous" for generators.
        max_batch_size: Classifiers: sequences per batch at most.
        max_queue_delay_ms: Classifiers: the longest a request waits for others to join its batch.
        max_queue_size: Requests waiting beyond this many are refused (RESOURCE_EXHAUSTED).
        max_active_sequences: Generators: sequences decoded together at most.
    """

    policy: str = ""
    max_batch_size: int = 0
    max_queue_delay_ms: float = 0.0
    max_queue_size: int = 0
    max_active_sequences: int = 0

    @classmethod
    def from_pb(cls, msg: pb.BatchingSettings) -> BatchingSettings:
        """Builds the settings from a `BatchingSettings` proto."""
        return cls(
            policy=msg.policy,
            max_batch_size=msg.max_batch_size,
            max_queue_delay_ms=msg.max_queue_delay_ms,
            max_queue_size=msg.max_queue_size,
            max_active_sequences=msg.max_active_sequences,
        )


@dataclass(frozen=True)
class ModelInfo(_Result):
    """A model the server hosts.

    Attributes:
        name: The name requests use.
        version: The model's version.
        kind: Classifier, embedder, token classifier or generator.
        labels: Classifiers and token classifiers: the class labels.
        limits: What the model accepts.
        batching: How its requests are batched.
        execution_provider: The ONNX Runtime execution provider actually in use, e.g. "CPUExecutionProvider".
        variant: The model file variant in use ("fp32", "fp16", "int8"...).
        embedding_size: Classifiers and embedders: size of the pooled embedding (0 when the model has none).
        ready: True once the model is loaded and warmed up.
        chat: Generators: the model has a chat template (`Client.chat` works).
        architecture: The network's transformers model_type, e.g. "bert", "gpt2", "llama".
        pooling: Classifiers and embedders: how token vectors become the sentence vector ("mean", "cls", "max").
        normalized: Embedders: the vectors have L2 norm 1.
    """

    name: str
    version: str
    kind: ModelKind
    labels: list[str] = field(default_factory=list)
    limits: ModelLimits = field(default_factory=ModelLimits)
    batching: BatchingSettings = field(default_factory=BatchingSettings)
    execution_provider: str = ""
    variant: str = ""
    embedding_size: int = 0
    ready: bool = False
    chat: bool = False
    architecture: str = ""
    pooling: str = ""
    normalized: bool = False

    @classmethod
    def from_pb(cls, msg: pb.ModelInfo) -> ModelInfo:
        """Builds the description from a `ModelInfo` proto."""
        return cls(
            name=msg.name,
            version=msg.version,
            kind=ModelKind.from_pb(msg.kind),
            labels=list(msg.labels),
            limits=ModelLimits.from_pb(msg.limits),
            batching=BatchingSettings.from_pb(msg.batching),
            execution_provider=msg.execution_provider,
            variant=msg.variant,
            embedding_size=msg.embedding_size,
            ready=msg.ready,
            chat=msg.chat,
            architecture=msg.architecture,
            pooling=msg.pooling,
            normalized=msg.normalized,
        )
