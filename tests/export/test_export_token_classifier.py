"""`python -m export token-classifier`: the CoNLL reader and its one-line errors, word labelling (first
sub-token only), entity spans and F1, an imported tiny BertForTokenClassification and a tiny model trained
here, each verified against PyTorch on the written model.onnx."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from export.__main__ import main
from export.data import read_conll
from export.errors import ExportError
from export.token_classifier import IGNORE, encode_words, entities, scores, token_labels
from export.tokenization import train_wordpiece

CONLL = """\
-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O
. . O O

Peter\tB-PER
Blackburn\tI-PER

BRUSSELS NNP B-NP B-LOC
1996-08-22 CD I-NP O
"""
SENTENCES = [
    ("John Smith lives in Paris .", "B-PER I-PER O O B-LOC O"),
    ("Mary works for Acme Corp in Berlin .", "B-PER O O B-ORG I-ORG O B-LOC O"),
    ("The weather in Rome is fine .", "O O O B-LOC O O O"),
    ("Acme Corp hired John .", "B-ORG I-ORG O B-PER O"),
    ("Nothing to see here .", "O O O O O"),
    ("Berlin and Paris are cities .", "B-LOC O B-LOC O O O"),
]
TINY = ["--scratch", "--vocab-size", "80", "--layers", "1", "--heads", "2", "--hidden", "16", "--steps", "3"]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def conll(sentences: list[tuple[str, str]], repeat: int = 1) -> str:
    blocks = ["\n".join(f"{w}\t{t}" for w, t in zip(words.split(), tags.split())) for words, tags in sentences]
    return "\n\n".join(blocks * repeat) + "\n"


def onnx_logits(version_dir: Path, sentences: list[list[str]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The written folder as a server would use it: tokenizer.json on pre-split words, right padding."""
    import onnxruntime as ort

    config = json.loads((version_dir / "config.json").read_text())
    tokenizer = Tokenizer.from_file(str(version_dir / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=config["special_tokens"]["pad"])
    encodings = tokenizer.encode_batch(sentences, is_pretokenized=True)
    arrays = {"input_ids": [e.ids for e in encodings], "attention_mask": [e.attention_mask for e in encodings],
              "token_type_ids": [e.type_ids for e in encodings]}
    feed = {name: np.asarray(arrays[name], dtype=np.int64) for name in config["onnx"]["inputs"]}
    assert (feed["attention_mask"] == 0).any()  # the batch is padded
    sess = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], feed)[0], feed


def assert_clean_failure(code: int, err: str, out: Path, message: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()


def test_conll_reader(tmp_path: Path) -> None:
    data = read_conll(write(tmp_path / "train.txt", CONLL))
    assert data.sentences == [["EU", "rejects", "German", "call", "."], ["Peter", "Blackburn"],
                              ["BRUSSELS", "1996-08-22"]]
    assert data.names == ["O", "B-LOC", "B-MISC", "B-ORG", "B-PER", "I-PER"]  # "O" first, the rest sorted
    assert [[data.names[t] for t in s] for s in data.tags] == [
        ["B-ORG", "O", "B-MISC", "O", "O"], ["B-PER", "I-PER"], ["B-LOC", "O"]]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("EU B-ORG\nrejects\n", "train.txt:2: token 'rejects' has no tag"),
        ("-DOCSTART- -X- O\n\n\n", "has no sentences"),
        ("a O\nb O\n\nc O\n", "at least two tags; found only 'O'"),
        ("", "is empty"),
    ],
)
def test_conll_reader_errors(text: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ExportError) as caught:
        read_conll(write(tmp_path / "train.txt", text))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_words_are_labelled_on_their_first_sub_token() -> None:
    tokenizer = train_wordpiece(["play played playing player plays"] * 3, 40)
    batch = encode_words(tokenizer, [["layer", "play"], ["play"]], 16, 0)
    ids = batch.inputs["input_ids"]
    assert len(tokenizer.encode("layer").ids) > 3  # [CLS] + several sub-tokens + [SEP]
    labels = token_labels(batch, [[1, 2], [1]])
    first = batch.first_tokens[0]
    assert first[0] == 1 and labels[0, 1] == 1 and labels[0, first[1]] == 2
    real = batch.inputs["attention_mask"][0].sum()
    assert first[1] > 2 and (labels[0, 2:first[1]] == IGNORE).all()  # the other sub-tokens of "layer"
    assert labels[0, 0] == IGNORE and labels[0, real - 1] == IGNORE  # [CLS] and [SEP]
    assert (labels[1, 2:] == IGNORE).all() and ids.shape[0] == 2  # [SEP] and the padding of the shorter row


