"""The generator model: request validation, prefill and decode steps on one decoder graph.

Both steps are plain blocking functions of arrays (no gRPC, no asyncio); the scheduler calls them from its
own thread. The graph follows docs/model-repository.md: left padding, position ids counting real tokens only.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from ..errors import InvalidInput
from ..repository import ModelConfig
from ..runtime import Session
from ..types import GenerateRequest, SamplingParams
from .kv_cache import KVCache

log = logging.getLogger(__name__)

MAX_STOP_SEQUENCES = 8


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A validated request: its prompt tokens and its resolved parameters."""

    request: GenerateRequest
    prompt_ids: list[int]
    max_new_tokens: int
    seed: int


class GeneratorModel:
    def __init__(self, config: ModelConfig, session: Session) -> None:
        self.config = config
        self.session = session
        self.tokenizer = Tokenizer.from_file(str(config.tokenizer_path))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        arch = config.architecture
        self.num_layers = int(arch["num_layers"])
        self.num_heads = int(arch["num_heads"])
        self.head_size = int(arch["head_size"])
        self.context_length = config.max_sequence_length
        self.vocab_size = int(arch.get("vocab_size") or self.tokenizer.get_vocab_size())
        # Logit columns past the tokenizer's vocabulary (a model whose corpus gave fewer BPE merges than it has
        # rows) are ids that decode to nothing: never sampled, by slicing them off.
        self.sampled_vocab_size = min(
            self.vocab_size, int(arch.get("tokenizer_vocab_size") or self.vocab_size)
        )
        gen = config.generation
        self.max_new_tokens = int(gen.get("max_new_tokens", self.context_length - 1))
        self.default_max_new_tokens = min(int(gen.get("default_max_new_tokens", 64)), self.max_new_tokens)
        eos = config.special_tokens.get("eos")
        self.eos_id: int | None = int(eos) if eos is not None else None
        self.cache_dtype = session.input_types.get("past_key_values.0.key", np.float32)
        # Graphs that take `logits_positions` (docs/model-repository.md) compute logits for the last position
        # only; older exports return them for every position, and the last is picked here.
        self.last_logits_only = "logits_positions" in session.input_names
        self.present_names = [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        self.output_names = ["logits", *self.present_names]

    # -- validation (on the caller's thread, before queueing) -------------------------------------------------

    def prepare(self, request: GenerateRequest) -> PreparedRequest:
        """Tokenizes the prompt and checks every parameter; raises InvalidInput naming the field."""
        p = request.params
        if not request.prompt:
            raise InvalidInput("prompt", "empty prompt")
        check_params(p, self.max_new_tokens)
        max_new = p.max_new_tokens if p.max_new_tokens is not None else self.default_max_new_tokens
        prompt_ids = self.tokenizer.encode(request.prompt).ids
        if not prompt_ids:
            raise InvalidInput("prompt", "the prompt has no tokens")
        if len(prompt_ids) + max_new > self.context_length:
            raise InvalidInput(
                "prompt",
                f"{len(prompt_ids)} prompt tokens + max_new_tokens {max_new} = "
                f"{len(prompt_ids) + max_new}, more than the model's context of {self.context_length} tokens",
            )
        seed = p.seed if p.seed is not None else secrets.randbits(63)
        return PreparedRequest(request, prompt_ids, max_new, seed)

    # -- the two steps (in the scheduler's thread) -------------------------------------------------------------

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, KVCache]:
        """Runs the prompts (left-padded into one batch); returns last-position logits (B, vocab) and the cache."""
        longest = max(len(p) for p in prompts)
        input_ids = np.zeros((len(prompts), longest), dtype=np.int64)
        mask = np.zeros((len(prompts), longest), dtype=np.int64)
        for row, ids in enumerate(prompts):
            input_ids[row, longest - len(ids) :] = ids
            mask[row, longest - len(ids) :] = 1
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        past = KVCache.empty(self.num_layers, len(prompts), self.num_heads, self.head_size, self.cache_dtype)
        return self._forward(input_ids, positions, past, mask)

    def decode(
        self, tokens: Sequence[int], positions: Sequence[int], cache: KVCache
    ) -> tuple[np.ndarray, KVCache]:
        """One step for every sequence of the batch: feeds each its last token at its position."""
        input_ids = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)
        pos = np.asarray(positions, dtype=np.int64).reshape(-1, 1)
        return self._forward(input_ids, pos, cache, np.ones_like(input_ids))

    def _forward(
        self, input_ids: np.ndarray, positions: np.ndarray, past: KVCache, new_mask: np.ndarray
    ) -> tuple[np.ndarray, KVCache]:
        mask = np.concatenate([past.mask, new_mask], axis=1) if past.length else new_mask
        feeds = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions}
        if self.last_logits_only:
            feeds["logits_positions"] = np.array([input_ids.shape[1] - 1], dtype=np.int64)
        for i in range(self.num_layers):
            feeds[f"past_key_values.{i}.key"] = past.keys[i]
            feeds[f"past_key_values.{i}.value"] = past.values[i]
        outputs = self.session.run(self.output_names, feeds, keep=self.present_names)
        logits = outputs[0][:, -1, : self.sampled_vocab_size]
        if logits.dtype != np.float32:
            logits = logits.astype(np.float32)
        return logits, KVCache(outputs[1::2], outputs[2::2], mask)


def check_params(p: SamplingParams, max_new_tokens_limit: int) -> None:
    """Raises InvalidInput naming the first bad field of `p`."""
    if p.max_new_tokens is not None and not 1 <= p.max_new_tokens <= max_new_tokens_limit:
        raise InvalidInput(
            "parameters.max_new_tokens", f"{p.max_new_tokens}, must be in 1..{max_new_tokens_limit}"
        )
    if math.isnan(p.temperature) or math.isinf(p.temperature) or p.temperature < 0:
        raise InvalidInput(
            "parameters.temperature", f"{p.temperature}, must be a finite number, 0 (greedy) or more"
        )
    if p.top_k < 0:
        raise InvalidInput("parameters.top_k", f"{p.top_k}, must be 0 (off) or more")
    if math.isnan(p.top_p) or not 0.0 < p.top_p <= 1.0:
        raise InvalidInput("parameters.top_p", f"{p.top_p}, must be in (0, 1]")
    if math.isnan(p.repetition_penalty) or math.isinf(p.repetition_penalty) or p.repetition_penalty <= 0:
        raise InvalidInput("parameters.repetition_penalty", f"{p.repetition_penalty}, must be above 0")
    if len(p.stop) > MAX_STOP_SEQUENCES:
        raise InvalidInput("parameters.stop", f"{len(p.stop)} stop sequences, at most {MAX_STOP_SEQUENCES}")
    for i, stop in enumerate(p.stop):
        if not stop:
            raise InvalidInput(f"parameters.stop[{i}]", "empty stop sequence")
