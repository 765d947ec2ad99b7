"""Property-based fuzzing (hypothesis) of every RPC of nlpserve.v1.InferenceService on the real server.

Every well-formed request (any message the protobuf accepts, fields drawn broadly: real, empty, unicode and
long model names and texts, every numeric field at its edges, NaN and infinities, stop sequences, seeds, chat
messages, truncation flags) must get a clean status: never INTERNAL or UNKNOWN, and exactly the status the
documented limits (docs/server.md) call for, which an oracle here predicts from the models' own ModelInfo and
tokenizers; an INVALID_ARGUMENT message names the bad field, and no message echoes unbounded input. Bodies
that are not a valid message (invalid UTF-8 in a string field, a truncated message, garbage) must get
INVALID_ARGUMENT; a unary call that half-closes without a message must get its status at once. After all of
it the server answers exactly as before, with nothing in its log.

Bounded: a fixed number of examples per property, derandomized (the same examples on every run, in CI too)
and without an example database; every call has a timeout.
"""

from __future__ import annotations

import collections
import json
import math
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from e2e_util import scrape, start
from google.protobuf import text_format
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from client.proto import inference_pb2 as pb
from server.process import ServerProcess

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}

SERVICE = "/nlpserve.v1.InferenceService/"
CALL_TIMEOUT = 30.0  # seconds per call: generous (a call here takes milliseconds), so only a hang reaches it
# An error message is short whatever the input: the server quotes at most 64 characters of it (errors.shown),
# which repr() may widen up to tenfold for unprintable characters ('\U000e0001'), plus the sentence around.
MAX_DETAILS = 1024
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # the server's default --max-message-bytes

FUZZ = settings(
    derandomize=True,  # the same examples on every run
    database=None,
    deadline=None,  # a real server on a shared machine: no per-example time limit
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    print_blob=False,
)


# Statuses seen by the running test, by method: each test checks that its requests reached both the success
# path and the refusals (a strategy that drew only bad requests would test little).
SEEN: collections.Counter[tuple[str, grpc.StatusCode]] = collections.Counter()


def fuzz(max_examples: int) -> settings:
    return settings(FUZZ, max_examples=max_examples)


class Shown:
    """A drawn value that hypothesis reports briefly: a falsifying example of 100,000 characters would bury
    the failure (the test's own message describes the request too)."""

    __slots__ = ("value",)

    def __init__(self, value) -> None:
        self.value = value

    def __repr__(self) -> str:
        return _brief(self.value)


def shown_example(**kwargs) -> Callable:
    return example(**{name: Shown(value) for name, value in kwargs.items()})


# ------------------------------------------------------------------------------------------------------------
# The oracle: which outcomes the documented limits allow for a request.


@dataclass(frozen=True)
class Outcome:
    """One acceptable result: a status code, and for INVALID_ARGUMENT the field its message must name."""

    code: grpc.StatusCode
    field: str | None = None


@dataclass
class Served:
    info: pb.ModelInfo
    tokenizer: Tokenizer | None  # configured as the server configures it; None when its file is not found


