"""The embedder model: a sentence-embedding encoder whose graph pools (and, when the model says so,
L2-normalizes) its token vectors into one `embedding` per text. The server only shortens vectors a request
asks to be shorter (`dimensions`)."""

from __future__ import annotations

import numpy as np
from tokenizers import Encoding

from .classify import EncoderModel
from .errors import InvalidInput
from .repository import ModelConfig
from .runtime import Session
from .types import Embedding, EmbedRequest


def shortened(vectors: np.ndarray, dimensions: int, normalize: bool) -> np.ndarray:
    """The first `dimensions` values of each row, L2-normalized again when the model's vectors are normalized
    (what OpenAI's `dimensions` does: cosine similarity stays a dot product)."""
    vectors = vectors[:, :dimensions]
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, np.finfo(np.float32).tiny)
    return vectors


class EmbedderModel(EncoderModel[EmbedRequest, Embedding]):
    def __init__(
        self, config: ModelConfig, session: Session, max_texts_per_request: int, max_batch_size: int
    ) -> None:
        super().__init__(config, session, max_texts_per_request, max_batch_size)
        self.embedding_size = int(config.architecture.get("hidden_size", 0))
        self.normalize = config.normalize

    def validate(self, request: EmbedRequest) -> None:
        super().validate(request)
        if not 0 <= request.dimensions <= self.embedding_size:
            raise InvalidInput(
                "dimensions", f"{request.dimensions}, must be 1 to {self.embedding_size} (0: all of them)"
            )

    def _results(
        self, requests: list[EmbedRequest], texts: list[str], encodings: list[Encoding], truncated: list[bool]
    ) -> list[Embedding]:
        vectors = np.zeros((len(encodings), self.embedding_size), dtype=np.float32)
        for group, (embedding,) in self._forward(encodings, ["embedding"]):
            vectors[group] = embedding
        results = []
        for row, (request, encoding) in enumerate(zip(requests, encodings)):
            vector = vectors[row : row + 1]
            if request.dimensions and request.dimensions < self.embedding_size:
                vector = shortened(vector, request.dimensions, self.normalize)
            results.append(Embedding(vector[0].tolist(), truncated[row], len(encoding.ids)))
        return results
