"""The tiny-GGUF writer: what transformers loads back from its files is the model and tokenizer that went in."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf_util import (
    BOS,
    EOS,
    IM_END,
    PAD,
    PRE_TOKENIZER_SPLITS,
    build_tokenizer,
    gguf_tensor_name,
    tiny_llama,
    tiny_qwen2,
    write_gguf,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

VOCAB = 336  # the tokenizer's 320 tokens, padded the way llama.cpp pads a vocabulary to the embedding rows
BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2}
PRE = {"llama": "llama-bpe", "qwen2": "qwen2"}
TEXTS = [
    "Hello, world! How are you today?",
    "crème brûlée, naïve façade, Ångström",
    "emoji 🎉🚀 with skin tone 👍🏽 and a flag 🇫🇷",
    "numbers 12345 and it's   spaced\n\nout",
    f"{BOS}special{IM_END} markers{EOS}",
]
SEQUENCES = [[1, 5, 9, 30, 40, 2], [100, 200, 300, 7], list(range(3, 43))]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    for arch, pre in PRE.items():
        build_tokenizer(root / arch, pre=pre)
    return {arch: root / arch for arch in PRE}


@pytest.fixture(scope="module")
def written(tokenizer_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """`written(arch, tied, tensor_type)` -> `(model, gguf folder)`, each file written once per module."""
    cache: dict[tuple, tuple] = {}

    def write(arch: str, tied: bool, tensor_type: str = "F32", **overrides):
        key = (arch, tied, tensor_type, tuple(sorted(overrides.items())))
        if key not in cache:
            model = BUILDERS[arch](VOCAB, tie_word_embeddings=tied, **overrides)
            folder = tmp_path_factory.mktemp(f"{arch}-{tensor_type}")
            write_gguf(model, tokenizer_dirs[arch], folder / "model.gguf", tensor_type)
            cache[key] = model, folder
        return cache[key]

    return write


def load(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf").eval()


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


ARCH_TIED = pytest.mark.parametrize("arch,tied", [(a, t) for a in ("llama", "qwen2") for t in (False, True)])


@ARCH_TIED
def test_config_round_trips(written, arch: str, tied: bool) -> None:
    model, folder = written(arch, tied)
    loaded = load(folder)
    want, got = model.config, loaded.config
    assert type(loaded) is type(model)
    assert got.model_type == arch
    for key in (
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "hidden_size",
        "intermediate_size",
        "vocab_size",
        "max_position_embeddings",
        "tie_word_embeddings",
    ):
        assert getattr(got, key) == getattr(want, key), key
    assert got.rope_parameters["rope_theta"] == want.rope_parameters["rope_theta"] == 500000.0
    assert got.rms_norm_eps == pytest.approx(want.rms_norm_eps, rel=1e-6)  # stored as a float32
    if arch == "llama":  # from `rope.dimension_count`; Qwen2's config has no head_dim
        assert got.head_dim == want.head_dim == want.hidden_size // want.num_attention_heads
    assert loaded.dtype == torch.float32


@ARCH_TIED
def test_f32_state_dict_and_logits_are_exact(written, arch: str, tied: bool) -> None:
    model, folder = written(arch, tied)
    loaded = load(folder)
    want, got = model.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    if tied:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    for ids in SEQUENCES:
        torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen2", True)])
@pytest.mark.parametrize("tensor_type,logit_atol", [("F16", 5e-3), ("Q8_0", 5e-2)])
def test_half_and_q8_0_are_close(written, arch: str, tied: bool, tensor_type: str, logit_atol: float) -> None:
    model, folder = written(arch, tied, tensor_type)
    loaded = load(folder)
    want, got = model.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    inexact = 0
    for name, tensor in want.items():
        if tensor.ndim == 1:  # norms and biases stay F32
            assert torch.equal(got[name], tensor), name
            continue
        # F16 rounds to 11 significant bits; Q8_0 to 1/127 of each 32-wide block's largest magnitude
        atol = 1e-6 if tensor_type == "F16" else float(tensor.abs().max()) / 127
        torch.testing.assert_close(got[name], tensor, atol=atol, rtol=1e-3, msg=name)
        inexact += not torch.equal(got[name], tensor)
    assert inexact  # the file really holds the reduced type
    for ids in SEQUENCES:
        torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=logit_atol, rtol=0)


@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen2", True)])
@pytest.mark.parametrize("tensor_type", ["F32", "F16", "Q8_0"])
def test_file_has_llama_cpp_names_keys_and_types(written, arch: str, tied: bool, tensor_type: str) -> None:
    model, folder = written(arch, tied, tensor_type)
    reader = gguf.GGUFReader(folder / "model.gguf")
    tensors = {tensor.name: tensor for tensor in reader.tensors}

    per_block = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up"]
    per_block.append("ffn_down")
    names = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{block}.{part}.weight" for block in range(2) for part in per_block
    }
    if not tied:
        names.add("output.weight")
    if arch == "qwen2":
        names |= {f"blk.{block}.attn_{part}.bias" for block in range(2) for part in "qkv"}
    assert set(tensors) == names

    hf_names = {gguf_tensor_name(name): name for name in model.state_dict()}
    for name, tensor in tensors.items():
        want = tensor_type if len(tensor.shape) == 2 else "F32"
        assert tensor.tensor_type.name == want, name
        if want == "F32":
            assert [int(n) for n in tensor.shape] == list(reversed(model.state_dict()[hf_names[name]].shape))

    def value(key: str):
        field = reader.fields[key]
        return field.contents()

    config = model.config
    assert value("general.architecture") == arch
    assert value(f"{arch}.context_length") == config.max_position_embeddings
    assert value(f"{arch}.embedding_length") == config.hidden_size
    assert value(f"{arch}.block_count") == config.num_hidden_layers
    assert value(f"{arch}.feed_forward_length") == config.intermediate_size
    assert value(f"{arch}.attention.head_count") == config.num_attention_heads
    assert value(f"{arch}.attention.head_count_kv") == config.num_key_value_heads
    assert value(f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps)
    assert value(f"{arch}.rope.freq_base") == 500000.0
    assert value(f"{arch}.rope.dimension_count") == config.hidden_size // config.num_attention_heads
    assert value(f"{arch}.vocab_size") == VOCAB
    assert value("tokenizer.ggml.model") == "gpt2"
    assert value("tokenizer.ggml.pre") == PRE[arch]
    tokens = value("tokenizer.ggml.tokens")
    types = value("tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == VOCAB
    assert tokens[-1] == f"[PAD{VOCAB - 1}]" and types[-1] == gguf.TokenType.UNUSED
    assert types[tokens.index(EOS)] == gguf.TokenType.CONTROL
    assert all(len(merge.split(" ")) == 2 for merge in value("tokenizer.ggml.merges"))
    assert tokens[value("tokenizer.ggml.eos_token_id")] == EOS
    assert tokens[value("tokenizer.ggml.bos_token_id")] == BOS
    assert tokens[value("tokenizer.ggml.padding_token_id")] == PAD
    assert "<|im_start|>" in value("tokenizer.chat_template")


def test_llama_q_and_k_rows_are_permuted_like_llama_cpp(written) -> None:
    """llama.cpp stores Llama's q/k rows per head as interleaved pairs (transformers reverses it); qwen2's not."""
    for arch in ("llama", "qwen2"):
        model, folder = written(arch, False)
        tensors = {t.name: t for t in gguf.GGUFReader(folder / "model.gguf").tensors}
        attn = model.model.layers[0].self_attn
        for part, proj, heads in (("q", attn.q_proj, 4), ("k", attn.k_proj, 2)):
            stored = np.asarray(tensors[f"blk.0.attn_{part}.weight"].data)
            original = proj.weight.detach().numpy()
            if arch == "qwen2":
                np.testing.assert_array_equal(stored, original)
                continue
            head_dim = original.shape[0] // heads
            rope_halves = original.reshape(heads, 2, head_dim // 2, -1)  # HF: [first half; second half]
            interleaved = stored.reshape(heads, head_dim // 2, 2, -1)
            np.testing.assert_array_equal(interleaved, rope_halves.swapaxes(1, 2))
            assert not np.array_equal(stored, original)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tokenizer_round_trips(written, tokenizer_dirs: dict[str, Path], arch: str) -> None:
    _, folder = written(arch, False)
    original = AutoTokenizer.from_pretrained(tokenizer_dirs[arch])
    loaded = AutoTokenizer.from_pretrained(folder, gguf_file="model.gguf")
    for text in TEXTS:
        ids = original(text)["input_ids"]
        assert loaded(text)["input_ids"] == ids, text
        assert loaded.decode(ids) == text
    assert loaded.eos_token == EOS and loaded.eos_token_id == original.eos_token_id
    assert loaded.bos_token_id == original.bos_token_id
    assert loaded.pad_token_id == original.pad_token_id
    assert loaded.chat_template == original.chat_template
    messages = [{"role": "user", "content": "héllo 🎉"}]
    chat = original.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == chat
    assert loaded(chat)["input_ids"] == original(chat)["input_ids"]
    config = load(folder).config
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        original.bos_token_id,
        original.eos_token_id,
        original.pad_token_id,
    )


@pytest.mark.parametrize("tensor_type", ["Q1_0", "Q8_K", "I8"])
def test_types_gguf_cannot_dequantize_are_refused(written, tensor_type: str) -> None:
    """Written as zero bytes of the right size; transformers reads the config, then refuses the weights."""
    _, folder = written("llama", False, tensor_type, hidden_size=256, intermediate_size=512)
    types = {t.tensor_type.name for t in gguf.GGUFReader(folder / "model.gguf").tensors}
    assert types == {tensor_type, "F32"}
    assert AutoTokenizer.from_pretrained(folder, gguf_file="model.gguf").eos_token == EOS
    with pytest.raises(NotImplementedError, match=f"Dequantization for {tensor_type} is not yet implemented"):
        load(folder)


@pytest.mark.parametrize("tensor_type", ["IQ2_XXS", "Q4_K"])
def test_types_gguf_cannot_quantize_to_are_written_and_load(written, tensor_type: str) -> None:
    """gguf only dequantizes these, so the file holds zero blocks: transformers loads them, as zeros."""
    _, folder = written("llama", False, tensor_type, hidden_size=256, intermediate_size=512)
    types = {t.tensor_type.name for t in gguf.GGUFReader(folder / "model.gguf").tensors}
    assert types == {tensor_type, "F32"}
    loaded = load(folder)
    assert not loaded.model.layers[0].self_attn.q_proj.weight.any()


def test_a_type_no_row_fits_is_an_error(written, tokenizer_dirs: dict[str, Path], tmp_path: Path) -> None:
    model, _ = written("llama", False)  # hidden 64: no row holds a 256-element block
    with pytest.raises(ValueError, match="IQ2_XXS blocks of 256"):
        write_gguf(model, tokenizer_dirs["llama"], tmp_path / "model.gguf", "IQ2_XXS")
    with pytest.raises(ValueError, match="unknown ggml tensor type"):
        write_gguf(model, tokenizer_dirs["llama"], tmp_path / "model.gguf", "Q9_9")


def test_texts_tell_the_split_regexes_apart(tokenizer_dirs: dict[str, Path]) -> None:
    """The llama tokenizer learnt digit merges that Qwen2's one-digit split cannot reach, so a file stating
    the wrong `tokenizer.ggml.pre` would fail `test_tokenizer_round_trips`."""
    from tokenizers import Regex, pre_tokenizers

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dirs["llama"])
    before = [tokenizer(text)["input_ids"] for text in TEXTS]
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_SPLITS["qwen2"]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    assert [tokenizer(text)["input_ids"] for text in TEXTS] != before