class Oracle:
    """The served models as ListModels describes them, with their tokenizers, and the outcomes each request
    may get (`classify`, `generate`, `get_model`): OK when nothing is wrong, else one of the failures."""

    def __init__(
        self, models_dir: Path, infos: Iterable[pb.ModelInfo], chat_roles: dict[str, tuple[str, ...]]
    ) -> None:
        self.models: dict[str, Served] = {}
        # Models whose chat template this module wrote (CHAT_TEMPLATE): the roles it accepts.
        self.chat_roles = chat_roles
        for info in infos:
            path = models_dir / info.name / info.version / "tokenizer.json"
            tokenizer = Tokenizer.from_file(str(path)) if path.exists() else None
            if tokenizer is not None:
                tokenizer.no_padding()
                if info.kind in (pb.MODEL_KIND_CLASSIFIER, pb.MODEL_KIND_EMBEDDER):
                    tokenizer.enable_truncation(info.limits.max_sequence_length)
                else:
                    tokenizer.no_truncation()
            self.models[info.name] = Served(info, tokenizer)

    def of_kind(self, kind: int) -> list[Served]:
        return [m for m in self.models.values() if m.info.kind == kind]

    def pick(self, name: str, kind: int) -> tuple[Served | None, list[Outcome]]:
        """The model a request names (or the only one of its kind), or the failures of that choice."""
        if not name:
            of_kind = self.of_kind(kind)
            if len(of_kind) == 1:
                return of_kind[0], []
            return None, [Outcome(INVALID, "model") if of_kind else Outcome(NOT_FOUND)]
        served = self.models.get(name)
        if served is None:
            return None, [Outcome(NOT_FOUND)]
        if served.info.kind != kind:
            return None, [Outcome(INVALID, "model")]
        return served, []

    def classify(self, req: pb.ClassifyRequest) -> list[Outcome]:
        served, failures = self.pick(req.model, pb.MODEL_KIND_CLASSIFIER)
        if served is None:
            return failures
        if req.return_embedding and not served.info.embedding_size:
            failures.append(Outcome(INVALID, "return_embedding"))
        return self.texts_outcomes(served, req, failures)

    def embed(self, req: pb.EmbedRequest) -> list[Outcome]:
        served, failures = self.pick(req.model, pb.MODEL_KIND_EMBEDDER)
        if served is None:
            return failures
        if not 0 <= req.dimensions <= served.info.embedding_size:
            failures.append(Outcome(INVALID, "dimensions"))
        return self.texts_outcomes(served, req, failures)

    def texts_outcomes(self, served: Served, req: Message, failures: list[Outcome]) -> list[Outcome]:
        """The outcomes of an encoder request's texts, after the failures of its other fields."""
        info = served.info
        if not req.texts or len(req.texts) > info.limits.max_texts_per_request:
            failures.append(Outcome(INVALID, "texts"))
        failures += [Outcome(INVALID, f"texts[{i}]") for i, t in enumerate(req.texts) if not t]
        if req.no_truncation and not failures:
            if served.tokenizer is None:
                return [Outcome(OK), *(Outcome(INVALID, f"texts[{i}]") for i in range(len(req.texts)))]
            encodings = served.tokenizer.encode_batch(list(req.texts))
            failures += [Outcome(INVALID, f"texts[{i}]") for i, e in enumerate(encodings) if e.overflowing]
            if not failures:
                # The server may cut a very long text before tokenizing it and count it as too long.
                maybe = [i for i, t in enumerate(req.texts) if self.maybe_cut(info, t)]
                return [Outcome(OK), *(Outcome(INVALID, f"texts[{i}]") for i in maybe)]
        return failures or [Outcome(OK)]

    @staticmethod
    def maybe_cut(info: pb.ModelInfo, text: str) -> bool:
        """Whether the server may cut `text` before tokenizing it (and flag it truncated, or refuse it under
        no_truncation) even when all its tokens would fit: past max_sequence_length x 100 characters, the
        most a WordPiece token reads (server/classify.py cuts at x 128)."""
        return len(text) > info.limits.max_sequence_length * 100

    def generate(self, req: pb.GenerateRequest) -> list[Outcome]:
        served, failures = self.pick(req.model, pb.MODEL_KIND_GENERATOR)
        if served is None:
            return failures
        info = served.info
        limits = info.limits
        if req.messages:
            if req.prompt or not info.chat:
                failures.append(Outcome(INVALID, "messages"))
        elif not req.prompt:
            failures.append(Outcome(INVALID, "prompt"))
        p = req.parameters
        has = p.HasField
        if has("max_new_tokens") and not 1 <= p.max_new_tokens <= limits.max_new_tokens:
            failures.append(Outcome(INVALID, "parameters.max_new_tokens"))
        if not math.isfinite(p.temperature) or p.temperature < 0:
            failures.append(Outcome(INVALID, "parameters.temperature"))
        if p.top_k < 0:
            failures.append(Outcome(INVALID, "parameters.top_k"))
        if has("top_p") and not (0 < p.top_p <= 1):  # NaN fails both comparisons
            failures.append(Outcome(INVALID, "parameters.top_p"))
        if has("repetition_penalty") and not (0 < p.repetition_penalty < math.inf):
            failures.append(Outcome(INVALID, "parameters.repetition_penalty"))
        if len(p.stop) > limits.max_stop_sequences:
            failures.append(Outcome(INVALID, "parameters.stop"))
        failures += [Outcome(INVALID, f"parameters.stop[{i}]") for i, s in enumerate(p.stop) if not s]
        if failures:
            return failures
        if req.messages:
            roles = self.chat_roles.get(info.name)
            if roles is not None and any(m.role not in roles for m in req.messages):
                return [Outcome(INVALID, "messages")]  # the template's raise_exception
            # Rendered by the model's template, then tokenized: whether it fits is the server's to judge.
            return [Outcome(OK), Outcome(INVALID, "messages")]
        if served.tokenizer is None:
            return [Outcome(OK), Outcome(INVALID, "prompt")]
        tokens = len(served.tokenizer.encode(req.prompt).ids)
        max_new = p.max_new_tokens if has("max_new_tokens") else limits.default_max_new_tokens
        if not tokens or tokens + max_new > limits.max_sequence_length:
            return [Outcome(INVALID, "prompt")]
        return [Outcome(OK)]

    def get_model(self, req: pb.GetModelRequest) -> list[Outcome]:
        return [Outcome(OK)] if req.name in self.models else [Outcome(NOT_FOUND)]

    def outcomes(self, method: str, req: Message) -> list[Outcome]:
        if req.ByteSize() > MAX_MESSAGE_BYTES:
            return [Outcome(RESOURCE_EXHAUSTED)]  # gRPC refuses it before the server sees it
        if method == "Classify":
            return self.classify(req)
        if method == "Embed":
            return self.embed(req)
        if method in ("Generate", "GenerateStream"):
            return self.generate(req)
        if method == "GetModel":
            return self.get_model(req)
        return [Outcome(OK)]  # ListModels


# ------------------------------------------------------------------------------------------------------------
# Checking a result against the oracle.


@dataclass
class Result:
    code: grpc.StatusCode
    details: str
    responses: list  # the messages received (one for unary methods, any number for GenerateStream)


def call_unary(fn: Callable, req, timeout: float = CALL_TIMEOUT) -> Result:
    try:
        return Result(OK, "", [fn(req, timeout=timeout)])
    except grpc.RpcError as exc:
        return Result(exc.code(), exc.details() or "", [])


def call_stream(fn: Callable, req, timeout: float = CALL_TIMEOUT) -> Result:
    received: list = []
    try:
        received.extend(fn(req, timeout=timeout))
    except grpc.RpcError as exc:
        return Result(exc.code(), exc.details() or "", received)
    return Result(OK, "", received)


def check_status(result: Result, allowed: list[Outcome], what: str) -> None:
    """The status is clean, short, one of the allowed outcomes, and an INVALID_ARGUMENT names its field."""
    SEEN[what.split("(", 1)[0], result.code] += 1
    assert result.code not in NEVER, f"{what}: {result.code.name} {result.details[:300]!r}"
    assert len(result.details) <= MAX_DETAILS, (
        f"{what}: a {len(result.details)}-character message: {result.details[:300]!r}..."
    )
    codes = {o.code for o in allowed}
    assert result.code in codes, (
        f"{what}: {result.code.name} {result.details[:300]!r}, expected one of {sorted(c.name for c in codes)}"
    )
    if result.code is INVALID:
        fields = {o.field for o in allowed if o.code is INVALID}
        named = result.details.split(":", 1)[0]
        assert named in fields, (
            f"{what}: {result.details[:300]!r} names {named!r}, not one of {sorted(fields)}"
        )


