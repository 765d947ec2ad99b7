"""Request protos and the standard health messages, shared by the sync and the asyncio client."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from .proto import inference_pb2 as pb

DEFAULT_TARGET = "127.0.0.1:50051"
# A per-call `timeout` left out means "the client's default timeout" (None itself means "no timeout").
USE_CLIENT_TIMEOUT: Any = object()
HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"


def classify_request(
    texts: str | Iterable[str], model: str | None, return_embedding: bool, no_truncation: bool
) -> pb.ClassifyRequest:
    """A `ClassifyRequest`; a single string is one text (not a sequence of characters)."""
    request = pb.ClassifyRequest(return_embedding=return_embedding, no_truncation=no_truncation)
    return _with_texts(request, texts, model)


def embed_request(
    texts: str | Iterable[str], model: str | None, dimensions: int | None, no_truncation: bool
) -> pb.EmbedRequest:
    """An `EmbedRequest`; a single string is one text."""
    request = pb.EmbedRequest(no_truncation=no_truncation)
    if dimensions is not None:
        _set(request, "dimensions", dimensions)
    return _with_texts(request, texts, model)


# The aggregation strategies by their transformers names (`aggregation_strategy`).
AGGREGATIONS = {
    "none": pb.AGGREGATION_NONE,
    "simple": pb.AGGREGATION_SIMPLE,
    "first": pb.AGGREGATION_FIRST,
    "average": pb.AGGREGATION_AVERAGE,
    "max": pb.AGGREGATION_MAX,
}


def classify_tokens_request(
    texts: str | Iterable[str], model: str | None, aggregation: str, no_truncation: bool
) -> pb.ClassifyTokensRequest:
    """A `ClassifyTokensRequest`; a single string is one text; `aggregation` is a name of AGGREGATIONS."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation: {aggregation!r}, expected one of {', '.join(AGGREGATIONS)}")
    request = pb.ClassifyTokensRequest(aggregation=AGGREGATIONS[aggregation], no_truncation=no_truncation)
    return _with_texts(request, texts, model)


def _with_texts(request: Any, texts: str | Iterable[str], model: str | None) -> Any:
    if isinstance(texts, str):
        texts = [texts]
    _set(request, "model", model or "")
    try:
        request.texts.extend(texts)
    except (TypeError, ValueError) as e:
        raise type(e)(f"texts: {e}") from None
    return request


def generate_request(
    prompt: str,
    model: str | None,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    logprobs: bool = False,
) -> pb.GenerateRequest:
    """A `GenerateRequest`. Values are sent as given: the server validates them and names a bad field."""
    if isinstance(stop, str):
        stop = [stop]
    params = pb.GenerationParameters()
    _set(params, "temperature", temperature)
    _set(params, "top_k", top_k)
    _set(params, "logprobs", logprobs)
    try:
        params.stop.extend(stop)
    except (TypeError, ValueError) as e:
        raise type(e)(f"stop: {e}") from None
    # The optional fields stay unset (the server's defaults) unless given.
    for name, value in (
        ("max_new_tokens", max_new_tokens),
        ("top_p", top_p),
        ("repetition_penalty", repetition_penalty),
        ("seed", seed),
    ):
        if value is not None:
            _set(params, name, value)
    request = pb.GenerateRequest(parameters=params)
    _set(request, "model", model or "")
    _set(request, "prompt", prompt)
    return request


def chat_request(messages: Iterable[Any], model: str | None, **params: Any) -> pb.GenerateRequest:
    """A `GenerateRequest` carrying a conversation: `messages` are (role, content) pairs or mappings with
    "role" and "content" (as in the OpenAI API); `params` are those of `generate_request` but the prompt."""
    request = generate_request("", model, **params)
    if isinstance(messages, (str, tuple)) and messages and isinstance(messages[0], str):
        raise TypeError("messages: a list of (role, content) pairs or {'role', 'content'} mappings, not one message")
    for i, message in enumerate(messages):
        if isinstance(message, Mapping) and {"role", "content"} <= message.keys():
            role, content = message["role"], message["content"]
        elif isinstance(message, (tuple, list)) and len(message) == 2:
            role, content = message
        else:
            raise TypeError(f"messages[{i}]: {message!r:.60} is not a (role, content) pair or a role/content mapping")
        try:
            request.messages.add(role=role, content=content)
        except (TypeError, ValueError) as e:
            raise type(e)(f"messages[{i}]: {e}") from None
    return request


def _set(message: Any, name: str, value: Any) -> None:
    """Sets a field; a value the proto cannot hold (a negative seed, a string for a number) raises an error
    that names the field (protobuf's own message does not)."""
    try:
        setattr(message, name, value)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{name}: {e}") from None


def _health_messages() -> tuple[type, type, dict[int, str]]:
    """The `grpc.health.v1` request and response classes, built from their descriptor at import.

    grpcio-health-checking ships these stubs, but the light client depends on grpcio and protobuf only; the
    messages are two fields, so they are described here, in a private descriptor pool (which also cannot
    clash with the package's stubs when both are imported in one process).
    """
    fdp = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="nlpserve_client/grpc_health_v1.proto", package="grpc.health.v1", syntax="proto3"
    )
    request = file.message_type.add(name="HealthCheckRequest")
    request.field.add(name="service", number=1, type=fdp.TYPE_STRING, label=fdp.LABEL_OPTIONAL)
    response = file.message_type.add(name="HealthCheckResponse")
    statuses = ["UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"]
    status_enum = response.enum_type.add(name="ServingStatus")
    for number, name in enumerate(statuses):
        status_enum.value.add(name=name, number=number)
    response.field.add(
        name="status",
        number=1,
        type=fdp.TYPE_ENUM,
        type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
        label=fdp.LABEL_OPTIONAL,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    request_class = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest")
    )
    response_class = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse")
    )
    return request_class, response_class, dict(enumerate(statuses))


HealthCheckRequest, HealthCheckResponse, HEALTH_STATUS_NAMES = _health_messages()


def health_status_name(response: object) -> str:
    """The name of a `HealthCheckResponse`'s status: "SERVING", "NOT_SERVING", "UNKNOWN"..."""
    status = response.status  # type: ignore[attr-defined]
    return HEALTH_STATUS_NAMES.get(status, f"STATUS_{status}")
