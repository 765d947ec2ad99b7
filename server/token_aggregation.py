"""Token classification (NER) post-processing: from one text's encoding and per-token probabilities to entities.

`TokenAggregator.entities` gives what transformers' ``TokenClassificationPipeline`` gives for the same tokenizer,
probabilities and ``aggregation_strategy`` ("none", "simple", "first", "average", "max"), without transformers:

- special tokens are skipped; "none" returns one entity per token, labelled as is ("B-PER");
- "first", "average" and "max" first fuse the tokens of a word (a token is a *subword*, i.e. continues the
  previous token's word, as below; the first token and [UNK] tokens never are) and label the word by its first
  token, by the mean of its tokens' probabilities, or by its most confident token;
- "simple" and those three then group adjacent tokens/words: an entry starts a new group unless it has the
  previous entry's tag and is not a B- (tags as the pipeline's ``get_tag``: "B-X" and "I-X" are X; any other
  label is itself, as an I-); a group's label is its first entry's label with everything up to the first "-"
  removed (``"B-PER"`` -> ``"PER"``; note ``"WORK-OF-ART"`` -> ``"OF-ART"`` too, as in the pipeline), its score
  the mean of its entries' scores;
- `ignore_labels` are dropped: compared with the token's label for "none", with the group's label otherwise
  (so ``ignore_labels=("B-PER",)`` drops nothing in the grouping strategies, as in the pipeline).

Where the pipeline is plainly wrong we differ, on purpose (each is tested against the pipeline with that one
fix, in tests/server/test_token_aggregation.py):

1. Subwords of a tokenizer whose model has a ``continuing_subword_prefix`` (WordPiece's "##"): the pipeline
   calls a token a subword when its length differs from its span in the original text, meaning "it carries the
   prefix". That misfires whenever the normalizer changed the span's length: in ``"Herr Mu\\u0308ller"``
   (decomposed umlaut, as macOS writes it) the token "muller" spans 7 characters, so the pipeline glues
   "Müller" to "Herr" as one word. Here a token is a subword when it carries the prefix and continues the
   previous token's word (``Encoding.word_ids``); on text the normalizer does not shorten, that is the same.
2. Word boundaries of the fallback heuristic (other tokenizers, e.g. SentencePiece): the pipeline starts a word
   only after or at a space " ", so "Paris\\nLondon" is one word; here any whitespace (`str.isspace`) counts.
3. Entity ends: ``Encoding.offsets`` leave out characters that the normalizer deleted after a token, so
   the entity of "José" written with a combining accent (``"Jose\\u0301"``) or of "❤️" (with its variation
   selector U+FE0F) would end before the accent or the selector. Here an entity's end runs on over such
   characters: non-whitespace characters that the normalizer deletes, up to the next token.

Facts about ``tokenizers.Encoding.offsets`` (tokenizers 0.23, checked in the tests): they are character
offsets (Python str indices, code points, not UTF-8 bytes) into the original text, also when the normalizer
lowercases, strips accents (precomposed "é" is one character of the original, and "José" stays a 4-character
span) or spaces CJK characters apart; special tokens have (0, 0); a WordPiece [UNK] spans its whole word;
characters the normalizer deletes belong to no token (hence fix 3). A Metaspace ("▁") token's span takes in
the space before its word, so such entities may start with a space, as in the pipeline. A normalizer that
expands a character ("ﬁ" -> "fi" under NFKD) gives each resulting token that character's span. And a Unigram
[UNK]'s ``Encoding.tokens`` string is the text it covers, not "<unk>": [UNK]s are found by id here.
Clients that index bytes convert with `utf8_offsets` or `Utf8Offsets`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Sequence

import numpy as np
from tokenizers import Encoding, Tokenizer

STRATEGIES = ("none", "simple", "first", "average", "max")

# str.isspace() by code point; the last whitespace is U+3000, and the one False after it stands for all above.
_WHITESPACE = np.array([chr(c).isspace() for c in range(0x3002)])


@dataclasses.dataclass(frozen=True, slots=True)
class Entity:
    # "none": the token's label ("B-PER"); otherwise the group's ("PER"), as the pipeline's entity_group.
    label: str
    score: float
    # Character offsets (Python str indices, code points) into the original text.
    start: int
    end: int
    # "none" only: the token's index in the encoding (the pipeline's "index").
    token_index: int = -1


def _tag(label: str) -> tuple[bool, str]:
    """(is a B-, tag), as the pipeline's get_tag: a label without a B-/I- prefix is its own tag, as an I-."""
    if label.startswith(("B-", "I-")):
        return label.startswith("B-"), label[2:]
    return False, label


