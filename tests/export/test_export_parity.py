"""Parity of exported graphs with PyTorch, on tiny models built here: the checks every export runs, and proof
that they catch a graph that does not match."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from export.classifier import Pooling, scratch
from export.errors import VerificationError
from export.generator import new_model
from export.onnx_export import export_classifier, export_generator
from export.tokenization import encode_right_padded, left_padded, train_wordpiece
from export.verify import check, classifier_parity, generator_parity, session

TEXTS = ["ok", "a much longer sentence that needs many more tokens than the others do", "three words here",
         "the food was good but the service was slow and the room was cold"]


@pytest.fixture(scope="module")
def gpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(1)
    model = new_model(vocab_size=300, context=128, layers=2, heads=2, width=32, eos_id=0).eval()
    path = tmp_path_factory.mktemp("gpt") / "model.onnx"
    export_generator(model, path)
    return model, path


@pytest.mark.parametrize("prompts", [[[5, 17, 42, 9]], [[5, 17, 42, 9, 33, 2, 8], [77], [10, 11, 12]]],
                         ids=["batch1", "left-padded-batch3"])
def test_greedy_kv_cache_generation_matches_full_recompute(gpt: tuple, prompts: list[list[int]]) -> None:
    model, path = gpt
    result = generator_parity(model, path, prompts, new_tokens=64, pad_id=0)
    assert result["max_abs_diff"] <= 1e-4
    assert result["token_agreement"] == 1.0
    assert [len(g) for g in result["generated"]] == [64] * len(prompts)


def test_left_padding_does_not_change_a_sequence(gpt: tuple) -> None:
    """The server batches prompts of different lengths: a prompt's logits must not depend on its neighbours."""
    _, path = gpt
    sess = session(path)
    empty = {f"past_key_values.{i}.{k}": np.zeros((1, 2, 0, 16), np.float32) for i in range(2) for k in ("key", "value")}

    def logits(prompts: list[list[int]]) -> np.ndarray:
        batch = left_padded(prompts, pad_id=0)
        feed = {**batch, **{name: np.repeat(v, len(prompts), axis=0) for name, v in empty.items()}}
        return sess.run(["logits"], feed)[0]

    alone = logits([[3, 4, 5]])[0]
    padded = logits([[9, 9, 9, 9, 9, 9], [3, 4, 5]])[1, -3:]
    assert np.abs(alone - padded).max() <= 1e-4


def test_parity_catches_a_different_model(gpt: tuple) -> None:
    model, path = gpt
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.mul_(1.01)
    result = generator_parity(other, path, [[5, 17, 42]], new_tokens=4, pad_id=0)
    assert result["max_abs_diff"] > 1e-4


@pytest.mark.parametrize("pooling", list(Pooling))
def test_classifier_padded_batch_parity(tmp_path: Path, pooling: Pooling) -> None:
    torch.manual_seed(2)
    tokenizer = train_wordpiece(TEXTS * 5, 120)
    loaded = scratch(tokenizer, 3, pooling, layers=2, heads=2, hidden=32, max_length=64)
    batch = encode_right_padded(tokenizer, TEXTS, 64, 0)
    assert (batch["attention_mask"] == 0).any()  # the batch is padded
    path = tmp_path / "model.onnx"
    export_classifier(loaded.model.eval(), path, {k: torch.from_numpy(v) for k, v in batch.items()},
                      ["logits", "embedding"])
    diffs, provider = classifier_parity(loaded.model, path, batch, ["logits", "embedding"])
    assert provider == "CPUExecutionProvider"
    assert max(diffs.values()) <= 1e-4
    # Padding must not leak into the result: each text alone gives the same logits as inside the batch.
    sess = session(path)
    together = sess.run(["logits"], batch)[0]
    for row, text in enumerate(TEXTS):
        alone = sess.run(["logits"], encode_right_padded(tokenizer, [text], 64, 0))[0][0]
        assert np.abs(alone - together[row]).max() <= 1e-4


def test_check_fails_loudly() -> None:
    check({"logits": 5e-5}, 1e-4, "fine")
    with pytest.raises(VerificationError, match="differs from PyTorch by 0.002"):
        check({"logits": 2e-3, "embedding": 1e-6}, 1e-4, "classifier fp32")
    with pytest.raises(VerificationError):
        check({"logits": float("nan")}, 1e-4, "nan")


def test_sentence_classifier_pools_over_real_tokens_only() -> None:
    from export.classifier import pool

    hidden = torch.tensor([[[1.0, 1.0], [3.0, -1.0], [100.0, 100.0]]])  # (1, 3, 2); the last is padding
    mask = torch.tensor([[1, 1, 0]])
    assert pool(hidden, mask, Pooling.CLS).tolist() == [[1.0, 1.0]]
    assert pool(hidden, mask, Pooling.MEAN).tolist() == [[2.0, 0.0]]
    assert pool(hidden, mask, Pooling.MAX).tolist() == [[3.0, 1.0]]


@pytest.mark.parametrize("examples", [30, 32, 100, 1000])
def test_a_variant_may_lose_three_examples_or_three_points_and_no_more(examples: int) -> None:
    from export.variants import check_accuracy_delta

    allowed = max(3, round(0.03 * examples))
    base = examples // 2
    check_accuracy_delta("int8", (base - allowed) / examples - base / examples, examples)  # exactly the limit
    with pytest.raises(VerificationError):
        check_accuracy_delta("int8", (base - allowed - 1) / examples - base / examples, examples)