def check_classification(oracle: Oracle, req: pb.ClassifyRequest, r: pb.ClassifyResponse) -> None:
    served, _ = oracle.pick(req.model, pb.MODEL_KIND_CLASSIFIER)
    info = served.info
    assert r.model == info.name and r.model_version == info.version
    assert list(r.labels) == list(info.labels)
    assert len(r.results) == len(req.texts)
    for c in r.results:
        probabilities = list(c.probabilities)
        assert len(probabilities) == len(r.labels)
        assert all(0 <= x <= 1 for x in probabilities)
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)
        assert c.label == r.labels[probabilities.index(max(probabilities))]
        assert c.score == pytest.approx(max(probabilities))
        assert 0 < c.num_tokens <= info.limits.max_sequence_length
    for text, c in zip(req.texts, r.results):
        assert not (req.no_truncation and c.truncated)
        if c.truncated and not Oracle.maybe_cut(info, text):
            assert c.num_tokens == info.limits.max_sequence_length, "truncated, yet shorter than the limit"
        assert len(c.embedding) == (info.embedding_size if req.return_embedding else 0)
        assert all(math.isfinite(x) for x in c.embedding)


def check_embedding(oracle: Oracle, req: pb.EmbedRequest, r: pb.EmbedResponse) -> None:
    served, _ = oracle.pick(req.model, pb.MODEL_KIND_EMBEDDER)
    info = served.info
    assert r.model == info.name and r.model_version == info.version
    assert r.dimensions == (req.dimensions or info.embedding_size) and r.normalized == info.normalized
    assert len(r.embeddings) == len(req.texts)
    for text, e in zip(req.texts, r.embeddings):
        assert len(e.values) == r.dimensions and all(math.isfinite(x) for x in e.values)
        if r.normalized:
            assert math.sqrt(sum(x * x for x in e.values)) == pytest.approx(1.0, abs=1e-4)
        assert 0 < e.num_tokens <= info.limits.max_sequence_length
        assert not (req.no_truncation and e.truncated)
        if e.truncated and not Oracle.maybe_cut(info, text):
            assert e.num_tokens == info.limits.max_sequence_length, "truncated, yet shorter than the limit"


def check_generation(oracle: Oracle, req: pb.GenerateRequest, messages: list[pb.GenerateResponse]) -> None:
    """An answer (the unary one, or a stream's messages) is what the request asked for."""
    served, _ = oracle.pick(req.model, pb.MODEL_KIND_GENERATOR)
    info = served.info
    p = req.parameters
    assert messages, "no message"
    last = messages[-1]
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
    assert last.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP, pb.FINISH_REASON_EOS)
    assert all(m.model == info.name and m.model_version == info.version for m in messages)
    text = "".join(m.text for m in messages)
    token_ids = [t for m in messages for t in m.token_ids]
    logprobs = [x for m in messages for x in m.logprobs]
    max_new = p.max_new_tokens if p.HasField("max_new_tokens") else info.limits.default_max_new_tokens
    assert last.usage.generated_tokens == len(token_ids), "tokens lost or invented"
    assert 1 <= len(token_ids) <= max_new
    if last.finish_reason == pb.FINISH_REASON_LENGTH:
        assert len(token_ids) == max_new
    assert 0 < last.usage.prompt_tokens
    assert last.usage.prompt_tokens + len(token_ids) <= info.limits.max_sequence_length
    assert all(0 <= t < 1 << 31 for t in token_ids)
    if p.logprobs:
        assert len(logprobs) == len(token_ids)
        assert all(x <= 1e-4 for x in logprobs), logprobs  # log-probabilities, NaN fails too
    else:
        assert not logprobs
    assert "\ufffd" not in text, "a broken character was sent"
    for stop in p.stop:
        assert stop not in text, f"stop sequence {stop!r} returned in {text!r}"
    t = last.timings
    assert 0 <= t.queue_seconds <= t.time_to_first_token_seconds <= t.total_seconds


# ------------------------------------------------------------------------------------------------------------
# Strategies: well-formed requests of every RPC, fields drawn broadly.

SPECIAL_TEXTS = [
    "", " ", "  \t\n ", "\n", "\r\n", "\x00", "a\x00b", "\x1b[31m", "\x7f", "\u0085", "\u200b", "\ufeff",
    "\ufffd", "\uffff", "\U0010ffff", "\U000e0001", "é", "e\u0301", "👩‍👩‍👧", "\u202eabc", "日本語のテキスト",
    "مرحبا", "%", "%00%s%n", "\\", "'\"", "{}", "{{ x }}", "<|endoftext|>", "</s>", "[CLS]", "[SEP]", "[PAD]",
    "[MASK]", "[UNK]", "def load(path):", "I loved this movie",
]  # fmt: skip
_short_text = st.one_of(st.sampled_from(SPECIAL_TEXTS), st.text(max_size=40), st.text(max_size=300))
# Long-ish strings cheaply: a short unit repeated (up to 40k characters).
_long_text = st.builds(lambda unit, n: unit * n, st.text(min_size=1, max_size=8), st.integers(20, 5000))
texts = st.one_of(_short_text, _short_text, _long_text)


_nonempty_text = st.one_of(
    st.sampled_from([t for t in SPECIAL_TEXTS if t]), st.text(min_size=1, max_size=40), st.text(min_size=1)
)


def mostly(usual: st.SearchStrategy, broad: st.SearchStrategy) -> st.SearchStrategy:
    """Usually (4 times in 5) a value from `usual`, else one from `broad`: each field of a request is drawn
    broadly, yet enough requests have every field valid to reach the success path."""
    return st.sampled_from((usual, usual, usual, usual, broad)).flatmap(lambda strategy: strategy)


