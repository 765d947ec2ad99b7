"""ClassifyTokens, end to end: a tiny random BERT token-classification checkpoint, exported by
`python -m export token-classifier --import`, served, and asked through gRPC, the client library and the CLI;
the entities against transformers' own token-classification pipeline on the same checkpoint."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from e2e_util import sample, scrape, start

from client import Client
from client.cli import main as cli
from client.proto import inference_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
NAME = "ner"
LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
CORPUS = [
    "José Müller visitó São Paulo con Ana",
    "Frau Schröder wohnt in Köln, Zürich und Genève.",
    "東京で会った 北京 大阪",
    "Microsoft, Apple and Siemens opened offices in Berlin.",
    "Angela Merkel met Emmanuel Macron in Brussels",
]
# Precomposed accents, CJK, emoji and words split into many WordPiece pieces: texts on which this server and
# transformers' pipeline must agree exactly (server/token_aggregation.py lists where they differ on purpose:
# decomposed accents and variation selectors, which these texts avoid).
TEXTS = [
    "José Müller visitó São Paulo",
    "東京で会った 北京",
    "I love Paris 🚀 and New York",
    "internationalization of supercalifragilistic Siemens",
    "Angela Merkel met Emmanuel Macron in Brussels, Zürich and Genève.",
]
STRATEGIES = {
    "none": pb.AGGREGATION_NONE,
    "simple": pb.AGGREGATION_SIMPLE,
    "first": pb.AGGREGATION_FIRST,
    "average": pb.AGGREGATION_AVERAGE,
    "max": pb.AGGREGATION_MAX,
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BertForTokenClassification with a WordPiece tokenizer (lowercase, accents stripped)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
        mask_token="[MASK]",
    )
    torch.manual_seed(3)
    config = transformers.BertConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)}, initializer_range=0.5,
    )
    path = tmp_path_factory.mktemp("ner-checkpoint")
    transformers.BertForTokenClassification(config).eval().save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def repo(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ner") / "models"
    result = subprocess.run(
        [sys.executable, "-m", "export", "token-classifier", "--import", str(checkpoint), "--out", str(out / NAME),
         "--max-length", "64"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def srv(repo: Path):
    with start(repo, "--max-texts-per-request", "8") as running:
        yield running


@pytest.fixture(scope="module")
def pipelines(checkpoint: Path):
    import transformers

    return {
        name: transformers.pipeline(
            "token-classification", model=str(checkpoint), aggregation_strategy=name, device="cpu"
        )
        for name in STRATEGIES
    }


def classify_tokens(stub, texts, aggregation=pb.AGGREGATION_UNSPECIFIED, **kw) -> pb.ClassifyTokensResponse:
    return stub.ClassifyTokens(pb.ClassifyTokensRequest(texts=texts, aggregation=aggregation, **kw), timeout=30)


def as_pipeline(entity: pb.Entity) -> tuple:
    return (entity.label, entity.start, entity.end)


def from_pipeline(found: dict, strategy: str) -> tuple:
    return (found["entity"] if strategy == "none" else found["entity_group"], found["start"], found["end"])


def test_the_model_describes_itself(stub):
    info = stub.GetModel(pb.GetModelRequest(name=NAME), timeout=30)
    assert info.kind == pb.MODEL_KIND_TOKEN_CLASSIFIER and info.ready
    assert list(info.labels) == LABELS and info.limits.max_sequence_length == 64


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_entities_are_the_pipelines(stub, pipelines, strategy):
    response = classify_tokens(stub, TEXTS, STRATEGIES[strategy])
    assert response.model == NAME and list(response.labels) == LABELS
    found = 0
    for text, result in zip(TEXTS, response.results):
        want = pipelines[strategy](text)
        assert [as_pipeline(e) for e in result.entities] == [from_pipeline(w, strategy) for w in want]
        for e, w in zip(result.entities, want):
            assert e.score == pytest.approx(float(w["score"]), abs=1e-4)
            assert e.text == text[e.start : e.end]
            assert text.encode()[e.byte_start : e.byte_end].decode() == e.text
            assert e.token_index == (w["index"] if strategy == "none" else -1)
        found += len(result.entities)
        assert not result.truncated and result.num_tokens > 2
    assert found > len(TEXTS)  # random weights label plenty: the comparison is not of empty lists


def test_unspecified_aggregation_is_simple(stub):
    unspecified = classify_tokens(stub, TEXTS[:2])
    simple = classify_tokens(stub, TEXTS[:2], pb.AGGREGATION_SIMPLE)
    assert unspecified == simple


def test_concurrent_callers_share_batches_and_get_their_own_answers(stub, srv):
    alone = {text: classify_tokens(stub, [text], pb.AGGREGATION_FIRST).results[0] for text in TEXTS}
    before = scrape(srv)
    with ThreadPoolExecutor(6) as pool:
        crowds = list(pool.map(lambda i: classify_tokens(stub, TEXTS[i % 5 :], pb.AGGREGATION_FIRST), range(18)))
    after = scrape(srv)
    for i, response in enumerate(crowds):
        for text, result in zip(TEXTS[i % 5 :], response.results):
            got = [(e.label, e.start, e.end) for e in result.entities]
            assert got == [(e.label, e.start, e.end) for e in alone[text].entities]
    labels = {"model": NAME, "method": "ClassifyTokens"}
    batched = sample(after, "nlpserve_batch_size_sum", **labels) - sample(before, "nlpserve_batch_size_sum", **labels)
    assert batched == sum(len(TEXTS[i % 5 :]) for i in range(18))


def test_long_texts_are_truncated_or_refused(stub):
    long_text = " ".join(["Angela Merkel met Emmanuel Macron"] * 40)
    (result,) = classify_tokens(stub, [long_text]).results
    assert result.truncated and result.num_tokens == 64
    assert all(e.end <= len(long_text) for e in result.entities)
    with pytest.raises(grpc.RpcError) as exc:
        classify_tokens(stub, ["fine", long_text], no_truncation=True)
    assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT and exc.value.details().startswith("texts[1]:")


@pytest.mark.parametrize(
    ("request_kw", "field"),
    [
        ({"texts": []}, "texts"),
        ({"texts": ["fine", ""]}, "texts[1]"),
        ({"texts": ["x"] * 9}, "texts"),
        ({"texts": ["fine"], "aggregation": 99}, "aggregation"),
    ],
)
def test_bad_requests_get_a_clear_status(stub, request_kw, field):
    with pytest.raises(grpc.RpcError) as exc:
        stub.ClassifyTokens(pb.ClassifyTokensRequest(**request_kw), timeout=30)
    assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details().startswith(f"{field}:"), exc.value.details()


def test_other_kinds_are_refused_by_name(stub):
    with pytest.raises(grpc.RpcError) as exc:
        stub.Embed(pb.EmbedRequest(model=NAME, texts=["x"]), timeout=30)
    assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details() == f"model: '{NAME}' is a token classifier, not an embedder"


def test_the_open_inference_protocol_refuses_token_ids_for_entities(srv):
    """Entities are spans of the text: a token classifier takes `text` only, and says so for input_ids."""
    import numpy as np

    from server.servicers.oip import grpc_service_pb2 as oip
    from server.servicers.oip import grpc_service_pb2_grpc as oip_grpc

    with grpc.insecure_channel(srv.target) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        request = oip.ModelInferRequest(
            model_name=NAME,
            inputs=[oip.ModelInferRequest.InferInputTensor(name="input_ids", datatype="INT64", shape=[1, 2])],
            raw_input_contents=[np.array([[1, 2]], "<i8").tobytes()],
        )
        with pytest.raises(grpc.RpcError) as exc:
            stub.ModelInfer(request, timeout=30)
    assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details().startswith("input_ids: token-id inputs are not supported by token classifiers")


def test_the_client_library_and_cli(srv, pipelines, capsys):
    text = TEXTS[0]
    with Client(srv.target, timeout=30) as c:
        (result,) = c.classify_tokens(text, aggregation="first")
        assert [(e.label, e.start, e.end) for e in result] == [
            from_pipeline(w, "first") for w in pipelines["first"](text)
        ]
        with pytest.raises(ValueError, match="aggregation"):
            c.classify_tokens(text, aggregation="grouped")
    assert cli(["--target", srv.target, "entities", "--aggregation", "first", text]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == text and len(out) == 1 + max(1, len(result.entities))
    for line, e in zip(out[1:], result):
        assert line.split()[0] == e.label and f"[{e.start}:{e.end}]" in line
    assert cli(["--target", srv.target, "ner", "--aggregation", "grouped", text]) == 2
    assert "invalid choice" in capsys.readouterr().err
