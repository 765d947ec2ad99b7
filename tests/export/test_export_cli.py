"""The command line: every bad input gets a one-line error naming the problem, exit status 2, no traceback,
and nothing written; imports of local checkpoints; a multi-class classifier with named labels."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export.__main__ import main

ROOT = Path(__file__).resolve().parents[2]
TINY_CLASSIFIER = ["--scratch", "--vocab-size", "200", "--layers", "1", "--heads", "2", "--hidden", "16", "--steps", "2"]
TINY_GENERATOR = ["--layers", "1", "--heads", "2", "--width", "16", "--context", "96", "--vocab-size", "300",
                  "--steps", "2", "--verify-tokens", "8"]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_clean_failure(code: int, err: str, out_dir: Path, message: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert not out_dir.exists()
    if out_dir.parent.exists():
        leftovers = [p.name for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.")]
        assert leftovers == []


@pytest.fixture
def labelled(tmp_path: Path) -> Path:
    path = tmp_path / "reviews.csv"
    rows = [("loved it", "positive"), ("great fun", "positive"), ("awful mess", "negative"),
            ("so boring", "negative"), ("fine I guess", "neutral"), ("it was ok", "neutral")] * 4
    path.write_text("review,sentiment\n" + "".join(f"{t},{label}\n" for t, label in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing data", "does not exist"),
        ("empty data", "is empty"),
        ("unknown column", "unknown text column 'body'"),
        ("single class", "at least two classes"),
        ("unreadable base", "cannot load checkpoint folder"),
        ("missing base", "does not exist"),
        ("import without config", "has no config.json"),
        ("header only", "has no rows under its header"),
    ],
)
def test_classifier_bad_input(case: str, message: str, tmp_path: Path, labelled: Path, capsys) -> None:
    out = tmp_path / "models" / "clf"
    argv = ["classifier", "--out", str(out), "--data", str(labelled), *TINY_CLASSIFIER]
    if case == "missing data":
        argv[4] = str(tmp_path / "nope.csv")
    elif case == "empty data":
        (tmp_path / "empty.tsv").write_text("")
        argv[4] = str(tmp_path / "empty.tsv")
    elif case == "unknown column":
        argv += ["--text-column", "body"]
    elif case == "single class":
        (tmp_path / "one.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n')
        argv[4] = str(tmp_path / "one.jsonl")
    elif case in ("unreadable base", "missing base"):
        base = tmp_path / "base"
        if case == "unreadable base":
            base.mkdir()
            (base / "config.json").write_text("{ this is not json")
        argv = ["classifier", "--out", str(out), "--data", str(labelled), "--base", str(base)]
    elif case == "header only":
        (tmp_path / "header.csv").write_text("text,label\n , \n")
        argv[4] = str(tmp_path / "header.csv")
    elif case == "import without config":
        (tmp_path / "ckpt").mkdir()
        argv = ["classifier", "--out", str(out), "--import", str(tmp_path / "ckpt")]
    code, _, err = run(argv, capsys)
    assert_clean_failure(code, err, out, message)


@pytest.mark.parametrize(("case", "message"), [("empty corpus", "is empty"), ("missing corpus", "does not exist"),
                                                ("unreadable checkpoint", "cannot load checkpoint folder")])
def test_generator_bad_input(case: str, message: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "gen"
    corpus = tmp_path / "corpus.txt"
    if case == "empty corpus":
        corpus.write_text("\n \n")
    argv = ["generator", "--out", str(out), "--corpus", str(corpus), *TINY_GENERATOR]
    if case == "unreadable checkpoint":
        ckpt = tmp_path / "ckpt"
        ckpt.mkdir()
        (ckpt / "config.json").write_text('{"model_type": "gpt2", "n_layer": 1}')  # and no weights
        argv = ["generator", "--out", str(out), "--import", str(ckpt)]
    code, _, err = run(argv, capsys)
    assert_clean_failure(code, err, out, message)


def test_existing_output_needs_force(tmp_path: Path, capsys) -> None:
    out = tmp_path / "models"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(["demo", "--quick", "--out", str(out)], capsys)
    assert code == 2 and err.strip() == f"error: output folder {out} exists; pass --force to replace it"
    assert (out / "keep.txt").read_text() == "mine"


def test_real_process_exit_status_and_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "export", "generator", "--corpus", str(tmp_path / "none.txt"), "--out",
         str(tmp_path / "g")], check=False, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: corpus {tmp_path / 'none.txt'} does not exist"]
    assert not (tmp_path / "g").exists()


def test_failed_verification_writes_nothing(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph that does not match PyTorch stops the export loudly."""
    from export import build_generator

    real = build_generator.export_generator

    def export_a_different_model(model: torch.nn.Module, path: Path) -> None:
        import copy

        other = copy.deepcopy(model)
        with torch.no_grad():
            other.transformer.wte.weight.add_(0.05)
        real(other, path)

    monkeypatch.setattr(build_generator, "export_generator", export_a_different_model)
    out = tmp_path / "gen"
    code, _, err = run(["generator", "--out", str(out), "--corpus", "builtin:quick", *TINY_GENERATOR], capsys)
    assert_clean_failure(code, err, out, "generator fp32 (batch1): logits differ by")


