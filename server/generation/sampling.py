"""Sampling for a whole decode batch at once: greedy, temperature, top-k, top-p, repetition penalty, seeded
per request.

**The distribution.** With x a row's logits after the repetition penalty (CTRL-style), a request samples from
softmax(x / temperature) restricted to its top_k most likely tokens, then to the smallest set of most likely
tokens whose probabilities reach top_p, renormalised; "most likely" breaks ties by the lower token id, as a
stable sort does. Greedy (temperature below GREEDY_BELOW) and top_k 1 are exactly argmax (the lowest id among
ties, like np.argmax). Each request owns a ``numpy.random.Generator`` seeded from its seed; a sampled token
costs one ``rng.random()`` draw u, mapped through the inverse cumulative distribution of those probabilities
in a fixed order of the tokens (most likely first for top-k and top-p; otherwise the vocabulary column by
column, see BLOCK). That mapping is not the one of the row-by-row sampler before (commit f214b56): the same
seed gives the same distribution as it did, but not the same tokens.

**The batch.** Rows are grouped by what they need, and each group is computed at once: one argmax for the
greedy rows (a row at a time where a penalty applies, so that its float64 copy stays in the CPU's cache); one
exp over the rows that need the whole distribution (temperature alone, and top-p without top-k, whose nucleus
is a share of the whole vocabulary's mass); one selection and one sort of the candidates of the top-k and
top-p rows (a floor from the maxima of the vocabulary's columns, or an argpartition for wide sets). Per row
there remain the random draw and a few numpy calls on short arrays. Rows without a penalty use the float32
logits as they are (their order is that of float64, and the arithmetic casts them exactly); rows with one, a
float64 copy.

**Batch invariance**: the same seed and parameters give the same tokens whatever else shares the batch (which
rows, how many, in which order), because every number that decides a row's token is computed from that row
alone, by operations whose result does not depend on the array around it: casts, the penalty, the subtraction
of the row's maximum and the division by the temperature (IEEE element-wise; a maximum is exact); exp
(element-wise over a contiguous float64 buffer: each result depends on its argument only); comparisons,
partitions and sorts (exact; argpartition's arbitrary choice among tokens tied at the edge of its set is
replaced by the lowest ids, and a neighbour asking for more candidates only lengthens a row's exact prefix);
and sums taken in one fixed order, in float64: np.cumsum (sequential by definition) and column sums folded by
a fixed tree of element-wise additions. No np.sum (pairwise, with a blocking that can follow the array's shape
and alignment) and no float32 sum decides a draw.

Log-probabilities are those of the model's own distribution (log-softmax of the raw logits), as OpenAI's and
vLLM's APIs report them, not of the filtered sampling distribution.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from ..types import SamplingParams
from .sampling_head import DeviceLogits

# Top-p first ranks this many of the most likely tokens; a nucleus wider than that ranks WIDEN times more, and
# so on up to the whole vocabulary (a stable sort).
NUCLEUS_CANDIDATES = 256
WIDEN = 8
# The whole distribution's total: a row's vocabulary (padded with zeros) as BLOCK rows of ceil(V / BLOCK)
# tokens, token t at row t // width, column t % width. The rows are folded in halves (a fixed tree of
# element-wise additions, so each column's sum is taken in one fixed order), then a cumulative sum runs over
# the columns; a draw picks the column, then the token within it. Instead of one sequential sum over the
# vocabulary (3 ns a token). BLOCK is a power of two.
BLOCK = 64
# The whole distribution is computed this many bytes of float64 at a time, to stay in the CPU's cache.
CHUNK_BYTES = 1 << 20
_LARGEST = np.finfo(np.float64).max


class Sampler:
    """The sampling state of one sequence: its parameters, its random generator, the tokens seen so far."""

    __slots__ = ("_count", "_ids", "_seen", "_top", "params", "rng", "simple_greedy")

    def __init__(self, params: SamplingParams, seed: int, prompt_ids: Iterable[int] = ()) -> None:
        self.params = params
        self.rng = np.random.default_rng(seed)
        # Only the repetition penalty needs the history: the distinct ids seen, as a set and a growing array.
        self._seen: set[int] | None = set(prompt_ids) if params.repetition_penalty != 1.0 else None
        self._ids = np.fromiter(self._seen, dtype=np.int64) if self._seen is not None else None
        self._count = len(self._seen) if self._seen is not None else 0
        self._top = max(self._seen, default=-1) if self._seen is not None else -1
        # Greedy with nothing to apply per row: a batch of these is one argmax over the raw logits.
        self.simple_greedy = params.greedy and self._seen is None

    def observe(self, token: int) -> None:
        if self._seen is not None and token not in self._seen:
            self._seen.add(token)
            if self._count == len(self._ids):
                self._ids = np.resize(self._ids, max(16, 2 * self._count))
            self._ids[self._count] = token
            self._count += 1
            self._top = max(self._top, token)

    def _history(self, vocab: int) -> np.ndarray:
        """The distinct ids seen that have a logit (a prompt may hold ids past the sampled vocabulary)."""
        ids = self._ids[: self._count]
        return ids if self._top < vocab else ids[ids < vocab]

    def sample(self, logits: np.ndarray) -> int:
        """Picks the next token from one row of logits (vocab,), without recording it (sample_batch does)."""
        return _sample(np.asarray(logits)[None], [self])[0]


def sample_batch(
    logits: np.ndarray | DeviceLogits, samplers: Sequence[Sampler], want_logprobs: Sequence[bool]
) -> tuple[list[int], list[float | None]]:
    """Next token of every row of `logits` (B, vocab), and its log-probability where asked for; records each
    token in its sampler's history. `logits` on the device (DeviceLogits) give the same tokens."""
    tokens = _sample_device(logits, samplers) if isinstance(logits, DeviceLogits) else _sample(logits, samplers)
    logprobs: list[float | None] = [None] * len(samplers)
    rows = [i for i, w in enumerate(want_logprobs) if w]
    if rows:
        x = logits[rows]
        x = x.host() if isinstance(x, DeviceLogits) else x
        for i, lp in zip(rows, _logprobs(x, [tokens[i] for i in rows]).tolist()):
            logprobs[i] = lp
    for s, t in zip(samplers, tokens):
        if s._seen is not None:
            s.observe(t)
    return tokens, logprobs