def model_names(oracle: Oracle, kind: int) -> st.SearchStrategy[str]:
    """Mostly a model of `kind` (or "", the only one), else a model of another kind, a near miss, anything."""
    right = ["", *(m.info.name for m in oracle.of_kind(kind))]
    every = sorted(oracle.models)
    near = [variant for name in every for variant in (name.upper(), f" {name}", f"{name}\x00", f"{name}/1")]
    return mostly(st.sampled_from(right), st.one_of(st.sampled_from(every + near), texts))


INT32_EDGES = [0, 1, -1, 2, 7, 63, 64, 65, 127, 128, 129, 255, 256, 257, 2**31 - 1, -(2**31)]
int32s = st.one_of(st.sampled_from(INT32_EDGES), st.integers(-(2**31), 2**31 - 1))
FLOAT_EDGES = [
    0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e-5, 9.99e-6, 1.0000001, 0.9999999, 1e-45, -1e-45, 1.1754944e-38,
    3.4028235e38, -3.4028235e38, math.inf, -math.inf, math.nan,
]  # fmt: skip
float32s = st.one_of(st.sampled_from(FLOAT_EDGES), st.floats(width=32))
uint64s = st.one_of(st.sampled_from([0, 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))


def optional(strategy: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.none(), strategy)


@st.composite
def generation_parameters(draw) -> pb.GenerationParameters | None:
    if draw(st.integers(0, 9)) == 0:
        return None  # the field unset
    fields = {
        # Short generations mostly; unset (the model's default), its limit and beyond, negative, huge.
        "max_new_tokens": draw(mostly(optional(st.integers(1, 8)), int32s)),
        "temperature": draw(mostly(st.one_of(st.just(0.0), st.floats(0.0, 2.0, width=32)), float32s)),
        "top_k": draw(mostly(st.one_of(st.just(0), st.integers(0, 500)), int32s)),
        "top_p": draw(mostly(optional(st.floats(0.0625, 1.0, width=32)), float32s)),
        "repetition_penalty": draw(mostly(optional(st.floats(0.5, 2.0, width=32)), float32s)),
        "seed": draw(optional(uint64s)),
        "logprobs": draw(st.booleans()),
    }
    stop = draw(
        mostly(
            st.lists(_nonempty_text, max_size=3),
            st.one_of(st.lists(_short_text, max_size=10), st.lists(texts, max_size=3)),
        )
    )
    return pb.GenerationParameters(stop=stop, **{k: v for k, v in fields.items() if v is not None})


chat_messages = st.lists(
    st.builds(
        pb.ChatMessage,
        role=st.one_of(st.sampled_from(["system", "user", "assistant", "tool", "", "USER"]), _short_text),
        content=texts,
    ),
    max_size=4,
)


# Conversations that may fit the quick model's context: mostly roles the template knows, short contents.
conversations = st.lists(
    st.builds(
        pb.ChatMessage,
        role=mostly(st.sampled_from(["system", "user", "assistant"]), st.sampled_from(["tool", "", "USER"])),
        content=mostly(st.text(max_size=30), texts),
    ),
    min_size=1,
    max_size=3,
)


def generate_requests(oracle: Oracle) -> st.SearchStrategy[pb.GenerateRequest]:
    @st.composite
    def build(draw) -> pb.GenerateRequest:
        # A prompt (mostly), a conversation, or anything: both, neither, any messages.
        kind = draw(st.sampled_from(["prompt", "prompt", "prompt", "chat", "any"]))
        prompt = {"prompt": _nonempty_text, "chat": st.just(""), "any": texts}[kind]
        messages = {"prompt": st.just([]), "chat": conversations, "any": chat_messages}[kind]
        req = pb.GenerateRequest(
            model=draw(model_names(oracle, pb.MODEL_KIND_GENERATOR)),
            prompt=draw(prompt),
            messages=draw(messages),
        )
        parameters = draw(generation_parameters())
        if parameters is not None:
            req.parameters.CopyFrom(parameters)
        return req

    return build()


def classify_requests(oracle: Oracle) -> st.SearchStrategy[pb.ClassifyRequest]:
    many = st.builds(lambda n, t: [t] * n, st.integers(250, 260), _short_text)  # around the per-request limit
    return st.builds(
        pb.ClassifyRequest,
        model=model_names(oracle, pb.MODEL_KIND_CLASSIFIER),
        texts=mostly(
            st.lists(_nonempty_text, min_size=1, max_size=6),
            st.one_of(st.lists(texts, max_size=6), st.lists(_short_text, max_size=40), many),
        ),
        return_embedding=st.booleans(),
        no_truncation=st.booleans(),
    )


def embed_requests(oracle: Oracle) -> st.SearchStrategy[pb.EmbedRequest]:
    dims = [m.info.embedding_size for m in oracle.of_kind(pb.MODEL_KIND_EMBEDDER)] or [0]
    edges = [0, 1, *dims, *(d + 1 for d in dims), -1]
    return st.builds(
        pb.EmbedRequest,
        model=model_names(oracle, pb.MODEL_KIND_EMBEDDER),
        texts=mostly(
            st.lists(_nonempty_text, min_size=1, max_size=6),
            st.one_of(st.lists(texts, max_size=6), st.lists(_short_text, max_size=40)),
        ),
        no_truncation=st.booleans(),
        dimensions=mostly(st.sampled_from(edges), int32s),
    )


def get_model_requests(oracle: Oracle) -> st.SearchStrategy[pb.GetModelRequest]:
    names = sorted(oracle.models)
    return st.builds(pb.GetModelRequest, name=mostly(st.sampled_from(names), model_names(oracle, 0)))


def assert_reached(method: str, *codes: grpc.StatusCode) -> None:
    """The examples of a test reached each of these statuses of `method` (so they tested its success path and
    its refusals, not one of them only)."""
    seen = {code: n for (m, code), n in SEEN.items() if m == method}
    missing = [code.name for code in codes if not seen.get(code)]
    assert not missing, f"no example of {method} got {missing}; got {[(c.name, n) for c, n in seen.items()]}"


# ------------------------------------------------------------------------------------------------------------
# Fixtures


# Given to every generator without a chat template (the quick docgpt has none), so that conversations go
# through a real template (rendering, its raise_exception, the rendered prompt's length) instead of stopping at
# "no chat template". Written like the templates of Hugging Face tokenizers, which refuse roles they do not
# know with raise_exception (here quoting the role: the server must bound what it echoes).
CHAT_TEMPLATE = """\
{% for message in messages %}
{% if message['role'] not in ['system', 'user', 'assistant'] %}
{{ raise_exception('Unknown role: ' ~ message['role']) }}
{% endif %}
<|{{ message['role'] }}|>
{{ message['content'] }}
{% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}
"""
CHAT_ROLES = ("system", "user", "assistant")


@pytest.fixture(scope="module")
def fuzz_repo(
    models: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, tuple[str, ...]]]:
    """The repository under test (links to its files), with CHAT_TEMPLATE beside each generator that has no
    chat template; and the names of those generators, with the roles the template accepts."""
    repo = tmp_path_factory.mktemp("fuzz") / "models"
    templated: dict[str, tuple[str, ...]] = {}
    for version in sorted(models.glob("*/*/config.json")):
        folder = version.parent
        target = repo / folder.parent.name / folder.name
        target.parent.mkdir(parents=True, exist_ok=True)
        config = json.loads(version.read_text())
        tokenizer_config = folder / "tokenizer_config.json"
        has_template = (folder / "chat_template.jinja").exists() or (
            tokenizer_config.exists() and json.loads(tokenizer_config.read_text()).get("chat_template")
        )
        if config.get("kind") != "generator" or has_template:
            target.symlink_to(folder.resolve(), target_is_directory=True)
            continue
        target.mkdir()
        for file in folder.iterdir():
            (target / file.name).symlink_to(file.resolve())
        (target / "chat_template.jinja").write_text(CHAT_TEMPLATE)
        templated[config["name"]] = CHAT_ROLES
    return repo, templated


