"""The GPT generator: a GPT-2-architecture decoder (transformers' GPT2LMHeadModel) trained in PyTorch on a
token stream, or imported from a local checkpoint."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from export.errors import ExportError, check_checkpoint_folder, checkpoint_load_error
from export.tokenization import EOS, load_checkpoint_tokenizer
from export.training import run_steps

logger = logging.getLogger(__name__)


@dataclass
class LoadedGenerator:
    model: torch.nn.Module  # a GPT2LMHeadModel
    tokenizer: Tokenizer
    eos: str | None
    source: str


def new_model(*, vocab_size: int, context: int, layers: int, heads: int, width: int, eos_id: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    if width % heads:
        raise ExportError(f"--width {width} is not a multiple of --heads {heads}")
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=context, n_embd=width, n_layer=layers, n_head=heads,
        bos_token_id=eos_id, eos_token_id=eos_id,
        # Eager attention: the onnxruntime.transformers fusions recognise its pattern (an SDPA export they miss).
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(config)


def load_checkpoint(folder: Path) -> LoadedGenerator:
    """`--import`: a local GPT-2-family causal LM checkpoint and its tokenizer."""
    from transformers import AutoConfig, GPT2LMHeadModel

    check_checkpoint_folder(folder)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        if config.model_type != "gpt2":
            raise ExportError(f"checkpoint folder {folder} holds a {config.model_type!r} model, not a GPT-2-family one")
        model = GPT2LMHeadModel.from_pretrained(folder, local_files_only=True, attn_implementation="eager")
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 (transformers raises OSError, ValueError, KeyError... for bad folders)
        raise checkpoint_load_error(folder, exc) from None
    tokenizer = load_checkpoint_tokenizer(folder)
    eos = tokenizer.id_to_token(config.eos_token_id) if config.eos_token_id is not None else None
    return LoadedGenerator(model.eval(), tokenizer, eos, str(folder))


def encode_documents(tokenizer: Tokenizer, documents: list[str], eos_id: int | None) -> np.ndarray:
    """One token stream: documents joined by the end-of-text token, as GPT-2 was trained."""
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(documents):
        ids.extend(encoding.ids)
        if eos_id is not None:
            ids.append(eos_id)
    return np.asarray(ids, dtype=np.int64)


def split_documents(text: str) -> list[str]:
    """A corpus file is split into documents at literal <|endoftext|> markers when it has them, else at blank
    lines, grouped into pieces of a few thousand characters."""
    if EOS in text:
        return [d.strip("\n") for d in text.split(EOS) if d.strip()]
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    documents, current = [], ""
    for paragraph in paragraphs:
        current = f"{current}\n\n{paragraph}" if current else paragraph
        if len(current) > 4000:
            documents.append(current)
            current = ""
    if current:
        documents.append(current)
    return documents


def train(
    model: torch.nn.Module, stream: np.ndarray, *, steps: int, batch_size: int, context: int, learning_rate: float,
    seed: int,
) -> float | None:
    """Next-token training on random windows of the stream; AdamW, warm-up then cosine decay."""
    from transformers import get_cosine_schedule_with_warmup

    if steps <= 0:
        return None
    length = min(context, len(stream) - 1)
    if length < 2:
        raise ExportError("the training corpus is too short to train on (fewer than 3 tokens)")
    generator = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(stream)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.1, betas=(0.9, 0.95))
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 10), steps)

    def loss_of_step(step: int) -> torch.Tensor:
        starts = torch.randint(0, len(data) - length, (batch_size,), generator=generator)
        batch = torch.stack([data[s:s + length + 1] for s in starts.tolist()])  # (B, T+1)
        return _loss(model, batch)

    return run_steps(model, optimizer, schedule, steps, loss_of_step)


def _loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch[:, :-1]).logits  # (B, T, V)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module, stream: np.ndarray, *, context: int, max_windows: int = 64, max_tokens: int = 16384
) -> dict[str, float]:
    """Mean next-token loss over consecutive windows of the held-out stream (at most `max_tokens`: a
    GPT-2-sized model takes seconds per window on a CPU), and its perplexity."""
    model.eval()
    length = min(context, len(stream) - 1)
    if length < 1:
        return {}
    count = min(max_windows, max(1, max_tokens // length), max(1, (len(stream) - 1) // length))
    losses = []
    for i in tqdm(range(count), desc="evaluating", unit="window", disable=None):
        window = torch.from_numpy(stream[i * length:i * length + length + 1])[None]
        losses.append(_loss(model, window).item())
    loss = float(np.mean(losses))
    return {"val_loss": round(loss, 4), "perplexity": round(math.exp(min(loss, 50.0)), 2), "tokens": count * length}