def finite_rows(logits: np.ndarray | DeviceLogits, samplers: Sequence[Sampler] = ()) -> np.ndarray:
    """Per row (B,): no NaN and no +inf among its logits (a row that has one has no next token). On the device,
    with the `samplers` that will draw from these logits: the flags come from the head's run at the width they
    will ask for (one run a step), or from the host copy when every row will need the whole array anyway."""
    if isinstance(logits, DeviceLogits):
        ranked, width, _ = _device_rows(samplers, logits.vocab)
        if samplers and not ranked:
            return finite_rows(logits.host())
        logits.top(width)
        return logits.finite()
    return logits.max(axis=-1) < np.inf  # one pass: max is NaN when any value is


def greedy_tokens(logits: np.ndarray | DeviceLogits) -> list[int]:
    """The most likely token of each row (the lowest id among ties)."""
    if isinstance(logits, DeviceLogits):
        return logits.top(1)[1][:, 0].tolist()
    return np.argmax(logits, axis=-1).tolist()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log-softmax over the last axis, in float64 (sample_batch computes only its chosen tokens' values)."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _sample(logits: np.ndarray, samplers: Sequence[Sampler]) -> list[int]:
    n = len(logits)
    tokens = [0] * n
    # Plain greedy rows: one argmax of the raw logits. Rows with no history to penalise work on the logits as
    # they are (float32 values order and, cast exactly, compute as a float64 copy would); rows with one,
    # apart, on a float64 copy that has the penalty. Each part keeps its own faster sort.
    plain, raw, penalised = [], [], []
    for i, s in enumerate(samplers):
        (plain if s.simple_greedy else penalised if s._count else raw).append(i)
    if plain:
        _tokens_of(tokens, plain, np.argmax(logits if len(plain) == n else logits[plain], axis=-1).tolist())
    if raw:
        _tokens_of(
            tokens, raw, _sample_rows(logits if len(raw) == n else logits[raw], [samplers[i] for i in raw])
        )
    if penalised:
        _tokens_of(tokens, penalised, _sample_penalised(logits, penalised, [samplers[i] for i in penalised]))
    return tokens


def _sample_device(logits: DeviceLogits, samplers: Sequence[Sampler]) -> list[int]:
    """_sample's tokens from logits left on the device: the rows that need only their most likely tokens
    (argmax, top-k, top-p within top-k) and have no penalty to apply are drawn from the device's candidates;
    the others from the whole rows, copied to the host. The candidates are the logits of the host's ranking
    (`_ranked`), in its order, so every row gets the token the host path would give it."""
    vocab = logits.vocab
    ranked, width, rest = _device_rows(samplers, vocab)
    tokens = [0] * len(samplers)
    if ranked:
        values, order = logits[ranked].top(width)
        argmax, drawn = [], []
        for j, i in enumerate(ranked):
            (argmax if _argmax_only(samplers[i].params) else drawn).append(j)
        for j in argmax:
            tokens[ranked[j]] = int(order[j, 0])
        if drawn:
            group = [samplers[ranked[j]] for j in drawn]
            found, done = _draw_candidates(values[drawn], order[drawn], group, np.zeros(len(drawn)), vocab)
            for j, token, ok in zip(drawn, found, done.tolist()):
                if ok:
                    tokens[ranked[j]] = token
                else:  # not reached by a top-k row (width >= its k); kept exact all the same
                    rest.append(ranked[j])
    if rest:
        rest.sort()
        _tokens_of(tokens, rest, _sample(logits[rest].host(), [samplers[i] for i in rest]))
    return tokens


def _device_rows(samplers: Sequence[Sampler], vocab: int) -> tuple[list[int], int, list[int]]:
    """Which rows draw from the device's candidates (no penalty to apply; argmax, or top-k under the vocabulary),
    the width of candidates they need (at least 1), and the other rows (drawn from the whole rows)."""
    ranked, width, rest = [], 1, []
    for i, s in enumerate(samplers):
        p = s.params
        if not s._count and (_argmax_only(p) or 0 < p.top_k < vocab):
            ranked.append(i)
            width = max(width, 1 if _argmax_only(p) else p.top_k)
        else:
            rest.append(i)
    return ranked, width, rest


def _sample_penalised(logits: np.ndarray, rows: list[int], samplers: Sequence[Sampler]) -> list[int]:
    """The tokens of rows `rows` of logits, whose samplers have a penalty and a history."""
    found = [0] * len(rows)
    greedy, other = [], []
    for j, s in enumerate(samplers):
        (greedy if _argmax_only(s.params) else other).append(j)
    for j in greedy:
        found[j] = _penalised_argmax(logits[rows[j]], samplers[j])
    if other:
        x = np.empty((len(other), logits.shape[1]))
        for a, j in enumerate(other):
            x[a] = logits[rows[j]]
        group = [samplers[j] for j in other]
        _penalise(x, group)
        _tokens_of(found, other, _sample_rows(x, group))
    return found


def _tokens_of(tokens: list[int], rows: list[int], found: list[int]) -> None:
    for i, t in zip(rows, found):
        tokens[i] = t


def _argmax_only(p: SamplingParams) -> bool:
    return p.greedy or p.top_k == 1


def _sample_rows(x: np.ndarray, samplers: Sequence[Sampler]) -> list[int]:
    """The tokens of rows x (R, V), logits after the penalty, each group of rows at once."""
    vocab = x.shape[1]
    argmax_rows, whole_rows, ranked_rows = [], [], []
    for r, s in enumerate(samplers):
        p = s.params
        if _argmax_only(p):
            argmax_rows.append(r)
            continue
        top_k = 0 < p.top_k < vocab
        if not top_k:
            whole_rows.append(r)  # temperature alone, or top-p: a share of the whole vocabulary
        if top_k or p.top_p < 1.0:
            ranked_rows.append(r)
    found = [0] * len(samplers)
    if argmax_rows:
        _tokens_of(found, argmax_rows, np.argmax(_rows(x, argmax_rows), axis=-1).tolist())
    totals: dict[int, float] = {}
    if whole_rows:
        xs = _rows(x, whole_rows)
        e, columns = _exp_blocked(xs, np.array([samplers[r].params.temperature for r in whole_rows]))
        for j, r in enumerate(whole_rows):
            if samplers[r].params.top_p < 1.0:
                totals[r] = float(columns[j, -1])
            else:
                found[r] = _draw_blocked(samplers[r].rng, e[j], columns[j], xs[j])
    if ranked_rows:
        _tokens_of(found, ranked_rows, _draw_ranked(_rows(x, ranked_rows), ranked_rows, samplers, totals))
    return found


def _rows(x: np.ndarray, rows: list[int]) -> np.ndarray:
    return x if len(rows) == len(x) else x[rows]


def _penalise(x: np.ndarray, samplers: Sequence[Sampler]) -> None:
    """The repetition penalty, in place on x (R, V), float64, for all rows at once."""
    vocab = x.shape[1]
    ids = [s._history(vocab) for s in samplers]
    counts = [len(a) for a in ids]
    at = np.concatenate(ids) + np.repeat(np.arange(len(samplers), dtype=np.int64) * vocab, counts)
    flat = x.reshape(-1)  # a view: x is C-contiguous
    flat[at] = _ctrl(flat[at], np.repeat(np.array([s.params.repetition_penalty for s in samplers]), counts))


def _ctrl(v: np.ndarray, penalty: np.ndarray | float) -> np.ndarray:
    """CTRL's repetition penalty (Keskar et al. 2019) of seen tokens' logits v, in float64: pushed towards
    "less likely" whatever their sign (divided by the penalty when positive, multiplied otherwise)."""
    v = np.asarray(v, dtype=np.float64)
    with np.errstate(over="ignore"):  # a penalty below 1 may push a huge logit to inf: see _scale
        return np.where(v > 0, v / penalty, v * penalty)


def _penalised_argmax(row: np.ndarray, s: Sampler) -> int:
    """argmax of one row of logits (V,) after s's penalty, the lowest id among ties: a row at a time, so that
    its float64 copy stays in the CPU's cache (a copy of the whole batch would not)."""
    x = row.astype(np.float64)
    ids = s._history(len(x))
    x[ids] = _ctrl(x[ids], s.params.repetition_penalty)
    return int(np.argmax(x))


def _scale(x: np.ndarray, peak: np.ndarray, temperature: np.ndarray | None, out: np.ndarray) -> None:
    """out = (x - peak) / temperature, row by row, in float64: x (R, n) logits, peak (R,) each row's maximum.
    Every value is at most 0, so exp(out) never overflows."""
    peak = peak.astype(np.float64)
    if not np.isfinite(peak).all():
        # A row of -inf logits has no mass (its draw falls back to the most likely token); a logit the penalty
        # pushed past float64 (+inf) counts as the largest number, its row drawing among such tokens alone.
        x = np.minimum(x, np.float64(_LARGEST))
        peak = np.where(peak == -np.inf, 0.0, np.minimum(peak, _LARGEST))
    np.subtract(x, peak[:, None], out=out)
    if temperature is not None:
        out /= temperature[:, None]


def _exp_blocked(x: np.ndarray, temperature: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """exp((x - max) / T) of each row of x (R, V), in a buffer (R, BLOCK * width) with zeros past V; and the
    cumulative sums over its columns (R, width), of which the last is the row's total (see BLOCK)."""
    rows, vocab = x.shape
    width = -(-vocab // BLOCK)
    e = np.empty((rows, BLOCK * width))
    columns = np.empty((rows, width))
    step = max(1, CHUNK_BYTES // e[0].nbytes)
    for a in range(0, rows, step):
        b = min(rows, a + step)
        part = e[a:b]
        _scale(x[a:b], x[a:b].max(axis=1), None if temperature is None else temperature[a:b], part[:, :vocab])
        part[:, vocab:] = -np.inf
        np.exp(part, out=part)
        fold = part.reshape(b - a, BLOCK, width)
        while fold.shape[1] > 1:
            half = fold.shape[1] // 2
            fold = fold[:, :half] + fold[:, half:]
        np.cumsum(fold[:, 0], axis=1, out=columns[a:b])
    return e, columns


def _draw_blocked(rng: np.random.Generator, e: np.ndarray, columns: np.ndarray, x: np.ndarray) -> int:
    """One token from the whole distribution: e a row of _exp_blocked, columns its cumulative column sums."""
    total = columns[-1]
    if not total > 0:
        return int(np.argmax(x))
    target = rng.random() * total  # below total: u < 1
    width = len(columns)
    j = int(np.searchsorted(columns, target, side="right"))
    column = e[j::width]
    within = np.cumsum(column)  # its last may differ from the column's folded sum in the last bits
    i = int(np.searchsorted(within, target - columns[j - 1] if j else target, side="right"))
    if i == len(column):  # past the column's sequential total: its last token of any mass
        i = int(np.flatnonzero(column)[-1])
    return i * width + j


def _draw_ranked(
    x: np.ndarray, rows: list[int], samplers: Sequence[Sampler], totals: dict[int, float]
) -> list[int]:
    """Tokens of the top-k and top-p rows, x (R, V) their logits, from their most likely candidates. `totals`:
    the whole distribution's total of each top-p row without top-k (its nucleus is a share of that)."""
    vocab = x.shape[1]
    group = [samplers[r] for r in rows]
    total = np.array([totals.get(r, 0.0) for r in rows])
    width = min(vocab, max(_top_k(s.params, vocab) or NUCLEUS_CANDIDATES for s in group))
    found = [0] * len(rows)
    pending = np.arange(len(rows))
    while len(pending):
        xs = x if len(pending) == len(x) else x[pending]
        order = _ranked(xs, width)  # (P, width), most likely first
        values = np.take_along_axis(xs, order, axis=1)
        drawn, done = _draw_candidates(values, order, [group[i] for i in pending], total[pending], vocab)
        for j in np.flatnonzero(done).tolist():
            found[int(pending[j])] = drawn[j]
        pending = pending[~done]
        width = min(vocab, width * WIDEN)
    return found


def _top_k(p: SamplingParams, vocab: int) -> int:
    """The request's top-k, 0 when it keeps the whole vocabulary."""
    return p.top_k if 0 < p.top_k < vocab else 0


def _draw_candidates(
    values: np.ndarray, order: np.ndarray, samplers: Sequence[Sampler], total: np.ndarray, vocab: int
) -> tuple[list[int], np.ndarray]:
    """Draws each row's token from its `width` most likely tokens: `order` (R, width) their ids, most likely
    first, `values` their logits; `total` each top-p row's whole-vocabulary total (without top-k, its nucleus
    is a share of that). Returns the tokens and which rows were done: a row whose nucleus reaches past the
    candidates (and that does not have them all) needs more of them."""
    params = [s.params for s in samplers]
    width = values.shape[1]
    k = np.array([_top_k(p, vocab) for p in params])
    e = np.empty(values.shape)
    _scale(values, values[:, 0], np.array([p.temperature for p in params]), e)
    np.exp(e, out=e)
    cum = np.cumsum(e, axis=1)
    # The mass top_p is a share of: the top-k set's, or the whole vocabulary's.
    base = np.where(k > 0, cum[np.arange(len(values)), np.maximum(k, 1) - 1], total)
    reach = cum >= (np.array([p.top_p for p in params]) * base)[:, None]  # a top-k row reaches it by its k-th
    count = np.where(reach[:, -1], reach.argmax(axis=1) + 1, width)
    done = reach[:, -1] | (width == vocab)
    found = [
        _pick(s.rng, order[j], cum[j], int(count[j])) if ok else 0
        for j, (s, ok) in enumerate(zip(samplers, done.tolist()))
    ]
    return found, done


def _pick(rng: np.random.Generator, order: np.ndarray, cum: np.ndarray, count: int) -> int:
    """One of the `count` first tokens of `order`, by their cumulative (unnormalised) probabilities `cum`."""
    total = cum[count - 1]
    if not total > 0:
        return int(order[0])
    # rng.random() < 1: the target lies below total, and the first cumulative above it has a mass of its own.
    return int(order[np.searchsorted(cum[:count], rng.random() * total, side="right")])


def _ranked(x: np.ndarray, width: int) -> np.ndarray:
    """The `width` most likely tokens of each row of x (R, V), most likely first, ties by lower id: the first
    `width` of a stable argsort of -x, without sorting the whole vocabulary."""
    rows, vocab = x.shape
    if width + 1 >= vocab:
        return _most_likely_first(x, np.broadcast_to(np.arange(vocab), x.shape))[:, :width]
    group = min(16, vocab // (4 * width))
    if group < 2:
        return _ranked_by_partition(x, width)
    # The floor: with the vocabulary laid out as `group` rows, the width-th best of the columns' best tokens.
    # At least `width` tokens reach it, so every token of the `width` best (ties included) is at or above it.
    columns = vocab // group
    best = x[:, : group * columns].reshape(rows, group, columns).max(axis=1)
    floor = np.partition(best, columns - width, axis=1)[:, columns - width]
    keep = x >= floor[:, None]
    keep[:, group * columns :] = True  # the few tokens past the grid
    counts = np.count_nonzero(keep, axis=1)
    crowded = counts > 8 * width  # many tokens tied at the floor: a partition is cheaper
    if not crowded.any():
        return _ranked_among(x, keep, counts, width)
    order = np.empty((rows, width), dtype=np.int64)
    order[crowded] = _ranked_by_partition(x[crowded], width)
    if not crowded.all():
        order[~crowded] = _ranked_among(x[~crowded], keep[~crowded], counts[~crowded], width)
    return order


def _ranked_among(x: np.ndarray, keep: np.ndarray, counts: np.ndarray, width: int) -> np.ndarray:
    """_ranked's answer from candidates `keep` (R, V) that hold each row's `width` best, `counts` per row."""
    rows, vocab = x.shape
    flat = np.flatnonzero(keep)  # row by row
    row, token = np.divmod(flat, vocab)
    at = np.arange(len(flat)) - (np.cumsum(counts) - counts)[row]
    # Each row's candidates in a row of their own, padded with -inf at an id past the vocabulary: last.
    values = np.full((rows, int(counts.max())), -np.inf, dtype=x.dtype)
    ids = np.full(values.shape, vocab, dtype=np.int64)
    values[row, at] = x.reshape(-1)[flat]
    ids[row, at] = token
    return _most_likely_first(values, ids)[:, :width]


def _ranked_by_partition(x: np.ndarray, width: int) -> np.ndarray:
    """_ranked by one argpartition of each row (width + 1 < V)."""
    vocab = x.shape[1]
    part = np.argpartition(x, vocab - width - 1, axis=1)[:, vocab - width - 1 :]
    top = part[:, 1:]  # the `width` largest, in no order; part[:, 0] is the best token left out
    order = _most_likely_first(np.take_along_axis(x, top, axis=1), top)
    # Of the tokens tied with the last one kept, argpartition kept an arbitrary few: the lowest ids are due.
    edge = np.take_along_axis(x, part[:, :1], axis=1)[:, 0]
    last = np.take_along_axis(x, order[:, -1:], axis=1)[:, 0]
    for r in np.flatnonzero(last == edge).tolist():
        first = int(np.count_nonzero(x[r, order[r]] > edge[r]))
        order[r, first:] = np.flatnonzero(x[r] == edge[r])[: width - first]
    return order


def _most_likely_first(values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The ids of each row (R, n) by decreasing value, ties by lower id (ids below 2**32)."""
    if values.dtype != np.float32:
        return np.take_along_axis(ids, np.lexsort((ids, -values), axis=1), axis=1)
    # One integer key each, the value's bits mapped so that integer order is decreasing value order, then the
    # id: the keys are distinct, so a plain sort of them is the stable sort (six times faster than lexsort).
    values = values + np.float32(0)  # -0.0 becomes 0.0, its equal
    bits = values.view(np.uint32)
    down = np.where(np.signbit(values), bits, ~bits & np.uint32(0x7FFFFFFF))
    keys = (down.astype(np.uint64) << np.uint64(32)) | ids.astype(np.uint64)
    keys.sort(axis=1)
    return (keys & np.uint64(0xFFFFFFFF)).astype(np.int64)


def _logprobs(logits: np.ndarray, tokens: list[int]) -> np.ndarray:
    """log-softmax of each row of the raw logits (R, V) at its token, with the same fixed-order sums."""
    _, columns = _exp_blocked(logits, None)
    chosen = logits[np.arange(len(logits)), tokens].astype(np.float64)
    return (chosen - logits.max(axis=1)) - np.log(columns[:, -1])