def _codepoints(text: str) -> np.ndarray:
    if text.isascii():
        return np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


def _is_space(codepoints: np.ndarray) -> np.ndarray:
    if codepoints.dtype == np.uint8:  # ASCII
        return _WHITESPACE[codepoints]
    return _WHITESPACE[np.minimum(codepoints, len(_WHITESPACE) - 1)]


def _unk_id(tokenizer: Tokenizer) -> int | None:
    unk = getattr(tokenizer.model, "unk_token", None)
    if unk is not None:
        return tokenizer.token_to_id(unk)
    model = json.loads(tokenizer.to_str())["model"]  # Unigram keeps its unk as an id and does not expose it
    unk_id = model.get("unk_id")
    return int(unk_id) if unk_id is not None else None


class TokenAggregator:
    """Turns a token classifier's per-token probabilities into entities.

    Holds no per-text state (only a cache of which characters the normalizer deletes): one per model, shared
    by threads. `entities_batch` does the numpy work of a whole batch at once, which is several times faster
    than `entities` text by text.
    """

    def __init__(
        self, tokenizer: Tokenizer, labels: Sequence[str], ignore_labels: Sequence[str] = ("O",)
    ) -> None:
        self.labels = tuple(labels)
        ignore = set(ignore_labels)
        tags = [_tag(label) for label in self.labels]
        tag_ids = {tag: i for i, tag in enumerate(dict.fromkeys(tag for _, tag in tags))}
        self._is_b = np.array([is_b for is_b, _ in tags], dtype=bool)
        self._tag = np.array([tag_ids[tag] for _, tag in tags], dtype=np.int64)
        self._group_labels = tuple(label.split("-", 1)[-1] for label in self.labels)
        self._token_kept = np.array([label not in ignore for label in self.labels], dtype=bool)
        self._group_kept = np.array([label not in ignore for label in self._group_labels], dtype=bool)
        self._unk_id = _unk_id(tokenizer)
        # Whether each token id carries the continuing-subword prefix (None: no prefix, the fallback heuristic).
        self._prefixed: np.ndarray | None = None
        prefix = getattr(tokenizer.model, "continuing_subword_prefix", None)
        if prefix:
            vocabulary = tokenizer.get_vocab(with_added_tokens=True)
            self._prefixed = np.zeros(max(vocabulary.values(), default=0) + 1, dtype=bool)
            self._prefixed[[i for token, i in vocabulary.items() if token.startswith(prefix)]] = True
        self._normalizer = tokenizer.normalizer
        self._deleted: dict[str, bool] = {" ": False}

    def entities(
        self, text: str, encoding: Encoding, probabilities: np.ndarray, strategy: str
    ) -> list[Entity]:
        """The entities of `text`, as the pipeline with ``aggregation_strategy=strategy`` finds them.

        `encoding` = tokenizer.encode(text) (truncation may be enabled: tokens past the cut are simply absent),
        `probabilities` float32 [len(encoding.ids), labels] (softmax already applied, padding rows removed);
        special tokens (encoding.special_tokens_mask) are skipped.
        """
        return self.entities_batch([text], [encoding], [probabilities], strategy)[0]

    def entities_batch(
        self,
        texts: Sequence[str],
        encodings: Sequence[Encoding],
        probabilities: Sequence[np.ndarray],
        strategy: str,
    ) -> list[list[Entity]]:
        """`entities` of each text, computed together: words and groups never cross from one text to the next."""
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown aggregation strategy {strategy!r}, expected one of {STRATEGIES}")
        if not len(texts) == len(encodings) == len(probabilities):
            raise ValueError(
                f"{len(texts)} texts, {len(encodings)} encodings, {len(probabilities)} probabilities"
            )
        masks = [encoding.special_tokens_mask for encoding in encodings]
        for i, (mask, p) in enumerate(zip(masks, probabilities)):
            if p.shape != (len(mask), len(self.labels)):
                raise ValueError(
                    f"probabilities[{i}] of shape {p.shape}, expected ({len(mask)}, {len(self.labels)})"
                )
        found: list[list[Entity]] = [[] for _ in texts]
        sizes = [len(mask) for mask in masks]
        special = np.frombuffer(bytes(itertools.chain.from_iterable(masks)), dtype=np.uint8)  # (N,) 0 or 1
        # (T,) the tokens that count, as indices into all the encodings end to end
        kept = np.flatnonzero(special == 0)
        if kept.size == 0:
            return found
        batch = _Batch(texts, encodings, sizes, kept)
        p = np.concatenate(probabilities)[kept]  # (T, L)

        if strategy in ("none", "simple"):
            label = p.argmax(axis=1)  # (T,)
            score = p[np.arange(len(kept)), label]
            first = last = np.arange(len(kept))
            text_start = batch.text_start
        else:
            word_start = batch.text_start | ~self._is_subword(batch)  # (T,)
            first = np.flatnonzero(word_start)  # (W,) each word's first token
            last = np.append(first[1:], len(kept)) - 1
            label, score = self._label_words(p, word_start, first, strategy)
            text_start = batch.text_start[first]

        if strategy == "none":
            keep = np.flatnonzero(self._token_kept[label])
            for k, s, (text, start, end, index) in zip(
                label[keep].tolist(), score[keep].tolist(), batch.spans(keep, keep, self._run_on)
            ):
                found[text].append(Entity(self.labels[k], s, start, end, index))
            return found

        # Group adjacent words (or tokens): a new group unless the same tag and not a B-, or another text.
        tag = self._tag[label]
        new = text_start.copy()
        new[1:] |= (tag[1:] != tag[:-1]) | self._is_b[label[1:]]
        group_first = np.flatnonzero(new)  # (G,) each group's first word
        group_size = np.diff(np.append(group_first, len(label)))
        group_label = label[group_first]
        group_score = np.add.reduceat(score.astype(np.float64), group_first) / group_size
        keep = np.flatnonzero(self._group_kept[group_label])
        spans = batch.spans(
            first[group_first[keep]], last[group_first[keep] + group_size[keep] - 1], self._run_on
        )
        for k, s, (text, start, end, _) in zip(group_label[keep].tolist(), group_score[keep].tolist(), spans):
            found[text].append(Entity(self._group_labels[k], s, start, end))
        return found

    def _is_subword(self, batch: _Batch) -> np.ndarray:
        """Whether each token continues the previous token's word; never an [UNK]. (Each text's first token
        is a word's first whatever this says.)"""
        ids = batch.ids()
        if self._prefixed is not None:
            words = batch.word_ids()  # (N,) None -> -1
            # The token carries the prefix, and belongs to the word of the token before it (fix 1).
            word = words[batch.kept]
            subword = self._prefixed[ids] & (word == words[batch.kept - 1]) & (word >= 0)
        else:
            # The pipeline's fallback: a word starts at the text's start, or after or at whitespace (fix 2).
            starts = batch.starts()  # (T,) characters into the token's own text
            lengths = batch.text_lengths()
            codepoints, at = batch.codepoints()  # of the texts end to end; (T,) where each token starts there
            after_start = starts > 0
            before_is_space = np.zeros(len(starts), dtype=bool)
            before_is_space[after_start] = _is_space(codepoints[at[after_start] - 1])
            at_is_space = np.zeros(len(starts), dtype=bool)
            inside = starts < lengths
            at_is_space[inside] = _is_space(codepoints[at[inside]])
            subword = after_start & ~before_is_space & ~at_is_space
        if self._unk_id is not None:
            subword &= ids != self._unk_id
        return subword

    def _label_words(
        self, p: np.ndarray, word_start: np.ndarray, first: np.ndarray, strategy: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each word's label and score: its first token's, its most confident token's, or its mean's."""
        if strategy == "first":
            chosen = p[first]
        elif strategy == "max":
            best = p.max(axis=1)  # (T,)
            word = np.cumsum(word_start) - 1  # (T,) each token's word
            hits = np.flatnonzero(best == np.maximum.reduceat(best, first)[word])
            # The first token of each word that reaches the word's maximum (Python's max keeps the first).
            chosen = p[hits[np.append(True, word[hits][1:] != word[hits][:-1])]]
        else:  # average: a float32 sum divided by the count, rounded to float32, as np.nanmean does
            counts = np.diff(np.append(first, len(p)))[:, None]
            chosen = (np.add.reduceat(p, first, axis=0) / counts).astype(p.dtype)
        label = chosen.argmax(axis=1)
        return label, chosen[np.arange(len(chosen)), label]

    def _run_on(self, text: str, end: int, limit: int) -> int:
        """`end` moved over the characters the normalizer deleted, up to `limit`, the next token's start (fix 3)."""
        deleted = self._deleted
        while end < limit:
            char = text[end]
            gone = deleted.get(char)
            if gone is None:
                gone = self._normalizer is not None and not char.isspace()
                gone = gone and self._normalizer.normalize_str(char) == ""
                if len(deleted) < 65536:  # bounded: a text may hold any character
                    deleted[char] = gone
            if not gone:
                break
            end += 1
        return end


class _Batch:
    """The encodings of a batch end to end: `kept` indexes their tokens, the special tokens left out.
    Reads each encoding's lists only when asked (every property of an Encoding builds a new list)."""

    def __init__(
        self, texts: Sequence[str], encodings: Sequence[Encoding], sizes: list[int], kept: np.ndarray
    ) -> None:
        self.texts = texts
        self.encodings = encodings
        self.sizes = sizes
        self.kept = kept
        self.base = np.cumsum([0, *sizes[:-1]])  # each encoding's first token, end to end
        self.text_of = np.repeat(np.arange(len(sizes)), sizes)[kept]  # (T,)
        self.text_start = np.ones(len(kept), dtype=bool)  # (T,) a text's first kept token
        self.text_start[1:] = self.text_of[1:] != self.text_of[:-1]
        self._offsets: list[list[tuple[int, int]] | None] = [None] * len(sizes)

    def ids(self) -> np.ndarray:
        ids = itertools.chain.from_iterable(encoding.ids for encoding in self.encodings)
        return np.fromiter(ids, dtype=np.int64, count=sum(self.sizes))[self.kept]

    def word_ids(self) -> np.ndarray:
        words = itertools.chain.from_iterable(encoding.word_ids for encoding in self.encodings)
        return np.fromiter([-1 if w is None else w for w in words], dtype=np.int64, count=sum(self.sizes))

    def starts(self) -> np.ndarray:
        offsets = itertools.chain.from_iterable(self.offsets(i) for i in range(len(self.sizes)))
        flat = np.fromiter(itertools.chain.from_iterable(offsets), dtype=np.int64, count=2 * sum(self.sizes))
        return flat[2 * self.kept]

    def text_lengths(self) -> np.ndarray:
        return np.array([len(text) for text in self.texts], dtype=np.int64)[self.text_of]

    def codepoints(self) -> tuple[np.ndarray, np.ndarray]:
        text_base = np.cumsum([0, *(len(text) for text in self.texts[:-1])])
        return _codepoints("".join(self.texts)), text_base[self.text_of] + self.starts()

    def offsets(self, text: int) -> list[tuple[int, int]]:
        offsets = self._offsets[text]
        if offsets is None:
            offsets = self._offsets[text] = self.encodings[text].offsets
        return offsets

    def spans(self, first: np.ndarray, last: np.ndarray, run_on) -> list[tuple[int, int, int, int]]:
        """(text, start, end, index in its encoding) of the spans from token first[k] to token last[k]."""
        # Encoding.offsets costs some 50 single look-ups (token_to_chars): fetched for texts with many spans.
        lookups = []
        for i, count in enumerate(np.bincount(self.text_of[first], minlength=len(self.sizes)).tolist()):
            offsets = self.offsets(i) if count > 16 else self._offsets[i]
            lookups.append(self.encodings[i].token_to_chars if offsets is None else offsets.__getitem__)
        kept, text_of, base, texts = self.kept.tolist(), self.text_of.tolist(), self.base.tolist(), self.texts
        spans = []
        for f, t in zip(first.tolist(), last.tolist()):
            text = text_of[f]
            chars = lookups[text]
            index = kept[f] - base[text]
            end = chars(kept[t] - base[text])[1]
            if t + 1 < len(kept) and text_of[t + 1] == text:
                limit = chars(kept[t + 1] - base[text])[0]
            else:
                limit = len(texts[text])
            if end < limit and texts[text][end] != " ":
                end = run_on(texts[text], end, limit)
            spans.append((text, chars(index)[0], end, index))
        return spans


def utf8_offsets(text: str, start: int, end: int) -> tuple[int, int]:
    """The UTF-8 byte offsets of the character span text[start:end]; for many spans of one text, `Utf8Offsets`."""
    if text.isascii():
        return start, end
    head = len(text[:start].encode("utf-8", "surrogatepass"))
    return head, head + len(text[start:end].encode("utf-8", "surrogatepass"))


class Utf8Offsets:
    """Character -> UTF-8 byte offsets of one text, for many spans: a prefix sum of the characters' widths."""

    def __init__(self, text: str) -> None:
        self._bytes_before: list[int] | None = None
        if not text.isascii():
            codepoints = _codepoints(text)
            widths = 1 + (codepoints >= 0x80) + (codepoints >= 0x800) + (codepoints >= 0x10000)
            self._bytes_before = [0, *np.cumsum(widths).tolist()]

    def __call__(self, start: int, end: int) -> tuple[int, int]:
        if self._bytes_before is None:
            return start, end
        return self._bytes_before[start], self._bytes_before[end]
