"""Tiny GGUF files for tests, written in seconds with the `gguf` package, the way llama.cpp's converter would.

`write_gguf(model, tokenizer_dir, path, tensor_type)` writes a transformers `LlamaForCausalLM` or
`Qwen2ForCausalLM` and the byte-level BPE tokenizer saved in `tokenizer_dir` into one GGUF file that
`AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)` and `AutoTokenizer.from_pretrained(folder,
gguf_file=name)` load back. `tiny_llama`, `tiny_qwen2` and `build_tokenizer` make the inputs.

What transformers' GGUF loader (`modeling_gguf_pytorch_utils.load_gguf_checkpoint` for llama and qwen2) needs:

- `general.architecture` "llama" or "qwen2", and the `{arch}.*` hyperparameters. For llama,
  `rope.dimension_count` becomes `head_dim`; qwen2 ignores it. A `general.name` containing "mistral" turns a
  llama file into a Mistral model, so the name written here never does.
- `tie_word_embeddings` is not a key: it is true exactly when the file has no `output.weight`. A tied model is
  written without one, as llama.cpp does.
- llama.cpp permutes the rows of Llama's `attn_q` / `attn_k` (weights and biases) from the rotate-half layout
  to the interleaved one, and transformers reverses that for architecture "llama" only; qwen2 is not permuted.
- The model config's bos/eos/pad ids come from `tokenizer.ggml.*_token_id`; `vocab_size` from
  `{arch}.vocab_size`, else from the number of tokens.
- Tokenizer "gpt2": the tokens are the byte-level spellings ("Ġthe"), merges are "a b" strings, token type 3
  (control) makes a token special, 4 (user-defined) a plain added token. `tokenizer.ggml.pre` picks the split
  regex ("llama-bpe", "qwen2", ...); without one GPT-2's ByteLevel pre-tokenizer is used.
  `tokenizer.ggml.add_bos_token` decides whether encoding prepends bos, and `tokenizer.chat_template` is the chat
  template.

Tensor types: 1-D tensors (norms, biases) stay F32 as in llama.cpp; 2-D ones take `tensor_type`, falling back to
F16 where a row is not a whole number of blocks (llama.cpp's fallback). Any ggml type name is accepted: the ones
`gguf.quants` can quantize to hold real values (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, TQ1_0, TQ2_0,
MXFP4); for the rest (the K-quants, the IQ types, Q8_1, Q8_K, Q1_0, NVFP4, I8..I64, F64) the 2-D tensors are
written as zero bytes of the right size, meaningful only as a file of that type, to test how a loader treats it.

For llama and qwen2 (transformers 5.24, gguf 0.19) transformers loads every type `gguf.quants.dequantize`
handles, the K-quants and IQ types included, and refuses the others -- Q8_1, Q8_K, Q1_0, I8, I16, I32, I64, F64 --
when the weights are read, with the `NotImplementedError("Dequantization for Q1_0 is not yet implemented")` that
`gguf.quants.dequantize` raises, unwrapped, out of `from_pretrained` (the config and the tokenizer still load).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, TokenType
from llm_util import (  # noqa: F401 (re-exported: the tests build their models and tokenizers from here)
    BOS,
    CHAT_TEMPLATE,
    EOS,
    IM_END,
    IM_START,
    PAD,
    PRE_TOKENIZER_SPLITS,
    SENTENCES,
    build_tokenizer,
    tiny_llama,
    tiny_qwen2,
)

# HF parameter name -> GGUF tensor name, as llama.cpp's tensor map writes them
_BLOCK_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def gguf_tensor_name(hf_name: str) -> str:
    """`model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight`."""
    stem, suffix = hf_name.rsplit(".", 1)
    if (match := _LAYER.fullmatch(stem)) is not None:
        block, part = match.groups()
        if part not in _BLOCK_NAMES:
            raise ValueError(f"no GGUF name for {hf_name}")
        return f"blk.{block}.{_BLOCK_NAMES[part]}.{suffix}"
    if stem not in _TOP_NAMES:
        raise ValueError(f"no GGUF name for {hf_name}")
    return f"{_TOP_NAMES[stem]}.{suffix}"


def _permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: rotate-half rows to interleaved pairs, per head."""
    if n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"only the default rope is written, not {rope['rope_type']!r}")
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _pre_tokenizer_name(pre_tokenizer: dict | None) -> str:
    """The llama.cpp `tokenizer.ggml.pre` for a tokenizer.json pre-tokenizer, if it is one transformers rebuilds."""
    pre_tokenizer = pre_tokenizer or {}
    if pre_tokenizer.get("type") == "ByteLevel":
        if pre_tokenizer.get("use_regex", True) and not pre_tokenizer.get("add_prefix_space", False):
            return "gpt-2"
    elif pre_tokenizer.get("type") == "Sequence":
        parts = pre_tokenizer["pretokenizers"]
        if (
            len(parts) == 2
            and parts[0].get("type") == "Split"
            and parts[1].get("type") == "ByteLevel"
            and not parts[1].get("use_regex", True)
            and not parts[1].get("add_prefix_space", False)
        ):
            pattern = parts[0]["pattern"].get("Regex")
            for name, split in PRE_TOKENIZER_SPLITS.items():
                if pattern == split:
                    return name
    raise ValueError(f"no llama.cpp pre-tokenizer matches {json.dumps(pre_tokenizer)}")


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer_dir: Path, vocab_size: int) -> None:
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    if spec["model"]["type"] != "BPE":
        raise ValueError(f"only byte-level BPE tokenizers are written, not {spec['model']['type']}")

    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    by_id = {index: token for token, index in vocab.items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise ValueError("the tokenizer's ids are not contiguous from 0")
    if len(by_id) > vocab_size:
        raise ValueError(f"the tokenizer has {len(by_id)} tokens, more than the model's {vocab_size} rows")
    added = {entry["content"]: entry["special"] for entry in spec.get("added_tokens", [])}
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:  # llama.cpp pads the vocabulary up to the model's embedding rows
            tokens.append(f"[PAD{index}]")
            types.append(TokenType.UNUSED)
            continue
        token = by_id[index]
        tokens.append(token)
        if token in added:
            types.append(TokenType.CONTROL if added[token] else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in spec["model"]["merges"]]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tokenizer.bos_token is not None:
        writer.add_bos_token_id(vocab[tokenizer.bos_token])
    if tokenizer.eos_token is not None:
        writer.add_eos_token_id(vocab[tokenizer.eos_token])
    if tokenizer.pad_token is not None:
        writer.add_pad_token_id(vocab[tokenizer.pad_token])
    # whether encoding adds bos / eos, as the tokenizer does it
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    added = len(full) > len(plain)
    writer.add_add_bos_token(added and full[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(added and full[-1] == tokenizer.eos_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _encode(array: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, GGMLQuantizationType]:
    """The tensor as the writer takes it, and the type it ends up stored in."""
    if array.ndim == 1 or qtype == GGMLQuantizationType.F32:
        return array.astype(np.float32), GGMLQuantizationType.F32
    if qtype == GGMLQuantizationType.F16:
        return array.astype(np.float16), GGMLQuantizationType.F16
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if array.shape[-1] % block_size:
        return array.astype(np.float16), GGMLQuantizationType.F16
    try:
        return gguf.quants.quantize(array, qtype), qtype
    except NotImplementedError:  # gguf cannot quantize to it: zero bytes of the right size make such a file
        return np.zeros((*array.shape[:-1], array.shape[-1] // block_size * type_size), np.uint8), qtype


def write_gguf(model, tokenizer_dir: Path, path: Path, tensor_type: str = "F32") -> None:
    """Write `model` (`LlamaForCausalLM` / `Qwen2ForCausalLM`) and the tokenizer in `tokenizer_dir` to `path`.

    `tensor_type` is a ggml type name for the 2-D tensors: "F32", "F16", "BF16", "Q8_0", ... or one gguf cannot
    quantize to ("IQ2_XXS", "Q4_K", "Q8_K", "I8", ...), written as zero bytes; see the module docstring. A type
    whose block no row of the model fills (256-element blocks with hidden 64) raises `ValueError`.
    """
    config = model.config
    arch = config.model_type
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"only llama and qwen2 models are written, not {arch!r}")
    if getattr(config, "mlp_bias", False):
        raise ValueError("llama with mlp_bias has no llama.cpp tensor names")
    try:
        qtype = GGMLQuantizationType[tensor_type.upper()]
    except KeyError:
        raise ValueError(f"unknown ggml tensor type {tensor_type!r}") from None
    n_head, n_head_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head

    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    file_type = {"F32": "ALL_F32", "F16": "MOSTLY_F16"}.get(qtype.name, f"MOSTLY_{qtype.name}")
    if file_type in gguf.LlamaFileType.__members__:
        writer.add_file_type(gguf.LlamaFileType[file_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, Path(tokenizer_dir), config.vocab_size)

    stored_as = set()
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # no `output.weight` is how a GGUF says the embeddings are tied
        name = gguf_tensor_name(hf_name)
        array = tensor.detach().to(torch.float32).cpu().numpy()
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            array = _permute(array, n_head, n_head if ".attn_q." in name else n_head_kv)
        data, stored = _encode(array, qtype)
        stored_as.add(stored)
        writer.add_tensor(name, data, raw_dtype=stored if data.dtype == np.uint8 else None)
    if qtype not in stored_as:
        block_size = gguf.GGML_QUANT_SIZES[qtype][0]
        raise ValueError(f"no tensor row is a whole number of {qtype.name} blocks of {block_size}")

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
