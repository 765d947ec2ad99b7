"""The generator model: request validation, prefill and decode steps on one decoder graph.

Both steps are plain blocking functions of arrays (no gRPC, no asyncio); the scheduler calls them from its
own thread. Two graph contracts (docs/model-repository.md): `GeneratorModel` drives the concatenating decoder
(left padding, position ids counting real tokens, present = past + new), `SharedBufferGenerator` the
GroupQueryAttention decoder whose past and present share one preallocated buffer (slot_cache.py).
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from ..errors import InvalidInput, StartupError, shown_number
from ..repository import ModelConfig
from ..runtime import CPU, CUDA, Session
from ..types import GenerateRequest, SamplingParams
from .chat_template import ChatTemplate
from .kv_cache import KVCache
from .sampling_head import DeviceLogits, SamplingHead
from .slot_cache import SlotCache, SlotPool

log = logging.getLogger(__name__)

MAX_STOP_SEQUENCES = 8
# The mixed-step graph's names for the chunk's inputs and outputs: chunk_ids, chunk_mask, chunk_past_key_values.*
CHUNK_PREFIX = "chunk_"
# Texts longer than this (characters) are tokenized without holding the GIL (see GeneratorModel._encode).
GIL_FREE_CHARS = 4096


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A validated request: its prompt tokens and its resolved parameters."""

    request: GenerateRequest
    prompt_ids: list[int]
    max_new_tokens: int
    seed: int


class Interrupt:
    """Stops one session call from another thread (ONNX Runtime's `RunOptions.terminate`): a call under a fired
    interrupt raises Interrupted within moments, or at once when it was fired before the call began."""

    __slots__ = ("fired", "run_options")

    def __init__(self) -> None:
        self.run_options = ort.RunOptions()
        self.fired = False

    def fire(self) -> None:
        self.fired = True
        self.run_options.terminate = True


class Interrupted(Exception):
    """A session call stopped by its Interrupt."""