def test_multiclass_classifier_keeps_label_names(tmp_path: Path, labelled: Path, capsys) -> None:
    out = tmp_path / "models" / "stars"
    code, stdout, err = run(["classifier", "--out", str(out), "--data", str(labelled), "--pooling", "max",
                             "--no-embedding", "--version", "3", *TINY_CLASSIFIER], capsys)
    assert code == 0, err
    assert "held-out accuracy" in stdout
    config = json.loads((out / "3" / "config.json").read_text())
    assert config["name"] == "stars" and config["version"] == 3
    assert config["labels"] == ["negative", "neutral", "positive"]
    assert config["pooling"] == "max"
    assert config["onnx"]["outputs"] == ["logits"]
    assert config["quality"]["eval"]["examples"] == 3  # one held out per class
    assert config["quality"]["parity"]["fp32"]["max_abs_diff"] <= 1e-4
    assert config["architecture"]["num_layers"] == 1 and config["architecture"]["hidden_size"] == 16
    assert config["provenance"]["data"] == str(labelled)
    assert "--pooling max" in config["provenance"]["command"]
    # Another version goes beside it; an existing version is replaced only with --force.
    code, _, err = run(["classifier", "--out", str(out), "--data", str(labelled), *TINY_CLASSIFIER], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["1", "3"]
    code, _, err = run(["classifier", "--out", str(out), "--data", str(labelled), *TINY_CLASSIFIER], capsys)
    assert code == 2 and "pass --force" in err
    code, _, err = run(["classifier", "--out", str(out), "--data", str(labelled), "--force", *TINY_CLASSIFIER], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["1", "3"]


def test_import_local_checkpoints(tmp_path: Path, capsys) -> None:
    """--import exports fine-tuned Hugging Face checkpoints (saved with save_pretrained) without training."""
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    from export.demo_data import QUICK_CORPUS
    from export.tokenization import EOS, train_byte_bpe, train_wordpiece

    torch.manual_seed(3)
    wordpiece = train_wordpiece(["good film", "bad film", "great food", "awful food"] * 5, 100)
    bert = BertForSequenceClassification(BertConfig(
        vocab_size=wordpiece.get_vocab_size(), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=3, id2label={0: "sad", 1: "meh", 2: "glad"}, label2id={"sad": 0, "meh": 1, "glad": 2},
    ))
    bert.save_pretrained(tmp_path / "bert")
    wordpiece.save(str(tmp_path / "bert" / "tokenizer.json"))
    held_out = tmp_path / "held_out.csv"
    long = "a good film with great food and a good film with great food"  # 13 words: scored alone too
    held_out.write_text(f"text,label\ngood film,glad\nawful food,sad\ngreat food,glad\n{long},glad\n")
    code, _, err = run(["classifier", "--import", str(tmp_path / "bert"), "--out", str(tmp_path / "m" / "imported"),
                        "--int8", "--data", str(held_out)], capsys)
    assert code == 0, err
    config = json.loads((tmp_path / "m" / "imported" / "1" / "config.json").read_text())
    assert config["labels"] == ["sad", "meh", "glad"]
    assert config["quality"]["eval"]["examples"] == 4  # all of --data is held out: nothing is trained
    assert config["quality"]["eval"]["examples_10_words"] == 1
    assert config["quality"]["eval"]["accuracy_10_words"] in (0.0, 1.0)
    assert "training" not in config["provenance"]
    assert config["quality"]["parity"]["fp32"]["max_abs_diff"] <= 1e-4
    assert config["onnx"]["variants"] == {"fp32": "model.onnx", "int8": "model.int8.onnx"}

    bpe = train_byte_bpe(QUICK_CORPUS.split(EOS), 300)
    eos = bpe.token_to_id(EOS)
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=bpe.get_vocab_size(), n_positions=96, n_embd=16, n_layer=1, n_head=2,
                                     bos_token_id=eos, eos_token_id=eos))
    gpt.save_pretrained(tmp_path / "gpt")
    bpe.save(str(tmp_path / "gpt" / "tokenizer.json"))
    code, _, err = run(["generator", "--import", str(tmp_path / "gpt"), "--out", str(tmp_path / "m" / "gpt"),
                        "--verify-tokens", "16", "--corpus", "builtin:quick"], capsys)
    assert code == 0, err
    config = json.loads((tmp_path / "m" / "gpt" / "1" / "config.json").read_text())
    assert config["special_tokens"]["eos"] == eos
    assert config["quality"]["parity"]["fp32"]["token_identical"] is True
    assert "val_loss" in config["quality"]["eval"]


@pytest.mark.parametrize(
    "argv",
    [
        ["classifier", "--data", "builtin:sentiment", "--epochs", "nan"],
        ["classifier", "--data", "builtin:sentiment", "--learning-rate", "abc"],
        ["generator", "--corpus", "builtin:quick", "--context", "8"],
    ],
)
def test_bad_numbers_are_usage_errors(argv: list[str], tmp_path: Path, capsys) -> None:
    out = tmp_path / "m"
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err and argv[-2] in err.splitlines()[-1]
    assert not out.exists()
