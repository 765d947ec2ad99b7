"""The token classifier (NER) model: per-token label probabilities from the graph's `logits` [batch, sequence,
labels], turned into entities with character and byte offsets into the original text by
`server.token_aggregation` (the aggregation strategies of transformers' token-classification pipeline)."""

from __future__ import annotations

import numpy as np
from tokenizers import Encoding

from .classify import EncoderModel, softmax
from .repository import ModelConfig
from .runtime import Session
from .token_aggregation import TokenAggregator, Utf8Offsets
from .types import Entity, TokenClassification, TokenClassifyRequest


class TokenClassifierModel(EncoderModel[TokenClassifyRequest, TokenClassification]):
    def __init__(
        self, config: ModelConfig, session: Session, max_texts_per_request: int, max_batch_size: int
    ) -> None:
        super().__init__(config, session, max_texts_per_request, max_batch_size)
        self.labels = config.labels
        self.aggregator = TokenAggregator(self.tokenizer, self.labels)

    def _results(
        self,
        requests: list[TokenClassifyRequest],
        texts: list[str],
        encodings: list[Encoding],
        truncated: list[bool],
    ) -> list[TokenClassification]:
        probabilities: list[np.ndarray | None] = [None] * len(encodings)
        for group, (logits,) in self._forward(encodings, ["logits"]):
            scores = softmax(logits.astype(np.float32))
            for row, i in enumerate(group):
                probabilities[i] = scores[row, : len(encodings[i].ids)]
        # Texts of one strategy are aggregated together (the numpy work done once for all of them).
        found: list[list] = [[] for _ in texts]
        for strategy in {r.aggregation for r in requests}:
            rows = [i for i, r in enumerate(requests) if r.aggregation == strategy]
            batch = self.aggregator.entities_batch(
                [texts[i] for i in rows], [encodings[i] for i in rows], [probabilities[i] for i in rows], strategy
            )
            for i, entities in zip(rows, batch):
                found[i] = entities
        results = []
        for text, encoding, entities, cut in zip(texts, encodings, found, truncated):
            to_bytes = Utf8Offsets(text)
            spans = []
            for e in entities:
                byte_start, byte_end = to_bytes(e.start, e.end)
                spans.append(
                    Entity(e.label, e.score, e.start, e.end, byte_start, byte_end, text[e.start : e.end], e.token_index)
                )
            results.append(TokenClassification(spans, cut, len(encoding.ids)))
        return results
