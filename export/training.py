"""The optimisation loops the trainers share: steps of a loss function, gradient clipping, a schedule, and
progress (a bar on a terminal, a log line every tenth of the way without one); and the encoders' fine-tuning
(AdamW, linear warm-up and decay, shuffled batches of examples)."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import torch
from tqdm import tqdm

logger = logging.getLogger(__name__)


def run_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    steps: int,
    loss_of_step: Callable[[int], torch.Tensor],
) -> float | None:
    """Runs `steps` optimisation steps of `loss_of_step(step)`; returns the last smoothed loss (None for 0 steps).

    The model is in train mode during the loop and in eval mode afterwards.
    """
    model.train()
    smoothed = None
    with tqdm(total=steps, desc="training", unit="step", disable=None) as bar:
        for step in range(1, steps + 1):
            loss = loss_of_step(step)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            smoothed = loss.item() if smoothed is None else 0.9 * smoothed + 0.1 * loss.item()
            bar.set_postfix(loss=f"{smoothed:.4f}")
            bar.update()
            if bar.disable and (step % max(1, steps // 10) == 0 or step == steps):
                # No terminal, no bar: a line every tenth of the way, for logs.
                logger.info("step %d/%d, loss %.4f", step, steps, smoothed)
    model.eval()
    return smoothed


def fine_tune(
    model: torch.nn.Module,
    examples: int,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    loss_of_batch: Callable[[list[int]], torch.Tensor],
) -> float | None:
    """Fine-tunes with AdamW and a linear warm-up/decay schedule over shuffled batches of `examples` indices
    (an epoch after another); `loss_of_batch(indices)` is the loss of one batch. Returns the last smoothed
    training loss (None for 0 steps)."""
    from transformers import get_linear_schedule_with_warmup

    if steps <= 0:
        return None
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, max(1, steps // 10), steps)
    rng = random.Random(seed)
    queue: list[list[int]] = []

    def loss_of_step(step: int) -> torch.Tensor:
        nonlocal queue
        if not queue:
            queue = batches(examples, batch_size, rng)
        return loss_of_batch(queue.pop())

    return run_steps(model, optimizer, schedule, steps, loss_of_step)


def batches(n: int, size: int, rng: random.Random | None) -> list[list[int]]:
    """The indices 0..n-1 in batches of `size` (the last one shorter), shuffled by `rng` when given."""
    order = list(range(n))
    if rng is not None:
        rng.shuffle(order)
    return [order[i:i + size] for i in range(0, n, size)]