@pytest.fixture(scope="module")
def srv(fuzz_repo) -> Iterator[ServerProcess]:
    """This module's server: the models under test, every generator with a chat template."""
    with start(fuzz_repo[0]) as running:
        yield running


@pytest.fixture(scope="module")
def oracle(srv, stub, fuzz_repo) -> Oracle:
    infos = stub.ListModels(pb.ListModelsRequest(), timeout=CALL_TIMEOUT).models
    return Oracle(fuzz_repo[0], infos, fuzz_repo[1])


def _reference_calls(oracle: Oracle) -> dict[object, tuple[str, Message]]:
    """A few ordinary requests (greedy and seeded generations, a conversation where a model takes one), by
    key: (method, request)."""
    calls: dict[object, tuple[str, Message]] = {"models": ("ListModels", pb.ListModelsRequest())}
    for served in oracle.of_kind(pb.MODEL_KIND_CLASSIFIER):
        texts = ["I loved this movie", "What a waste of time."]
        calls[served.info.name] = (
            "Classify",
            pb.ClassifyRequest(model=served.info.name, texts=texts, return_embedding=True),
        )
    for served in oracle.of_kind(pb.MODEL_KIND_GENERATOR):
        chat = [pb.ChatMessage(role="user", content="Hello")] if served.info.chat else []
        for seed, messages in ((None, []), (7, []), (None, chat)):
            params = pb.GenerationParameters(max_new_tokens=20, logprobs=True)
            if seed is not None:
                params.temperature, params.seed = 0.8, seed
            req = pb.GenerateRequest(model=served.info.name, parameters=params, messages=messages)
            req.prompt = "" if messages else "def load(path):"
            for method in ("Generate", "GenerateStream"):
                calls[served.info.name, seed, bool(messages), method] = (method, req)
    return calls


def _reference_answers(stub, oracle: Oracle) -> dict[object, Result]:
    """What the reference calls get (statuses, not exceptions: a failure is the last test's to report)."""
    answers = {}
    for key, (method, req) in _reference_calls(oracle).items():
        call = call_stream if method == "GenerateStream" else call_unary
        answers[key] = call(getattr(stub, method), req)
    return answers


@pytest.fixture(scope="module", autouse=True)
def reference(stub, oracle) -> dict[object, Result]:
    """Taken before the first test of the module: what ordinary requests get from the fresh server."""
    return _reference_answers(stub, oracle)


@pytest.fixture
def clean_log(srv):
    """Each test leaves no error and no traceback in the server's log, and the server running."""
    before = len(srv.logs())
    SEEN.clear()
    yield
    new = srv.logs()[before:]
    bad = [line for line in new.splitlines() if " ERROR " in line or "Traceback" in line]
    assert not bad, "the server logged errors:\n" + "\n".join(bad[:20])
    assert srv.poll() is None, "the server exited"


# ------------------------------------------------------------------------------------------------------------
# Well-formed requests, one RPC at a time


def test_fuzz_classify(stub, oracle, clean_log):
    @fuzz(150)
    @given(req=classify_requests(oracle).map(Shown))
    @shown_example(req=pb.ClassifyRequest(texts=["x" * 100_000], no_truncation=True))
    @shown_example(req=pb.ClassifyRequest(texts=["a", ""], return_embedding=True))
    @shown_example(req=pb.ClassifyRequest(model="\U000e0001" * 10_000, texts=["a"]))
    @shown_example(req=pb.ClassifyRequest(texts=["a"] * 257))
    @shown_example(req=pb.ClassifyRequest(texts=["a" * (MAX_MESSAGE_BYTES + 1)]))
    def run(req: Shown) -> None:
        req = req.value
        result = call_unary(stub.Classify, req)
        check_status(result, oracle.outcomes("Classify", req), f"Classify({_brief(req)})")
        if result.code is OK:
            check_classification(oracle, req, result.responses[0])

    run()
    assert_reached("Classify", OK, INVALID, NOT_FOUND)


