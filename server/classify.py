"""The encoder models: tokenize a whole batch at once, group by length, pad, run, split back.

`EncoderModel` holds what every encoder kind shares (validation, truncation, `no_truncation`, length groups,
results per request); `ClassifierModel` adds the softmax over labels, and `server.embed` and
`server.token_classify` the two other kinds. `run` is the batcher's ``run_batch``: a plain, blocking function
of a list of requests, called in the batcher's worker thread; it knows nothing of gRPC or asyncio.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
from tokenizers import Encoding, Tokenizer

from .errors import InvalidInput
from .repository import ModelConfig
from .runtime import Session
from .types import Classification, ClassifyRequest

log = logging.getLogger(__name__)

# A token covers at most this many characters (WordPiece reads a word of up to 100 characters; a longer one
# is one [UNK]); a text is cut to max_sequence_length times this before tokenizing, since the rest would be
# truncated anyway and tokenizing megabytes takes seconds and hundreds of MB. (Only a text of long whitespace
# runs could lose tokens it would have kept.)
MAX_CHARS_PER_TOKEN = 128

# Splitting a batch into two session calls pays when it saves more padded tokens than this: the fixed cost
# of one ONNX Runtime call, counted in tokens of compute (a rough figure for small encoders on a CPU).
CALL_COST_TOKENS = 32


def plan_groups(lengths: Sequence[int], max_group: int, call_cost: int = CALL_COST_TOKENS) -> list[list[int]]:
    """Splits sequences into groups of similar length, each padded to its own longest.

    Sorts by length, then picks the cut points that minimise ``sum(group size * longest in group) +
    call_cost * groups`` (dynamic programming over the sorted order), with at most `max_group` per group.
    Returns lists of indices into `lengths`; every index appears exactly once.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    n = len(order)
    if n == 0:
        return []
    best = [0] + [0] * n  # best[i]: cost of grouping the i shortest
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        longest = lengths[order[end - 1]]  # sorted: the last of a group is its longest
        best[end] = -1
        for start in range(max(0, end - max_group), end):
            cost = best[start] + (end - start) * longest + call_cost
            if best[end] < 0 or cost < best[end]:
                best[end], cut[end] = cost, start
    groups = []
    end = n
    while end > 0:
        groups.append(order[cut[end] : end])
        end = cut[end]
    return groups[::-1]


