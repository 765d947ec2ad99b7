"""The nlpserve client: a small library (sync and asyncio) and the `nlpserve` CLI (`python -m client`).

It needs only grpcio and protobuf. Results are typed dataclasses; every failed call raises `ServerError`.

    from client import Client

    with Client("127.0.0.1:50051") as c:
        print(c.classify(["a fine film"])[0].label)
        print(c.embed(["a fine film", "a good movie"]).vectors)
        print(c.generate("Return the", max_new_tokens=16).text)
"""

import os

# gRPC's C core prints some events (a failed TLS handshake) on stderr at INFO level, next to the one-line error
# the client raises: keep to its errors unless the program says otherwise. It only takes effect before grpc is
# first imported.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from ._requests import DEFAULT_TARGET
from .aio import AsyncClient
from .errors import ServerError
from .sync import Client
from .types import (
    BatchingSettings,
    Classification,
    ClassifyResult,
    Embedding,
    EmbedResult,
    Entity,
    FinishReason,
    Generation,
    GenerationChunk,
    ModelInfo,
    ModelKind,
    ModelLimits,
    Timings,
    TokenClassification,
    TokenClassifyResult,
    Usage,
)

__all__ = [
    "DEFAULT_TARGET",
    "AsyncClient",
    "BatchingSettings",
    "Classification",
    "ClassifyResult",
    "Client",
    "EmbedResult",
    "Embedding",
    "Entity",
    "FinishReason",
    "Generation",
    "GenerationChunk",
    "ModelInfo",
    "ModelKind",
    "ModelLimits",
    "ServerError",
    "Timings",
    "TokenClassification",
    "TokenClassifyResult",
    "Usage",
]