def test_fuzz_embed(stub, oracle, clean_log):
    @fuzz(100)
    @given(req=embed_requests(oracle).map(Shown))
    @shown_example(req=pb.EmbedRequest(texts=["x" * 100_000], no_truncation=True))
    @shown_example(req=pb.EmbedRequest(texts=["a", ""], dimensions=3))
    @shown_example(req=pb.EmbedRequest(texts=["a"], dimensions=-(2**31)))
    def run(req: Shown) -> None:
        req = req.value
        result = call_unary(stub.Embed, req)
        check_status(result, oracle.outcomes("Embed", req), f"Embed({_brief(req)})")
        if result.code is OK:
            check_embedding(oracle, req, result.responses[0])

    run()
    assert_reached("Embed", OK, INVALID, NOT_FOUND)


def test_fuzz_generate_and_generate_stream(stub, oracle, clean_log):
    """Each request goes both ways: the same status, and for a deterministic one (greedy or seeded) the same
    answer, the stream's messages joined being the unary answer."""

    def params(**kw) -> pb.GenerationParameters:
        return pb.GenerationParameters(**kw)

    @fuzz(120)
    @given(req=generate_requests(oracle).map(Shown))
    @shown_example(req=pb.GenerateRequest(prompt="a", parameters=params(max_new_tokens=2**31 - 1)))
    @shown_example(req=pb.GenerateRequest(prompt="a", parameters=params(max_new_tokens=-(2**31))))
    @shown_example(
        req=pb.GenerateRequest(prompt="a", parameters=params(max_new_tokens=3, temperature=math.nan))
    )
    @shown_example(req=pb.GenerateRequest(prompt="a", parameters=params(max_new_tokens=3, top_p=math.nan)))
    @shown_example(
        req=pb.GenerateRequest(prompt="a", parameters=params(max_new_tokens=3, repetition_penalty=math.inf))
    )
    @shown_example(
        req=pb.GenerateRequest(
            prompt="a",
            parameters=params(max_new_tokens=5, temperature=3.4e38, top_k=2**31 - 1, seed=2**64 - 1),
        )
    )
    @shown_example(
        req=pb.GenerateRequest(
            prompt="def ",
            parameters=params(
                max_new_tokens=5, temperature=1.0, repetition_penalty=1e-45, top_p=1e-45, seed=3
            ),
        )
    )
    @shown_example(
        req=pb.GenerateRequest(prompt="a", parameters=params(max_new_tokens=5, stop=["x" * 100_000, " "]))
    )
    @shown_example(req=pb.GenerateRequest(prompt="a" * 100_000, parameters=params(max_new_tokens=3)))
    @shown_example(req=pb.GenerateRequest(prompt="a", messages=[pb.ChatMessage(role="user", content="hi")]))
    @shown_example(req=pb.GenerateRequest(messages=[pb.ChatMessage()]))
    @shown_example(
        req=pb.GenerateRequest(messages=[pb.ChatMessage(role="\U000e0001" * 100_000, content="hi")])
    )
    @shown_example(
        req=pb.GenerateRequest(
            messages=[pb.ChatMessage(role="system", content=""), pb.ChatMessage(role="user", content="hi")],
            parameters=params(max_new_tokens=5, stop=["<|"]),
        )
    )
    @shown_example(req=pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="x" * 100_000)]))
    @shown_example(req=pb.GenerateRequest(prompt="a", parameters=params(max_new_tokens=3, stop=["a"] * 9)))
    def run(req: Shown) -> None:
        req = req.value
        allowed = oracle.outcomes("Generate", req)
        unary = call_unary(stub.Generate, req)
        check_status(unary, allowed, f"Generate({_brief(req)})")
        if req.messages and not req.prompt:
            SEEN["a conversation", unary.code] += 1
        streamed = call_stream(stub.GenerateStream, req)
        check_status(streamed, allowed, f"GenerateStream({_brief(req)})")
        assert streamed.code is unary.code, f"Generate {unary.code.name}, GenerateStream {streamed.code.name}"
        if unary.code is not OK:
            assert not streamed.responses, "a refused stream sent messages first"
            return
        check_generation(oracle, req, unary.responses)
        check_generation(oracle, req, streamed.responses)
        p = req.parameters
        if p.temperature < 1e-5 or p.HasField("seed"):  # deterministic: both ways give the same answer
            whole = unary.responses[0]
            assert "".join(m.text for m in streamed.responses) == whole.text
            assert [t for m in streamed.responses for t in m.token_ids] == list(whole.token_ids)
            assert streamed.responses[-1].finish_reason == whole.finish_reason

    run()
    for method in ("Generate", "GenerateStream"):
        assert_reached(method, OK, INVALID, NOT_FOUND)
    if any(m.info.chat for m in oracle.of_kind(pb.MODEL_KIND_GENERATOR)):
        assert_reached("a conversation", OK, INVALID)


def test_fuzz_list_and_get_model(stub, oracle, clean_log):
    listing = stub.ListModels(pb.ListModelsRequest(), timeout=CALL_TIMEOUT)
    models = {m.name: m for m in listing.models}

    @fuzz(80)
    @given(req=get_model_requests(oracle).map(Shown))
    @shown_example(req=pb.GetModelRequest(name="\x00" * 100_000))
    def run(req: Shown) -> None:
        req = req.value
        result = call_unary(stub.GetModel, req)
        check_status(result, oracle.outcomes("GetModel", req), f"GetModel({_brief(req)})")
        if result.code is OK:
            assert result.responses[0] == models[req.name]
        listed = call_unary(stub.ListModels, pb.ListModelsRequest())
        check_status(listed, [Outcome(OK)], "ListModels()")
        assert listed.responses[0] == listing

    run()
    assert_reached("GetModel", OK, NOT_FOUND)
    assert_reached("ListModels", OK)


