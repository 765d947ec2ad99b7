"""Tiny Llama-family checkpoints for tests, built in seconds: random weights, a byte-level BPE tokenizer trained
on a few sentences, a ChatML chat template, and two end-of-sequence ids."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

# The split regexes llama.cpp names by `tokenizer.ggml.pre`, as transformers rebuilds them.
PRE_TOKENIZER_SPLITS = {
    "llama-bpe": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
    "qwen2": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
}

BOS, EOS, PAD = "<|startoftext|>", "<|endoftext|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A tiny model answers questions about documents.",
    "Crème brûlée and naïve façades are accented words.",
    "Emoji such as 🎉 and 🚀 are several bytes each.",
    "Numbers like 12345 and 2024 are split into digits: 123, 1234, 12345, 123456.",
    "Call 555 0123 at 10:30 on 2024-06-01; it costs 1234 or 123 dollars, not 12.",
    "Hello, world! How are you today?",
]
# The conversation whose greedy answer decides the checkpoint's second end-of-sequence id (see llm_checkpoint).
EOS_CONVERSATION = [{"role": "user", "content": "Hello, world! How are you today?"}]
EOS_AT = 3  # the tiny model's answer to EOS_CONVERSATION ends at its 3rd token


def build_tokenizer(tokenizer_dir: Path, pre: str = "qwen2", vocab_size: int = 320):
    """Train a byte-level BPE on a few sentences, save it as a `PreTrainedTokenizerFast` and return it.

    `pre` is the split regex by its llama.cpp name ("qwen2", "llama-bpe"), or "gpt-2" for GPT-2's ByteLevel
    pre-tokenizer. bos, eos, pad and two chat markers are special tokens; the config carries a ChatML template.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    if pre == "gpt-2":
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PRE_TOKENIZER_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(SENTENCES, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD, chat_template=CHAT_TEMPLATE
    )
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(tokenizer_dir)
    return fast


def _tiny_config(config_class, vocab_size: int, **overrides):
    settings = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
    }
    return config_class(**(settings | overrides))


def tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    """A random 2-layer `LlamaForCausalLM`: hidden 64, 4 query heads, 2 key/value heads; `overrides` go to the config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(_tiny_config(LlamaConfig, vocab_size, **overrides)).eval()


def tiny_qwen2(vocab_size: int, seed: int = 0, **overrides):
    """A random 2-layer `Qwen2ForCausalLM` (q/k/v biases); `overrides` go to the config."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(_tiny_config(Qwen2Config, vocab_size, **overrides)).eval()
    with torch.no_grad():  # biases start at zero: make them something a lost bias would show in
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.02)
    return model


def greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    """PyTorch greedy decoding, recomputing the whole sequence each step (the reference)."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(new_tokens):
            ids.append(int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids


def llm_checkpoint(folder: Path, arch: str = "llama", seed: int = 0) -> dict:
    """A tiny checkpoint folder (model, tokenizer, generation_config) of `arch` ("llama" or "qwen2").

    Its generation_config lists two end-of-sequence ids: the tokenizer's <|endoftext|>, and the token the model
    greedily writes as the EOS_AT-th token of its answer to EOS_CONVERSATION (chosen so that it did not occur
    earlier in that answer). Returns (and writes to nlpserve-test.json) {"eos_ids", "answer_ids" (the answer up to
and with that token), "prompt_ids" (the templated conversation)}."""
    tokenizer = build_tokenizer(folder, pre="llama-bpe" if arch == "llama" else "qwen2")
    eos = tokenizer.convert_tokens_to_ids(EOS)
    build = tiny_llama if arch == "llama" else tiny_qwen2
    vocab = len(tokenizer)
    prompt = tokenizer.apply_chat_template(EOS_CONVERSATION, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt)
    for attempt in range(50):
        model = build(vocab, seed=seed + attempt, bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
                      pad_token_id=tokenizer.pad_token_id)
        answer = greedy(model, prompt, EOS_AT)[len(prompt):]
        if answer[-1] not in answer[:-1] and eos not in answer:
            break
    else:
        raise RuntimeError("no seed gives an answer with a fresh token at EOS_AT")
    model.generation_config.eos_token_id = [eos, answer[-1]]
    model.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    facts = {"eos_ids": [eos, answer[-1]], "answer_ids": answer, "prompt_ids": prompt}
    (folder / "nlpserve-test.json").write_text(json.dumps(facts))
    return facts


def gpt2_checkpoint(folder: Path, seed: int = 0) -> None:
    """A tiny random GPT-2 checkpoint folder (2 layers, 4 heads, width 64, context 128) with a GPT-2-style
    byte-level tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_tokenizer(folder, pre="gpt-2")
    eos = tokenizer.convert_tokens_to_ids(EOS)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=eos, eos_token_id=eos, attn_implementation="eager")
    GPT2LMHeadModel(config).save_pretrained(folder)


def run_export(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m export ARGS` in a child process, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "export", *args], cwd=ROOT, check=False, capture_output=True, text=True,
        timeout=timeout,
    )