class GeneratorModel:
    """`max_sequences` and `kv_cache_tokens` (0: `max_sequences` times the context) size the KV cache: see
    `_cache_size` of each contract."""

    def __init__(
        self, config: ModelConfig, session: Session, max_sequences: int = 16, kv_cache_tokens: int = 0
    ) -> None:
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
        self.max_sequences = max_sequences
        # The cache's capacity in tokens, and the most one sequence (prompt and generated tokens) may hold.
        self.kv_cache_tokens, self.sequence_limit = self._cache_size(
            kv_cache_tokens or max_sequences * self.context_length
        )
        self.vocab_size = int(arch.get("vocab_size") or self.tokenizer.get_vocab_size())
        # Logit columns past the tokenizer's vocabulary (a model whose corpus gave fewer BPE merges than it has
        # rows) are ids that decode to nothing: never sampled, by slicing them off.
        self.sampled_vocab_size = min(
            self.vocab_size, int(arch.get("tokenizer_vocab_size") or self.vocab_size)
        )
        gen = config.generation
        self.max_new_tokens = min(int(gen.get("max_new_tokens", self.sequence_limit)), self.sequence_limit - 1)
        self.default_max_new_tokens = min(int(gen.get("default_max_new_tokens", 64)), self.max_new_tokens)
        # A model may end a sequence with any of several ids (Llama 3: <|end_of_text|>, <|eot_id|>, ...).
        eos = gen.get("eos_token_ids")
        if eos is None:
            eos = [] if config.special_tokens.get("eos") is None else [config.special_tokens["eos"]]
        self.eos_ids: frozenset[int] = frozenset(int(e) for e in eos)
        self.chat_template = ChatTemplate.from_folder(config.path)
        # No token covers more characters than the longest vocabulary entry, so a longer text cannot fit the
        # context: it is refused before tokenizing (megabytes take seconds and hundreds of MB to tokenize).
        longest_token = max(map(len, self.tokenizer.get_vocab()), default=1)
        self.max_prompt_chars = self.sequence_limit * max(1, longest_token)
        self.cache_dtype = session.input_types.get("past_key_values.0.key", np.float32)
        # Graphs that take `logits_positions` (docs/model-repository.md) compute logits for the last position
        # only; older exports return them for every position, and the last is picked here.
        self.last_logits_only = "logits_positions" in session.input_names
        self.present_names = [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        self.output_names = ["logits", *self.present_names]

    def _cache_size(self, tokens: int) -> tuple[int, int]:
        """(capacity, per-sequence limit) of a cache of `tokens` tokens. This cache grows and shrinks with the
        batch (rows times its longest row), so its capacity is a bound on that: one sequence alone may use it
        whole, up to the model's context, and admission keeps the batch's reservations within it
        (`reserved_tokens`)."""
        if tokens < 2:
            raise StartupError(f"model {self.config.name}: a KV cache of {tokens} tokens holds no sequence")
        return tokens, min(self.context_length, tokens)

    def reserved_tokens(self, reservations: Sequence[int]) -> int:
        """The cache the batch of sequences reserving `reservations` tokens each (prompt + max_new_tokens)
        may come to hold: its rows, each as long as the longest (rows are padded to one length)."""
        return len(reservations) * max(reservations, default=0)

    def _too_long(self) -> str:
        if self.sequence_limit == self.context_length:
            return f"the model's context of {self.context_length} tokens"
        return (
            f"the {self.sequence_limit} tokens one sequence may hold in the KV cache of {self.kv_cache_tokens} "
            f"(the model's context is {self.context_length})"
        )

    # -- validation (on the caller's thread, before queueing) -------------------------------------------------

    def prepare(self, request: GenerateRequest) -> PreparedRequest:
        """Tokenizes the prompt and checks every parameter; raises InvalidInput naming the field."""
        p = request.params
        if request.messages:
            if request.prompt:
                raise InvalidInput("messages", "set either prompt or messages, not both")
            if self.chat_template is None:
                raise InvalidInput("messages", f"model {self.config.name} has no chat template; send a prompt")
        elif not request.prompt:
            raise InvalidInput("prompt", "empty prompt")
        check_params(p, self.max_new_tokens)
        chars = sum(len(content) for _, content in request.messages) if request.messages else len(request.prompt)
        if chars > self.max_prompt_chars:
            raise InvalidInput(
                "messages" if request.messages else "prompt",
                f"{chars} characters cannot fit {self._too_long()}",
            )
        max_new = p.max_new_tokens if p.max_new_tokens is not None else self.default_max_new_tokens
        if request.messages:
            # The template writes the special tokens itself (as transformers' apply_chat_template, which
            # tokenizes without adding them again).
            text = self.chat_template.render(request.messages, add_generation_prompt=True)
            prompt_ids = self._encode(text, add_special_tokens=False)
        else:
            prompt_ids = self._encode(request.prompt)
        field = "messages" if request.messages else "prompt"
        if not prompt_ids:
            raise InvalidInput(field, "the prompt has no tokens")
        if len(prompt_ids) + max_new > self.sequence_limit:
            raise InvalidInput(
                field,
                f"{len(prompt_ids)} prompt tokens + max_new_tokens {max_new} = "
                f"{len(prompt_ids) + max_new}, more than {self._too_long()}",
            )
        seed = p.seed if p.seed is not None else secrets.randbits(63)
        return PreparedRequest(request, prompt_ids, max_new, seed)

    def _encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # A long text goes through encode_batch, which releases the GIL while it tokenizes (encode holds it: a
        # prompt of 160k characters stalled every RPC for 200 ms); it costs more per call, so not for short ones.
        if len(text) > GIL_FREE_CHARS:
            return self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    # -- the two steps (in the scheduler's thread) -------------------------------------------------------------

    def reset(self) -> None:
        """Forgets every cached sequence (the scheduler dropped its running batch after a failure)."""

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

    def decode(self, tokens: Sequence[int], positions: Sequence[int], cache: KVCache) -> tuple[np.ndarray, KVCache]:
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


class SharedBufferGenerator(GeneratorModel):
    """A GroupQueryAttention decoder (onnxruntime-genai's layout) on a preallocated cache of `slots` rows.

    The graph takes `input_ids` and `attention_mask` only (no position ids: the op rotates by each row's length,
    which it reads from the mask); a row's tokens sit at positions 0..length-1 of its slot ("right padding")."""

    def __init__(
        self,
        config: ModelConfig,
        session: Session,
        slots: int,
        kv_cache_tokens: int = 0,
        device_sampling: bool | None = None,
        mixed: Session | None = None,
    ) -> None:
        super().__init__(config, session, slots, kv_cache_tokens)
        # The mixed-step graph's session (export/mixed_step.py): decode rows and a prompt chunk in one call.
        self.mixed = mixed
        self._mixed_binding: tuple[tuple[int, int], ort.IOBinding] | None = None
        self.num_kv_heads = int(self.config.architecture.get("num_kv_heads") or self.num_heads)
        self.pool = SlotPool(
            self.num_layers,
            slots,
            self.num_kv_heads,
            self.sequence_limit,
            self.head_size,
            self.cache_dtype,
            session.device,
            session.device_id,
        )
        self._cache_names = [
            (f"past_key_values.{i}.{kv}", f"present.{i}.{kv}")
            for i in range(self.num_layers)
            for kv in ("key", "value")
        ]
        self._element = self.pool.dtype.type
        self._decode_binding: tuple[int, ort.IOBinding] | None = None
        # A decode step's logits stay on the device, ranked there by the sampling head (sampling_head.py):
        # by default on a GPU; `True` also on the CPU (the same path, as the tests run it).
        self.head: SamplingHead | None = None
        if device_sampling or (device_sampling is None and session.device != "cpu"):
            self.head = make_head(session, self.sampled_vocab_size, session.output_types["logits"])
            log.info("model %s: decode steps rank their logits on %s (the sampling head)", config.name, self.head.provider)

    def _cache_size(self, tokens: int) -> tuple[int, int]:
        """Allocated whole at start: `max_sequences` slots of one length, the context or less when `tokens` is
        less than the slots times the context (shorter sequences; to keep the context, fewer slots)."""
        length = min(self.context_length, tokens // self.max_sequences)
        if length < 2:
            raise StartupError(
                f"model {self.config.name}: a KV cache of {tokens} tokens leaves each of its "
                f"{self.max_sequences} sequences (max_active_sequences) {length} tokens; it needs at least 2"
            )
        return self.max_sequences * length, length

    def reserved_tokens(self, reservations: Sequence[int]) -> int:
        """Each sequence holds a whole slot."""
        return len(reservations) * self.sequence_limit

    def reset(self) -> None:
        self.pool.reset()

    def _bind_cache(self, binding: ort.IOBinding, first_slot: int, rows: int, prefix: str = "") -> None:
        shape = (rows, *self.pool.row_shape)
        device, device_id = self.pool.device, self.pool.device_id
        for (past, present), pointer in zip(self._cache_names, self.pool.pointers(first_slot)):
            binding.bind_input(prefix + past, device, device_id, self._element, shape, pointer)
            binding.bind_output(prefix + present, device, device_id, self._element, shape, pointer)

    def _run(
        self,
        binding: ort.IOBinding,
        input_ids: np.ndarray,
        mask: np.ndarray,
        interrupt: Interrupt | None = None,
        on_device: bool = False,
        session: Session | None = None,
    ) -> np.ndarray | DeviceLogits:
        """Last-position logits (B, vocab): float32 on the host, or (`on_device`, with a sampling head) left
        where the model computed them. `session`: the mixed-step graph's (default: the model's)."""
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", mask)
        on_device = on_device and self.head is not None
        binding.bind_output("logits", self.pool.device if on_device else "cpu", self.pool.device_id if on_device else 0)
        try:
            (session or self.session).run_with_iobinding(binding, interrupt and interrupt.run_options)
        except Exception as exc:
            if interrupt is not None and interrupt.fired:
                raise Interrupted("the call was interrupted") from exc
            raise
        value = binding.get_outputs()[-1]  # bound last, so listed last
        if on_device:
            return DeviceLogits(self.head, value)
        logits = value.numpy()[:, -1, : self.sampled_vocab_size]
        return logits if logits.dtype == np.float32 else logits.astype(np.float32)

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, SlotCache]:
        """Each prompt into a free slot of its own (prompts of one length in neighbouring slots in one call:
        `batchable`; the caller bounds the batch); returns last-position logits (B, vocab) and the cache."""
        slots: list[int] = []
        rows = []
        try:
            for _ in prompts:
                slots.append(self.pool.take())
            start = 0
            while start < len(prompts):
                end = start + batchable([len(p) for p in prompts[start:]], slots[start:], math.inf)
                rows.append(self.prefill_rows(slots[start], prompts[start:end]))
                start = end
        except BaseException:
            self.pool.release(slots)
            raise
        return np.concatenate(rows), SlotCache(self.pool, slots, [len(p) for p in prompts])

    def prefill_chunk(
        self, slot: int, ids: Sequence[int], done: int, interrupt: Interrupt | None = None
    ) -> np.ndarray:
        """Writes the prompt tokens `ids` into `slot` after the `done` tokens it holds (chunked prefill: the op
        attends to those and to the chunk, causally); returns the chunk's last-position logits (1, vocab).
        Raises Interrupted when `interrupt` fires (the slot then holds a partial chunk: free it)."""
        return self.prefill_rows(slot, [ids], done, interrupt)

    def prefill_rows(
        self,
        first_slot: int,
        prompts: Sequence[Sequence[int]],
        done: int = 0,
        interrupt: Interrupt | None = None,
    ) -> np.ndarray:
        """Writes prompt tokens of one length into the neighbouring slots `first_slot`, `first_slot` + 1, ...,
        after the `done` tokens each holds, in one call; returns their last-position logits (B, vocab). One
        length, because the graph's logits are those of the last position, which is each row's last token
        only when no row is padded. The rows share the weights' reads: 16 prompts of 35 tokens cost SmolLM2
        (fp32, 2 CPU cores) half the time of 16 calls."""
        binding = self.session.session.io_binding()
        self._bind_cache(binding, first_slot, len(prompts))
        input_ids = np.asarray(prompts, dtype=np.int64).reshape(len(prompts), -1)
        mask = np.ones((len(prompts), done + input_ids.shape[1]), dtype=np.int64)
        slots = range(first_slot, first_slot + len(prompts))
        for slot in slots:
            self.pool.writing(slot, done)
        logits = self._run(binding, input_ids, mask, interrupt)
        for slot, ids in zip(slots, prompts):
            self.pool.wrote(slot, done, ids)
        return logits

    def decode(
        self, tokens: Sequence[int], positions: Sequence[int], cache: SlotCache
    ) -> tuple[np.ndarray, SlotCache]:
        """One step over slots 0..highest in use; `positions` are implied by the slots' lengths. A slot not in
        the batch gets a dummy token after the prompt tokens it holds (a prompt being written by chunks, or
        one kept for prefix caching), where it overwrites nothing held; its output is ignored."""
        input_ids, mask = self._step_inputs(tokens, cache)
        span = len(input_ids)
        # The cache bindings depend only on how many slots the step spans: reuse them while that holds.
        if self._decode_binding is None or self._decode_binding[0] != span:
            binding = self.session.session.io_binding()
            self._bind_cache(binding, 0, span)
            self._decode_binding = (span, binding)
        logits = self._run(self._decode_binding[1], input_ids, mask, on_device=True)
        return logits[cache.slots], SlotCache(self.pool, cache.slots, [n + 1 for n in cache.lengths])

    def decode_with_chunk(
        self, tokens: Sequence[int], cache: SlotCache, slot: int, ids: Sequence[int], done: int
    ) -> tuple[np.ndarray | DeviceLogits, SlotCache, np.ndarray | DeviceLogits]:
        """`decode` and `prefill_chunk(slot, ids, done)` in one call of the mixed-step graph (the weights read
        once for both); returns the rows' logits, their cache, and the chunk's last-position logits (1, vocab).
        The logits are a decode step's: left on the device for the sampling head when there is one (the
        chunk's row is ranked in the same run, and only read when the prompt is complete). The chunk's slot,
        when the step spans it, takes its row's dummy token after the chunk (the two attention nodes of a layer
        never write the same position)."""
        assert self.mixed is not None
        input_ids, mask = self._step_inputs(tokens, cache, {slot: done + len(ids)})
        span = len(input_ids)
        if self._mixed_binding is None or self._mixed_binding[0] != (span, slot):
            binding = self.mixed.session.io_binding()
            self._bind_cache(binding, 0, span)
            self._bind_cache(binding, slot, 1, CHUNK_PREFIX)
            self._mixed_binding = ((span, slot), binding)
        binding = self._mixed_binding[1]
        chunk_ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        binding.bind_cpu_input(CHUNK_PREFIX + "ids", chunk_ids)
        binding.bind_cpu_input(CHUNK_PREFIX + "mask", np.ones((1, done + chunk_ids.shape[1]), dtype=np.int64))
        self.pool.writing(slot, done)
        logits = self._run(binding, input_ids, mask, on_device=True, session=self.mixed)
        self.pool.wrote(slot, done, ids)
        rows = SlotCache(self.pool, cache.slots, [n + 1 for n in cache.lengths])
        return logits[cache.slots], rows, logits[[span]]

    def _step_inputs(
        self, tokens: Sequence[int], cache: SlotCache, held: Mapping[int, int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """A decode step's `input_ids` (span, 1) and `attention_mask` over slots 0..highest in use; an idle
        slot's dummy token goes after what it holds (`held` overrides the pool's record)."""
        span = max(cache.slots) + 1
        input_ids = np.zeros((span, 1), dtype=np.int64)
        lengths = np.fromiter((self.pool.held(s) for s in range(span)), dtype=np.int64, count=span)
        for slot, n in (held or {}).items():
            if slot < span:
                lengths[slot] = n
        input_ids[cache.slots, 0] = tokens
        lengths[cache.slots] = cache.lengths
        width = int(lengths.max()) + 1
        return input_ids, (np.arange(width) <= lengths[:, None]).astype(np.int64)


def batchable(lengths: Sequence[int], slots: Sequence[int], budget: float) -> int:
    """How many of the prompts (their `lengths`, in `slots`) from the first on one `prefill_rows` call writes
    whole: those of the first's length in the slots right after the first's, within `budget` tokens. At least
    1 (the first alone, whatever its length)."""
    n = 1
    while (
        n < len(lengths)
        and lengths[n] == lengths[0]
        and slots[n] == slots[0] + n
        and (n + 1) * lengths[0] <= budget
    ):
        n += 1
    return n


def make_generator(
    config: ModelConfig,
    session: Session,
    max_active_sequences: int,
    kv_cache_tokens: int = 0,
    device_sampling: bool | None = None,
    mixed: Session | None = None,
) -> GeneratorModel:
    """The model class for the graph's contract (config.json's `onnx.kv_cache`). Raises StartupError when
    `kv_cache_tokens` is too small for one sequence. `device_sampling` (shared-buffer decoders; None: on a
    GPU): decode steps rank their logits on the device. `mixed`: the session of the variant's mixed-step
    graph (shared-buffer decoders)."""
    if config.kv_cache == "shared_buffer":
        return SharedBufferGenerator(config, session, max_active_sequences, kv_cache_tokens, device_sampling, mixed)
    return GeneratorModel(config, session, max_active_sequences, kv_cache_tokens)


def make_head(session: Session, vocab: int, dtype: type) -> SamplingHead:
    """The sampling head on the model's own device (the CUDA provider for a CUDA or TensorRT model: the head
    is too small for TensorRT to pay). Raises StartupError when ONNX Runtime puts it elsewhere."""
    # UNVERIFIED without a GPU: the head on the CUDA provider, reading the model's logits in device memory.
    providers = [CUDA, CPU] if session.device == "cuda" else [CPU]
    head = SamplingHead(
        vocab,
        np.dtype(dtype),
        providers,
        [session.cuda.provider_options(p) for p in providers],
        session.intra_op_threads,
        session.guarded,
    )
    if head.provider != providers[0]:
        raise StartupError(f"the sampling head of {session.path} runs on {head.provider}, not {providers[0]}")
    return head


def check_params(p: SamplingParams, max_new_tokens_limit: int) -> None:
    """Raises InvalidInput naming the first bad field of `p`."""
    if p.max_new_tokens is not None and not 1 <= p.max_new_tokens <= max_new_tokens_limit:
        raise InvalidInput(
            "parameters.max_new_tokens",
            f"{shown_number(p.max_new_tokens)}, must be in 1..{max_new_tokens_limit}",
        )
    if math.isnan(p.temperature) or math.isinf(p.temperature) or p.temperature < 0:
        raise InvalidInput(
            "parameters.temperature", f"{p.temperature}, must be a finite number, 0 (greedy) or more"
        )
    if p.top_k < 0:
        raise InvalidInput("parameters.top_k", f"{shown_number(p.top_k)}, must be 0 (off) or more")
    if math.isnan(p.top_p) or not 0.0 < p.top_p <= 1.0:
        raise InvalidInput("parameters.top_p", f"{p.top_p}, must be in (0, 1]")
    if math.isnan(p.repetition_penalty) or math.isinf(p.repetition_penalty) or p.repetition_penalty <= 0:
        raise InvalidInput("parameters.repetition_penalty", f"{p.repetition_penalty}, must be above 0")
    if len(p.stop) > MAX_STOP_SEQUENCES:
        raise InvalidInput("parameters.stop", f"{len(p.stop)} stop sequences, at most {MAX_STOP_SEQUENCES}")
    for i, stop in enumerate(p.stop):
        if not stop:
            raise InvalidInput(f"parameters.stop[{i}]", "empty stop sequence")