# ------------------------------------------------------------------------------------------------------------
# Many requests at once: a bad request in a batch fails alone, and every one gets its own right status


def test_fuzz_concurrent_mixed_requests(stub, oracle, clean_log):
    calls = {
        "Classify": (stub.Classify, classify_requests(oracle), call_unary),
        "Embed": (stub.Embed, embed_requests(oracle), call_unary),
        "Generate": (stub.Generate, generate_requests(oracle), call_unary),
        "GenerateStream": (stub.GenerateStream, generate_requests(oracle), call_stream),
        "GetModel": (stub.GetModel, get_model_requests(oracle), call_unary),
        "ListModels": (stub.ListModels, st.just(pb.ListModelsRequest()), call_unary),
    }
    one_call = st.sampled_from(sorted(calls)).flatmap(lambda m: st.tuples(st.just(m), calls[m][1]))

    with ThreadPoolExecutor(8) as pool:

        @fuzz(30)
        @given(batch=st.lists(one_call, min_size=2, max_size=8).map(Shown))
        def run(batch: Shown) -> None:
            batch = batch.value
            futures = [pool.submit(calls[m][2], calls[m][0], req) for m, req in batch]
            for (method, req), future in zip(batch, futures):
                result = future.result(timeout=2 * CALL_TIMEOUT)
                check_status(result, oracle.outcomes(method, req), f"{method}({_brief(req)})")
                if result.code is OK and method == "Classify":
                    check_classification(oracle, req, result.responses[0])
                elif result.code is OK and method == "Embed":
                    check_embedding(oracle, req, result.responses[0])
                elif result.code is OK and method.startswith("Generate"):
                    check_generation(oracle, req, result.responses)

        run()
    for method in ("Classify", "Generate", "GenerateStream"):
        assert_reached(method, OK)


# ------------------------------------------------------------------------------------------------------------
# Bodies that are not a valid message: invalid UTF-8 in a string field, truncated, garbage


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (strings, nested messages) on the wire."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


