"""The nlpserve client: a small library (sync and asyncio) and the `nlpserve` CLI (`python -m client`).

It needs only grpcio and protobuf. Results are typed dataclasses; every failed call raises `ServerError`.

    from client import Client

    with Client("127.0.0.1:50051") as c:
        print(c.classify(["a fine film"])[0].label)
        print(c.generate("Return the", max_new_tokens=16).text)
"""

from ._requests import DEFAULT_TARGET
from .aio import AsyncClient
from .errors import ServerError
from .sync import Client
from .types import (
    BatchingSettings,
    Classification,
    ClassifyResult,
    FinishReason,
    Generation,
    GenerationChunk,
    ModelInfo,
    ModelKind,
    ModelLimits,
    Timings,
    Usage,
)

__all__ = [
    "DEFAULT_TARGET",
    "AsyncClient",
    "BatchingSettings",
    "Classification",
    "ClassifyResult",
    "Client",
    "FinishReason",
    "Generation",
    "GenerationChunk",
    "ModelInfo",
    "ModelKind",
    "ModelLimits",
    "ServerError",
    "Timings",
    "Usage",
]