def pad_batch(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads token id lists into (input_ids, attention_mask), both int64 of shape (B, longest)."""
    longest = max(len(x) for x in ids)
    input_ids = np.full((len(ids), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), longest), dtype=np.int64)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return input_ids, mask


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class EncoderRequest(Protocol):
    """What every encoder request has (ClassifyRequest, EmbedRequest, TokenClassifyRequest)."""

    @property
    def texts(self) -> tuple[str, ...]: ...

    @property
    def no_truncation(self) -> bool: ...


Request = TypeVar("Request", bound=EncoderRequest)
Result = TypeVar("Result")


@dataclass(frozen=True, slots=True)
class TokenIds:
    """Token ids a client sent (a request's `token_ids`), standing in for the tokenizer's Encoding: what the
    graph reads of one. Never truncated: a row longer than the model reads is refused in `validate`."""

    ids: list[int]
    type_ids: list[int]
    overflowing: tuple[()] = ()


def _given_ids(request: Any) -> tuple[tuple[int, ...], ...]:
    """The request's own token ids (classify and embed requests may carry them; token classification not)."""
    return getattr(request, "token_ids", ())


class EncoderModel(Generic[Request, Result]):
    """An encoder graph (input_ids, attention_mask[, token_type_ids]) -> outputs, run over length groups.

    Subclasses say which outputs they read and turn them into one result per text (`_results`)."""

    def __init__(
        self, config: ModelConfig, session: Session, max_texts_per_request: int, max_batch_size: int
    ) -> None:
        self.config = config
        self.session = session
        self.max_texts_per_request = max_texts_per_request
        self.max_batch_size = max_batch_size
        self.tokenizer = Tokenizer.from_file(str(config.tokenizer_path))
        # Padding is ours (per length group); truncation is the tokenizer's, which keeps room for [CLS]/[SEP]
        # and records what it cut in `overflowing`.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(config.max_sequence_length)
        pad = config.special_tokens.get("pad")
        self.pad_id = int(pad) if pad is not None else 0
        self.uses_token_types = "token_type_ids" in session.input_names
        self.vocab_size = int(config.architecture.get("vocab_size") or self.tokenizer.get_vocab_size())
        self.type_vocab_size = int(config.architecture.get("type_vocab_size") or 2)

    def validate(self, request: Request) -> None:
        """Checks what can be checked without tokenizing; raises InvalidInput naming the field."""
        field, items = ("input_ids", "rows") if _given_ids(request) else ("texts", "texts")  # a placeholder per row
        if not request.texts:
            raise InvalidInput(field, "at least one text is required")
        if len(request.texts) > self.max_texts_per_request:
            raise InvalidInput(
                field, f"{len(request.texts)} {items}, at most {self.max_texts_per_request} per request"
            )
        if _given_ids(request):
            self._validate_ids(request)
            return
        for i, text in enumerate(request.texts):
            if not text:
                raise InvalidInput(f"texts[{i}]", "empty text")

    def _validate_ids(self, request: Any) -> None:
        rows, types = request.token_ids, request.token_type_ids
        if types and len(types) != len(rows):
            raise InvalidInput("token_type_ids", f"{len(types)} rows for {len(rows)} rows of input_ids")
        limit = self.config.max_sequence_length
        for i, ids in enumerate(rows):
            if not ids:
                raise InvalidInput(f"input_ids[{i}]", "no tokens (an all-zero attention_mask?)")
            if len(ids) > limit:
                raise InvalidInput(f"input_ids[{i}]", f"{len(ids)} tokens, more than the model's limit of {limit}")
            if min(ids) < 0 or max(ids) >= self.vocab_size:
                raise InvalidInput(f"input_ids[{i}]", f"token ids must be in 0..{self.vocab_size - 1}")
            if types and (len(types[i]) != len(ids) or min(types[i]) < 0 or max(types[i]) >= self.type_vocab_size):
                raise InvalidInput(
                    f"token_type_ids[{i}]", f"{len(ids)} values in 0..{self.type_vocab_size - 1} expected"
                )

    def warm_up(self, request: Any) -> None:
        """Runs the longest and the shortest inputs once: the first runs of a session allocate memory and pick
        kernels; that is paid before SERVING. `request(texts)` makes a request of this kind."""
        for texts in (("warm up",), ("warm up " * 1000, "a") * 2):
            self.run([request(texts)])

    def run(self, requests: list[Request]) -> list[list[Result] | Exception]:
        """Runs every text of every request in as few session calls as pays; one result per request."""
        limit = self.config.max_sequence_length * MAX_CHARS_PER_TOKEN
        texts = [t for r in requests for t in r.texts]
        cut = [len(t) > limit for t in texts]
        # The texts go through the tokenizer in one call; token ids a client sent stand in for encodings.
        encodings: list[Any] = []
        tokenize: list[int] = []
        for request in requests:
            given = _given_ids(request)
            for j, ids in enumerate(given):
                types = request.token_type_ids[j] if request.token_type_ids else (0,) * len(ids)
                encodings.append(TokenIds(list(ids), list(types)))
            if not given:
                tokenize.extend(range(len(encodings), len(encodings) + len(request.texts)))
                encodings.extend([None] * len(request.texts))
        for i, encoding in zip(tokenize, self.tokenizer.encode_batch([texts[i][:limit] for i in tokenize])):
            encodings[i] = encoding
        truncated = [c or bool(e.overflowing) for c, e in zip(cut, encodings)]
        results: list[list[Result] | Exception] = []
        # Which texts run: a no_truncation request with a text over the limit fails alone, before compute.
        todo: list[int] = []
        owners: list[Request] = []
        start = 0
        for request in requests:
            span = range(start, start + len(request.texts))
            start = span.stop
            too_long = [i - span.start for i in span if truncated[i]]
            if request.no_truncation and too_long:
                first = too_long[0]
                problem = (
                    f"{len(texts[span.start + first])} characters, more than the {limit} this model reads"
                    if cut[span.start + first]
                    else f"longer than the model's limit of {self.config.max_sequence_length} tokens"
                )
                results.append(InvalidInput(f"texts[{first}]", f"{problem} (no_truncation is set)"))
            else:
                results.append([])
                todo.extend(span)
                owners.extend([request] * len(span))
        # The texts as tokenized (cut to the limit): offsets into them are offsets into the originals.
        computed = self._results(
            owners, [texts[i][:limit] for i in todo], [encodings[i] for i in todo], [truncated[i] for i in todo]
        )
        by_text = dict(zip(todo, computed))
        start = 0
        for request, result in zip(requests, results):
            if isinstance(result, list):
                result.extend(by_text[i] for i in range(start, start + len(request.texts)))
            start += len(request.texts)
        return results

    def _results(
        self, requests: list[Request], texts: list[str], encodings: list[Encoding], truncated: list[bool]
    ) -> list[Result]:
        """One result per text (`texts[i]` as tokenized: cut to the character limit); `requests[i]` is the
        request text i came in."""
        raise NotImplementedError

    def _forward(self, encodings: Sequence[Encoding], outputs: list[str]) -> Iterator[tuple[list[int], list[Any]]]:
        """Runs the graph over length groups: yields (indices into `encodings`, the outputs for those rows)."""
        for group in plan_groups([len(e.ids) for e in encodings], self.max_batch_size) if encodings else []:
            input_ids, mask = pad_batch([encodings[i].ids for i in group], self.pad_id)
            feeds = {"input_ids": input_ids, "attention_mask": mask}
            if self.uses_token_types:
                feeds["token_type_ids"], _ = pad_batch([encodings[i].type_ids for i in group], 0)
            yield group, self.session.run(outputs, feeds)


class ClassifierModel(EncoderModel[ClassifyRequest, Classification]):
    def __init__(
        self, config: ModelConfig, session: Session, max_texts_per_request: int, max_batch_size: int
    ) -> None:
        super().__init__(config, session, max_texts_per_request, max_batch_size)
        self.labels = config.labels
        self.has_embedding = "embedding" in session.output_names and "embedding" in config.onnx_outputs
        self.embedding_size = int(config.architecture.get("hidden_size", 0)) if self.has_embedding else 0

    def validate(self, request: ClassifyRequest) -> None:
        super().validate(request)
        if request.return_embedding and not self.has_embedding:
            raise InvalidInput("return_embedding", f"model {self.config.name} has no embedding output")

    def _results(
        self,
        requests: list[ClassifyRequest],
        texts: list[str],
        encodings: list[Encoding],
        truncated: list[bool],
    ) -> list[Classification]:
        want_embedding = any(r.return_embedding for r in requests)
        probabilities, embeddings = self._compute(encodings, want_embedding)
        labels = self.labels
        best = probabilities.argmax(axis=-1)
        results = []
        for row, (request, encoding) in enumerate(zip(requests, encodings)):
            k = int(best[row])
            results.append(
                Classification(
                    label=labels[k],
                    score=float(probabilities[row, k]),
                    probabilities=probabilities[row].tolist(),
                    truncated=truncated[row],
                    num_tokens=len(encoding.ids),
                    embedding=embeddings[row].tolist() if request.return_embedding else None,
                )
            )
        return results

    def _compute(
        self, encodings: list[Encoding], want_embedding: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities (N, labels) and, when asked, embeddings (N, hidden), in the order of `encodings`."""
        n = len(encodings)
        probabilities = np.zeros((n, len(self.labels)), dtype=np.float32)
        embeddings = np.zeros((n, self.embedding_size), dtype=np.float32) if want_embedding else None
        for group, outputs in self._forward(encodings, ["logits", "embedding"] if want_embedding else ["logits"]):
            probabilities[group] = softmax(outputs[0].astype(np.float32))
            if embeddings is not None:
                embeddings[group] = outputs[1]
        return probabilities, embeddings