BAD_UTF8 = [b"\xff", b"\xc3", b"a\x80b", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82", b"\xfe\xfe"]  # fmt: skip
# Where each request type holds strings: (field, ) or (nested message field, its string field).
STRING_FIELDS = {
    "Classify": [(1,), (2,)],
    "Embed": [(1,), (2,)],
    "Generate": [(1,), (2,), (3, 7), (4, 1), (4, 2)],
    "GenerateStream": [(1,), (2,), (3, 7), (4, 1), (4, 2)],
    "GetModel": [(1,)],
    "ListModels": [],
}
REQUEST_TYPES = {
    "Classify": pb.ClassifyRequest,
    "Embed": pb.EmbedRequest,
    "Generate": pb.GenerateRequest,
    "GenerateStream": pb.GenerateRequest,
    "GetModel": pb.GetModelRequest,
    "ListModels": pb.ListModelsRequest,
}
RESPONSE_TYPES = {
    "Classify": pb.ClassifyResponse,
    "Embed": pb.EmbedResponse,
    "Generate": pb.GenerateResponse,
    "GenerateStream": pb.GenerateResponse,
    "GetModel": pb.ModelInfo,
    "ListModels": pb.ListModelsResponse,
}


def raw_bodies(method: str, valid: st.SearchStrategy[Message]) -> st.SearchStrategy[bytes]:
    """Bytes for `method`'s request: a valid message broken one way or another, or arbitrary bytes."""

    @st.composite
    def build(draw) -> bytes:
        body = draw(valid).SerializeToString()
        how = draw(
            st.sampled_from(["bad_utf8", "bad_utf8", "truncate", "flip", "append", "garbage", "valid"])
        )
        if how == "bad_utf8" and STRING_FIELDS[method]:
            path = draw(st.sampled_from(STRING_FIELDS[method]))
            bad = draw(st.text(max_size=4)).encode() + draw(st.sampled_from(BAD_UTF8)) + b"z"
            inner = _field(path[-1], bad)
            inserted = _field(path[0], inner) if len(path) == 2 else inner
            return body + inserted if draw(st.booleans()) else inserted + body
        if how == "truncate" and body:
            return body[: draw(st.integers(0, len(body) - 1))]
        if how == "flip" and body:
            i = draw(st.integers(0, len(body) - 1))
            return body[:i] + bytes([draw(st.integers(0, 255))]) + body[i + 1 :]
        if how == "append":
            return body + draw(st.binary(min_size=1, max_size=16))
        if how == "garbage":
            return draw(st.binary(max_size=64))
        return body

    return build()


def _parse(method: str, body: bytes) -> Message | None:
    try:
        return REQUEST_TYPES[method].FromString(body)
    except DecodeError:
        return None


def _raw_call(channel: grpc.Channel, method: str, body: bytes) -> Result:
    # No serializers: the bytes go on the wire as they are, and come back as they are.
    if method == "GenerateStream":
        return call_stream(channel.unary_stream(SERVICE + method), body)
    return call_unary(channel.unary_unary(SERVICE + method), body)


@pytest.mark.parametrize("method", ["Classify", "Embed", "Generate", "GenerateStream", "GetModel", "ListModels"])
def test_fuzz_raw_bodies(channel, oracle, method, clean_log):
    """A body that is not a valid message (the protobuf refuses it here too) gets INVALID_ARGUMENT; one that is
    gets what that message gets."""
    valid = {
        "Classify": classify_requests(oracle),
        "Embed": embed_requests(oracle),
        "Generate": generate_requests(oracle),
        "GenerateStream": generate_requests(oracle),
        "GetModel": get_model_requests(oracle),
        "ListModels": st.just(pb.ListModelsRequest()),
    }[method]

    @fuzz(60)
    @given(body=raw_bodies(method, valid).map(Shown))
    @shown_example(body=_field(2, b"\xff\xfe"))  # invalid UTF-8 in a string field
    @shown_example(body=_field(1, b"ab")[:-1])  # a truncated message
    @shown_example(body=b"\x08\x01")  # a varint field 1 (unknown, or the wrong wire type)
    @shown_example(body=b"")
    def run(body: Shown) -> None:
        body = body.value
        parsed = _parse(method, body)
        allowed = [Outcome(INVALID, None)] if parsed is None else oracle.outcomes(method, parsed)
        result = _raw_call(channel, method, body)
        what = f"{method}(raw {body[:40]!r}{'...' if len(body) > 40 else ''})"
        if parsed is None:
            SEEN[f"{method} (not a message)", result.code] += 1
            # Not a message: INVALID_ARGUMENT, whatever field its message names (the decoder may not know).
            assert result.code not in NEVER, f"{what}: {result.code.name} {result.details[:300]!r}"
            assert result.code is INVALID, f"{what}: {result.code.name} {result.details[:300]!r}"
            assert len(result.details) <= MAX_DETAILS
            assert not result.responses
            return
        check_status(result, allowed, what)
        if result.code is OK:
            answers = [RESPONSE_TYPES[method].FromString(b) for b in result.responses]
            if method == "Classify":
                check_classification(oracle, parsed, answers[0])
            elif method == "Embed":
                check_embedding(oracle, parsed, answers[0])
            elif method.startswith("Generate"):
                check_generation(oracle, parsed, answers)

    run()
    assert_reached(f"{method} (not a message)", INVALID)
    assert any(m == method for m, _ in SEEN), "no example was a valid message"


# ------------------------------------------------------------------------------------------------------------
# A unary call that sends no message (or two)

UNARY_METHODS = ["Classify", "ClassifyTokens", "Embed", "Generate", "GetModel", "ListModels"]
NO_MESSAGE_DEADLINE = 10.0  # seconds: a status takes milliseconds; a server that waits forever meets this


def test_a_call_that_half_closes_without_a_message_gets_invalid_argument_at_once(channel, clean_log):
    """A client that half-closes a call to a unary-request method without sending its message gets
    INVALID_ARGUMENT, not a call left open until its deadline."""

    def no_message(method: str) -> Result:
        if method == "GenerateStream":
            return call_stream(channel.stream_stream(SERVICE + method), iter(()), NO_MESSAGE_DEADLINE)
        return call_unary(channel.stream_unary(SERVICE + method), iter(()), NO_MESSAGE_DEADLINE)

    methods = [*UNARY_METHODS, "GenerateStream"]
    with ThreadPoolExecutor(len(methods)) as pool:  # at once: a hanging server costs one deadline, not five
        results = dict(zip(methods, pool.map(no_message, methods)))
    for method, result in results.items():
        assert result.code is INVALID, f"{method} without a message: {result.code.name} {result.details!r}"
        assert not result.responses


def test_a_unary_call_with_two_messages_gets_a_clean_status(channel, clean_log):
    body = pb.ClassifyRequest(texts=["a fine film"]).SerializeToString()
    result = call_unary(channel.stream_unary(SERVICE + "Classify"), iter([body, body]))
    assert result.code in (OK, INVALID), f"{result.code.name} {result.details!r}"
    if result.code is OK:
        assert len(pb.ClassifyResponse.FromString(result.responses[0]).results) == 1


# ------------------------------------------------------------------------------------------------------------
# Afterwards


def test_the_server_still_answers_correctly_after_the_fuzzing(srv, channel, stub, oracle, reference):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ["", "nlpserve.v1.InferenceService", *oracle.models]:
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT).status
        assert status == health_pb2.HealthCheckResponse.SERVING, service
    again = _reference_answers(stub, oracle)
    calls = _reference_calls(oracle)
    for key, before in reference.items():
        after = again[key]
        method, req = calls[key]
        for when, result in (("before the fuzzing", before), ("after it", after)):
            assert result.code is OK, f"{method}({_brief(req)}) {when}: {result.code.name} {result.details!r}"
        if method == "ListModels":
            assert after.responses == before.responses
        elif method == "Classify":
            check_classification(oracle, req, after.responses[0])
            for b, a in zip(before.responses[0].results, after.responses[0].results, strict=True):
                assert (a.label, a.num_tokens, a.truncated) == (b.label, b.num_tokens, b.truncated)
                assert list(a.probabilities) == pytest.approx(list(b.probabilities), abs=1e-5)
                assert list(a.embedding) == pytest.approx(list(b.embedding), abs=1e-5)
        else:  # greedy and seeded: the very same tokens, streamed or not
            check_generation(oracle, req, after.responses)
            tokens = [[t for m in r.responses for t in m.token_ids] for r in (before, after)]
            texts = ["".join(m.text for m in r.responses) for r in (before, after)]
            assert tokens[0] == tokens[1] and texts[0] == texts[1], key
            assert after.responses[-1].finish_reason == before.responses[-1].finish_reason
            other = again[(*key[:-1], "GenerateStream" if method == "Generate" else "Generate")]
            assert [t for m in other.responses for t in m.token_ids] == tokens[1]  # stream == unary
    # Nothing became INTERNAL along the way (the server counts every status it gave).
    internal = [k for k, v in scrape(srv).items() if k[0] == "nlpserve_requests_total" and v > 0]
    internal = [k for k in internal if ("code", "INTERNAL") in k[1] or ("code", "UNKNOWN") in k[1]]
    assert not internal, internal
    assert srv.poll() is None


def _brief(value) -> str:
    """A message (or bytes, or a list of (method, message)) in at most about 400 characters."""
    if isinstance(value, Message):
        text = f"{type(value).__name__}({text_format.MessageToString(value, as_one_line=True)})"
    else:
        text = repr(value)
    return text if len(text) <= 400 else f"{text[:400]}... ({len(text)} characters)"