def test_entity_spans_and_f1() -> None:
    assert entities(["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-ORG"]) == {
        ("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 5), ("ORG", 5, 6)}  # a stray I- starts an entity (conlleval)
    names = ["O", "B-LOC", "B-PER", "I-PER"]
    gold = [[2, 3, 0, 1], [1, 0]]
    predicted = [[2, 0, 0, 1], [1, 0]]  # the PER span is cut short: wrong; both LOC right
    result = scores(gold, predicted, names)
    assert result["word_accuracy"] == round(5 / 6, 4) and result["entities"] == 3
    assert result["entity_precision"] == round(2 / 3, 4) and result["entity_recall"] == round(2 / 3, 4)
    assert result["entity_f1"] == round(2 / 3, 4)
    assert scores([[0, 1]], [[0, 1]], ["NN", "VB"])["entity_f1"] is None  # not BIO tags: no entity figures


def test_import_a_token_classification_checkpoint(tmp_path: Path, capsys) -> None:
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(5)
    words = [w for sentence, _ in SENTENCES for w in sentence.split()]
    wordpiece = train_wordpiece([" ".join(words)] * 5, 120)
    names = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "B-ORG", 5: "I-ORG"}
    model = BertForTokenClassification(BertConfig(
        vocab_size=wordpiece.get_vocab_size(), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=len(names), id2label=names, label2id={v: k for k, v in names.items()},
    ))
    model.save_pretrained(tmp_path / "ckpt")
    wordpiece.save(str(tmp_path / "ckpt" / "tokenizer.json"))
    held_out = write(tmp_path / "dev.conll", conll(SENTENCES))
    out = tmp_path / "models" / "ner"
    code = main(["token-classifier", "--import", str(tmp_path / "ckpt"), "--data", str(held_out), "--out", str(out),
                 "--int8"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "held-out word accuracy" in captured.out
    config = json.loads((out / "1" / "config.json").read_text())
    assert config["kind"] == "token_classifier" and config["name"] == "ner"
    assert config["labels"] == ["O", "B-PER", "I-PER", "B-LOC", "B-ORG", "I-ORG"]  # id order, as the logits
    assert "pooling" not in config
    assert config["onnx"]["outputs"] == ["logits"]
    assert config["onnx"]["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert config["onnx"]["variants"] == {"fp32": "model.onnx", "int8": "model.int8.onnx"}
    assert "training" not in config["provenance"]
    quality = config["quality"]
    assert quality["parity"]["fp32"]["max_abs_diff"] <= 1e-4
    assert quality["eval"]["sentences"] == len(SENTENCES)  # all of --data is held out: nothing is trained
    assert quality["eval"]["words"] == len([w for s, _ in SENTENCES for w in s.split()])
    assert quality["eval"]["entities"] == 10
    tokenizer = json.loads((out / "1" / "tokenizer.json").read_text())
    assert tokenizer["padding"] is None and tokenizer["truncation"] is None
    # The written graph against the checkpoint in PyTorch, on a padded batch: every real position.
    sentences = [s.split() for s, _ in SENTENCES[:3]] + [["Hi"]]
    got, feed = onnx_logits(out / "1", sentences)
    assert got.shape[:2] == feed["input_ids"].shape and got.shape[2] == len(names)
    with torch.inference_mode():
        want = model.eval()(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
    real = feed["attention_mask"].astype(bool)
    assert np.abs(got[real] - want[real]).max() <= 1e-4


def test_train_from_conll(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    from export import build_token_classifier

    exported: list[torch.nn.Module] = []  # the trained model, as handed to the exporter
    real = build_token_classifier.export_encoder

    def keep_the_model(model: torch.nn.Module, *args, **kwargs) -> None:
        exported.append(model)
        real(model, *args, **kwargs)

    monkeypatch.setattr(build_token_classifier, "export_encoder", keep_the_model)
    train = write(tmp_path / "train.conll", conll(SENTENCES, repeat=3))
    out = tmp_path / "models" / "tagger"
    code = main(["token-classifier", "--data", str(train), "--val-fraction", "0.25", "--out", str(out), *TINY])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    config = json.loads((out / "1" / "config.json").read_text())
    assert config["labels"] == ["O", "B-LOC", "B-ORG", "B-PER", "I-ORG", "I-PER"]
    assert config["architecture"]["hidden_size"] == 16 and config["architecture"]["num_layers"] == 1
    assert config["provenance"]["training"]["train_steps"] == 3
    assert config["provenance"]["data"] == str(train)
    held = config["quality"]["eval"]
    assert held["sentences"] == round(len(SENTENCES) * 3 * 0.25)
    assert 0 <= held["word_accuracy"] <= 1 and held["entity_f1"] is not None
    assert config["provenance"]["training"]["train_sentences"] == len(SENTENCES) * 3 - held["sentences"]
    assert config["quality"]["parity"]["fp32"]["max_abs_diff"] <= 1e-4
    # The written graph against the trained model in PyTorch, on a padded batch: every real position.
    got, feed = onnx_logits(out / "1", [s.split() for s, _ in SENTENCES])
    assert got.shape == (*feed["input_ids"].shape, len(config["labels"]))
    with torch.inference_mode():
        want = exported[0].eval()(*(torch.from_numpy(feed[n]) for n in config["onnx"]["inputs"])).numpy()
    real_positions = feed["attention_mask"].astype(bool)
    assert np.abs(got[real_positions] - want[real_positions]).max() <= 1e-4


def test_train_verifies_against_pytorch(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph that is not the trained model fails the parity check: nothing is written."""
    import copy

    from export import build_token_classifier

    real = build_token_classifier.export_encoder

    def export_a_different_model(model: torch.nn.Module, path: Path, *args, **kwargs) -> None:
        other = copy.deepcopy(model)
        with torch.no_grad():
            other.classifier.bias.add_(0.01)
        real(other, path, *args, **kwargs)

    monkeypatch.setattr(build_token_classifier, "export_encoder", export_a_different_model)
    train = write(tmp_path / "train.conll", conll(SENTENCES, repeat=2))
    out = tmp_path / "tagger"
    code = main(["token-classifier", "--data", str(train), "--out", str(out), *TINY])
    assert_clean_failure(code, capsys.readouterr().err, out, "token classifier fp32: ONNX Runtime differs")


@pytest.mark.parametrize(("case", "message"), [
    ("no tag", "bad.conll:3: token 'Paris' has no tag"),
    ("unknown eval tag", "tags B-MISC are not among the training tags"),
    ("no data", "--data is required"),
    ("import without config", "has no config.json"),
])
def test_bad_input(case: str, message: str, tmp_path: Path, capsys) -> None:
    train = write(tmp_path / "train.conll", conll(SENTENCES))
    out = tmp_path / "models" / "tagger"
    argv = ["token-classifier", "--data", str(train), "--out", str(out), *TINY]
    if case == "no tag":
        argv[2] = str(write(tmp_path / "bad.conll", "John B-PER\nlives O\nParis\n"))
    elif case == "unknown eval tag":
        argv += ["--eval-data", str(write(tmp_path / "dev.conll", "EU\tB-MISC\nsays\tO\n"))]
    elif case == "no data":
        argv = ["token-classifier", "--out", str(out)]
    elif case == "import without config":
        (tmp_path / "ckpt").mkdir()
        argv = ["token-classifier", "--import", str(tmp_path / "ckpt"), "--out", str(out)]
    code = main(argv)
    assert_clean_failure(code, capsys.readouterr().err, out, message)
