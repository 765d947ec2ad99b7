"""`python -m export embedder` on tiny random sentence-transformers folders built here: the written graph
embeds as SentenceTransformer.encode does (pooling and normalization inside it), flags override what the
folder says, and folders the graph cannot hold get a one-line error with nothing written."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from export.__main__ import main

WORDS = ["good film", "bad film", "great food", "awful food", "the cat sat on the mat", "a long walk home"]
# Lengths apart, so that the batch is padded.
TEXTS = ["ok", "the cat sat on the mat with a good film and great food", "bad food", "a long walk home, the film"]
HIDDEN = 16


def _encoder(folder: Path, seed: int = 0) -> Path:
    """A tiny random BertModel and its WordPiece tokenizer, saved as a Hugging Face checkpoint."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from export.tokenization import train_wordpiece

    torch.manual_seed(seed)
    wordpiece = train_wordpiece(WORDS * 5, 120)
    config = BertConfig(vocab_size=wordpiece.get_vocab_size(), hidden_size=HIDDEN, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    BertTokenizerFast(tokenizer_object=wordpiece).save_pretrained(folder)
    return folder


def _sentence_transformers_folder(folder: Path, pooling: str = "mean", normalize: bool = True) -> Path:
    """Assembled as sentence-transformers' docs do: Transformer -> Pooling [-> Normalize], then saved."""
    from sentence_transformers import SentenceTransformer

    try:  # sentence-transformers 6 moved them; older releases have them in `models` only
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    except ImportError:
        from sentence_transformers.models import Normalize, Pooling, Transformer

    checkpoint = _encoder(folder.with_name(folder.name + "-hf"))
    modules = [Transformer(str(checkpoint), max_seq_length=40), Pooling(HIDDEN, pooling_mode=pooling)]
    if normalize:
        modules.append(Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(folder))
    return folder


@pytest.fixture(scope="module")
def st_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _sentence_transformers_folder(tmp_path_factory.mktemp("st") / "mean-normalized")


def export(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["embedder", *argv])
    return code, capsys.readouterr().err


def onnx_embed(version_dir: Path, texts: list[str]) -> np.ndarray:
    """The written folder as a server would use it: tokenizer.json, right padding, model.onnx."""
    import onnxruntime as ort

    config = json.loads((version_dir / "config.json").read_text())
    tokenizer = Tokenizer.from_file(str(version_dir / "tokenizer.json"))
    tokenizer.enable_truncation(config["max_sequence_length"])
    tokenizer.enable_padding(pad_id=config["special_tokens"]["pad"])
    encodings = tokenizer.encode_batch(texts)
    feed = {"input_ids": [e.ids for e in encodings], "attention_mask": [e.attention_mask for e in encodings],
            "token_type_ids": [e.type_ids for e in encodings]}
    assert 0 in feed["attention_mask"][0]  # the batch is padded
    sess = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = {name: np.asarray(feed[name], dtype=np.int64) for name in config["onnx"]["inputs"]}
    return sess.run(config["onnx"]["outputs"], inputs)[0]


def encode(folder: Path, texts: list[str], **kwargs) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_numpy=True, **kwargs)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def assert_clean_failure(code: int, err: str, out: Path, message: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()
    if out.parent.exists():
        assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []


def test_folder_exports_with_its_pooling_and_matches_encode(st_folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "models" / "tiny-embed"
    code, err = export(["--import", str(st_folder), "--out", str(out), "--version", "2"], capsys)
    assert code == 0, err
    version = out / "2"
    assert sorted(p.name for p in version.iterdir()) == ["config.json", "model.onnx", "tokenizer.json"]
    config = json.loads((version / "config.json").read_text())
    assert list(config) == ["format_version", "name", "version", "kind", "max_sequence_length", "pooling",
                            "normalize", "special_tokens", "architecture", "onnx", "batching", "provenance", "quality"]
    assert config["format_version"] == 1 and config["kind"] == "embedder"
    assert (config["name"], config["version"]) == ("tiny-embed", 2)
    assert (config["pooling"], config["normalize"], config["max_sequence_length"]) == ("mean", True, 40)
    assert config["special_tokens"]["pad"] == Tokenizer.from_file(str(version / "tokenizer.json")).token_to_id("[PAD]")
    assert config["architecture"]["hidden_size"] == HIDDEN and config["architecture"]["num_layers"] == 1
    assert config["onnx"]["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert config["onnx"]["outputs"] == ["embedding"]
    assert config["onnx"]["variants"] == {"fp32": "model.onnx"}
    assert config["batching"]["max_batch_size"] == 32
    assert config["provenance"]["source"] == str(st_folder)
    parity = config["quality"]["parity"]
    assert parity["fp32"]["min_cosine"] >= 0.9999 and parity["fp32"]["max_abs_diff"] <= 1e-4
    assert parity["sentence_transformers"]["reference"] == "encode"
    assert parity["sentence_transformers"]["min_cosine"] >= 0.9999
    similarity = config["quality"]["similarity"]
    assert set(similarity) >= {"paraphrase_mean_cosine", "unrelated_mean_cosine", "separated"}
    assert isinstance(similarity["separated"], bool)
    tokenizer = json.loads((version / "tokenizer.json").read_text())
    assert tokenizer["padding"] is None and tokenizer["truncation"] is None

    got, want = onnx_embed(version, TEXTS), encode(st_folder, TEXTS)
    assert got.shape == (len(TEXTS), HIDDEN) and got.dtype == np.float32
    assert cosines(got, want).min() >= 0.9999
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(("pooling", "normalize"), [("cls", False), ("max", True)])
def test_other_pooling_modes(pooling: str, normalize: bool, tmp_path: Path, capsys) -> None:
    folder = _sentence_transformers_folder(tmp_path / "st", pooling, normalize)
    out = tmp_path / "m"
    code, err = export(["--import", str(folder), "--out", str(out)], capsys)
    assert code == 0, err
    config = json.loads((out / "1" / "config.json").read_text())
    assert (config["pooling"], config["normalize"]) == (pooling, normalize)
    got, want = onnx_embed(out / "1", TEXTS), encode(folder, TEXTS)
    assert cosines(got, want).min() >= 0.9999
    assert np.abs(got - want).max() <= 1e-4  # the length too: unnormalized vectors are compared as they are
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5) == normalize


def test_flags_override_the_folder(st_folder: Path, tmp_path: Path, capsys, caplog) -> None:
    caplog.set_level(logging.INFO, logger="export")
    out = tmp_path / "m"
    code, err = export(["--import", str(st_folder), "--out", str(out), "--pooling", "max", "--no-normalize",
                        "--max-length", "6"], capsys)
    assert code == 0, err
    overrides = [r.getMessage() for r in caplog.records if r.getMessage().startswith("flags override")]
    expected = ("flags override the folder: pooling max (the folder's: mean), normalize False (the folder's: True), "
                "max length 6 (the folder's: 40)")
    assert overrides == [expected]
    config = json.loads((out / "1" / "config.json").read_text())
    assert (config["pooling"], config["normalize"], config["max_sequence_length"]) == ("max", False, 6)
    assert config["quality"]["parity"]["sentence_transformers"]["reference"].startswith("token embeddings")
    # The reference: sentence-transformers' own token embeddings (6 tokens at most), max-pooled here.
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(st_folder), device="cpu")
    model.max_seq_length = 6
    tokens = model.encode(TEXTS, output_value="token_embeddings")
    want = np.stack([t.numpy().max(axis=0) for t in tokens])
    got = onnx_embed(out / "1", TEXTS)
    assert np.abs(got - want).max() <= 1e-4
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)


