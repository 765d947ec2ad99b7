"""The quick demo repository: layout, config.json contents, and ONNX graphs named and shaped as
docs/model-repository.md says."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from tokenizers import Tokenizer

from export.verify import session


def config(repo: Path, name: str) -> dict:
    return json.loads((repo / name / "1" / "config.json").read_text(encoding="utf-8"))


def test_layout(quick_repo: Path) -> None:
    assert sorted(p.name for p in quick_repo.iterdir()) == ["docgpt", "minilm-embed", "sentiment"]
    for name in ("sentiment", "minilm-embed", "docgpt"):
        assert sorted(p.name for p in (quick_repo / name).iterdir()) == ["1"]
        files = {p.name for p in (quick_repo / name / "1").iterdir()}
        assert {"config.json", "model.onnx", "tokenizer.json"} <= files
        assert files == {"config.json", "tokenizer.json", *config(quick_repo, name)["onnx"]["variants"].values()}
    # Nothing of the staging is left next to the repository.
    assert [p.name for p in quick_repo.parent.iterdir()] == ["models"]


@pytest.mark.parametrize("name", ["sentiment", "minilm-embed", "docgpt"])
def test_config_common_fields(quick_repo: Path, name: str) -> None:
    c = config(quick_repo, name)
    assert c["format_version"] == 1 and c["name"] == name and c["version"] == 1
    arch = c["architecture"]
    assert arch["head_size"] * arch["num_heads"] == arch["hidden_size"]
    assert set(c["batching"]) >= {"max_batch_size", "max_queue_delay_ms", "max_queue_size"}
    prov = c["provenance"]
    assert prov["command"].startswith("python -m export demo --quick")
    assert {"torch", "transformers", "onnx", "tokenizers"} <= set(prov["versions"])
    assert prov["created"].endswith("Z")
    parity = c["quality"]["parity"]
    assert parity["fp32"]["max_abs_diff"] <= 1e-4
    for variant, file in c["onnx"]["variants"].items():
        assert (quick_repo / name / "1" / file).is_file()
        assert variant in parity


def test_classifier_config(quick_repo: Path) -> None:
    c = config(quick_repo, "sentiment")
    assert c["kind"] == "classifier"
    assert c["labels"] == ["negative", "positive"]
    assert c["pooling"] == "cls"
    assert c["max_sequence_length"] == 64
    tokenizer = Tokenizer.from_file(str(quick_repo / "sentiment" / "1" / "tokenizer.json"))
    specials = c["special_tokens"]
    assert specials["pad"] == tokenizer.token_to_id("[PAD]") and specials["cls"] == tokenizer.token_to_id("[CLS]")
    assert specials["sep"] == tokenizer.token_to_id("[SEP]") and specials["eos"] is None
    assert tokenizer.padding is None and tokenizer.truncation is None
    assert c["architecture"]["vocab_size"] == tokenizer.get_vocab_size()
    assert c["quality"]["eval"]["examples"] > 0 and 0 <= c["quality"]["eval"]["accuracy"] <= 1
    assert "accuracy_delta" in c["quality"]["parity"]["int8"]


def test_generator_config(quick_repo: Path) -> None:
    c = config(quick_repo, "docgpt")
    assert c["kind"] == "generator" and c["labels"] == []
    tokenizer = Tokenizer.from_file(str(quick_repo / "docgpt" / "1" / "tokenizer.json"))
    eos = tokenizer.token_to_id("<|endoftext|>")
    assert c["special_tokens"]["eos"] == eos and c["special_tokens"]["bos"] == eos and c["special_tokens"]["pad"] == eos
    arch = c["architecture"]
    assert arch["model_type"] == "gpt2" and arch["context_length"] == c["max_sequence_length"] == 128
    assert arch["tokenizer_vocab_size"] == tokenizer.get_vocab_size() <= arch["vocab_size"]
    assert c["generation"]["max_new_tokens"] <= arch["context_length"]
    fp32 = c["quality"]["parity"]["fp32"]
    assert fp32["token_identical"] is True and fp32["new_tokens"] == 64
    assert c["quality"]["eval"]["perplexity"] == pytest.approx(np.exp(c["quality"]["eval"]["val_loss"]), rel=1e-2)


def test_classifier_graph_names_and_axes(quick_repo: Path) -> None:
    c = config(quick_repo, "sentiment")
    for file in c["onnx"]["variants"].values():
        sess = session(quick_repo / "sentiment" / "1" / file)
        assert [i.name for i in sess.get_inputs()] == c["onnx"]["inputs"] == ["input_ids", "attention_mask",
                                                                                "token_type_ids"]
        assert [o.name for o in sess.get_outputs()] == c["onnx"]["outputs"] == ["logits", "embedding"]
        for i in sess.get_inputs():
            assert i.type == "tensor(int64)" and all(isinstance(d, str) for d in i.shape)
    model = onnx.load(str(quick_repo / "sentiment" / "1" / "model.onnx"))
    assert model.opset_import[0].version == c["onnx"]["opset"]
    # Any batch and any length: run 3 texts of 5 tokens.
    sess = session(quick_repo / "sentiment" / "1" / "model.onnx")
    ids = np.full((3, 5), 7, np.int64)
    logits, embedding = sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                        "token_type_ids": np.zeros_like(ids)})
    assert logits.shape == (3, 2) and embedding.shape == (3, c["architecture"]["hidden_size"])


def test_generator_graph_names_and_axes(quick_repo: Path) -> None:
    c = config(quick_repo, "docgpt")
    arch = c["architecture"]
    layers = arch["num_layers"]
    inputs = ["input_ids", "attention_mask", "position_ids", "logits_positions"] + [
        f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    outputs = ["logits"] + [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    assert c["onnx"]["inputs"] == inputs and c["onnx"]["outputs"] == outputs
    sess = session(quick_repo / "docgpt" / "1" / "model.onnx")
    assert [i.name for i in sess.get_inputs()] == inputs and [o.name for o in sess.get_outputs()] == outputs
    past = next(i for i in sess.get_inputs() if i.name == "past_key_values.0.key")
    assert isinstance(past.shape[0], str) and isinstance(past.shape[2], str)
    assert past.shape[1] == arch["num_heads"] and past.shape[3] == arch["head_size"]
    # Prefill with an empty past, then one decode step with the present as past.
    heads, size = arch["num_heads"], arch["head_size"]
    feed = {"input_ids": np.array([[1, 2, 3], [4, 5, 6]], np.int64), "attention_mask": np.ones((2, 3), np.int64),
            "position_ids": np.array([[0, 1, 2]] * 2, np.int64), "logits_positions": np.arange(3, dtype=np.int64)}
    feed |= {name: np.zeros((2, heads, 0, size), np.float32) for name in inputs[4:]}
    out = sess.run(None, feed)
    assert out[0].shape == (2, 3, arch["vocab_size"]) and out[1].shape == (2, heads, 3, size)
    # The last position alone: the same logits and the same cache, the head run on one position.
    last = sess.run(None, feed | {"logits_positions": np.array([2], np.int64)})
    assert last[0].shape == (2, 1, arch["vocab_size"])
    np.testing.assert_allclose(last[0][:, 0], out[0][:, -1], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(last[1], out[1])
    step = {"input_ids": np.array([[7], [8]], np.int64), "attention_mask": np.ones((2, 4), np.int64),
            "position_ids": np.array([[3], [3]], np.int64), "logits_positions": np.zeros(1, np.int64)}
    step |= {name: value for name, value in zip(inputs[4:], out[1:])}
    result = sess.run(None, step)
    assert result[0].shape == (2, 1, arch["vocab_size"]) and result[1].shape == (2, heads, 4, size)