def test_older_sentence_transformers_layout(st_folder: Path, tmp_path: Path, capsys) -> None:
    """Folders written by sentence-transformers 2 and 3 (all-MiniLM-L6-v2's): module types under
    `sentence_transformers.models`, boolean pooling keys, max_seq_length in sentence_bert_config.json."""
    import shutil

    folder = tmp_path / "legacy"
    shutil.copytree(st_folder, folder)
    modules = json.loads((folder / "modules.json").read_text())
    for module in modules:
        module["type"] = "sentence_transformers.models." + module["type"].rsplit(".", 1)[-1]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": HIDDEN, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 24, "do_lower_case": False}))
    out = tmp_path / "m"
    code, err = export(["--import", str(folder), "--out", str(out)], capsys)
    assert code == 0, err
    config = json.loads((out / "1" / "config.json").read_text())
    assert (config["pooling"], config["normalize"], config["max_sequence_length"]) == ("cls", True, 24)
    assert cosines(onnx_embed(out / "1", TEXTS), encode(folder, TEXTS)).min() >= 0.9999


def test_plain_checkpoint_is_mean_pooled_without_normalization(tmp_path: Path, capsys) -> None:
    from transformers import AutoModel

    checkpoint = _encoder(tmp_path / "hf", seed=4)
    out = tmp_path / "m"
    code, err = export(["--import", str(checkpoint), "--out", str(out), "--max-length", "32"], capsys)
    assert code == 0, err
    config = json.loads((out / "1" / "config.json").read_text())
    assert (config["pooling"], config["normalize"], config["max_sequence_length"]) == ("mean", False, 32)
    assert "sentence_transformers" not in config["quality"]["parity"]
    # The reference, written out here: the mean of the last hidden state over real tokens.
    tokenizer = Tokenizer.from_file(str(out / "1" / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=config["special_tokens"]["pad"])
    encodings = tokenizer.encode_batch(TEXTS)
    ids = torch.tensor([e.ids for e in encodings])
    mask = torch.tensor([e.attention_mask for e in encodings])
    with torch.inference_mode():
        hidden = AutoModel.from_pretrained(checkpoint).eval()(input_ids=ids, attention_mask=mask).last_hidden_state
    want = ((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).numpy()
    assert np.abs(onnx_embed(out / "1", TEXTS) - want).max() <= 1e-4


def test_variants_are_verified_by_cosine(st_folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "m"
    code, err = export(["--import", str(st_folder), "--out", str(out), "--optimize", "--fp16", "--int8"], capsys)
    assert code == 0, err
    config = json.loads((out / "1" / "config.json").read_text())
    assert config["onnx"]["variants"] == {"fp32": "model.onnx", "opt": "model.opt.onnx", "fp16": "model.fp16.onnx",
                                          "int8": "model.int8.onnx"}
    assert not (out / "1" / "model.fusable.onnx").exists()
    for variant, bound in (("opt", 0.9999), ("fp16", 0.999), ("int8", 0.95)):
        parity = config["quality"]["parity"][variant]
        assert parity["bound"] == bound and parity["bound_kind"] == "cosine"
        assert parity["min_cosine"] >= bound, variant
    assert config["quality"]["parity"]["opt"]["fused"].get("Attention") == 1


def test_a_graph_that_differs_fails_verification(st_folder: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import copy

    from export import build_embedder

    real = build_embedder.export_encoder

    def export_a_different_model(model: torch.nn.Module, path: Path, *args, **kwargs) -> None:
        other = copy.deepcopy(model)
        with torch.no_grad():
            other.encoder.embeddings.word_embeddings.weight.normal_()
        real(other, path, *args, **kwargs)

    monkeypatch.setattr(build_embedder, "export_encoder", export_a_different_model)
    out = tmp_path / "m"
    code, err = export(["--import", str(st_folder), "--out", str(out)], capsys)
    assert_clean_failure(code, err, out, "embedder fp32: least cosine similarity")


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing folder", "does not exist"),
        ("not a checkpoint", "has no config.json"),
        ("unsupported pooling", "pooling mode mean_sqrt_len_tokens is not supported (cls, mean or max)"),
        ("two pooling modes", "pooling modes cls + max: exactly one"),
        ("dense module", "module Dense cannot be exported"),
        ("broken modules.json", "modules.json"),
    ],
)
def test_bad_folders(case: str, message: str, st_folder: Path, tmp_path: Path, capsys) -> None:
    import shutil

    folder = tmp_path / "folder"
    if case == "not a checkpoint":
        folder.mkdir()
        (folder / "README.md").write_text("not a model")
    elif case != "missing folder":
        shutil.copytree(st_folder, folder)
    pooling_config = folder / "1_Pooling" / "config.json"
    if case == "unsupported pooling":
        pooling_config.write_text(json.dumps({"embedding_dimension": HIDDEN, "pooling_mode": "mean_sqrt_len_tokens"}))
    elif case == "two pooling modes":
        pooling_config.write_text(json.dumps({"pooling_mode_cls_token": True, "pooling_mode_max_tokens": True}))
    elif case == "dense module":
        modules = json.loads((folder / "modules.json").read_text())
        modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
        (folder / "modules.json").write_text(json.dumps(modules))
    elif case == "broken modules.json":
        (folder / "modules.json").write_text("[{")
    out = tmp_path / "models" / "m"
    code, err = export(["--import", str(folder), "--out", str(out)], capsys)
    assert_clean_failure(code, err, out, message)
