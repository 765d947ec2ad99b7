"""The optimisation loop both trainers share: steps of a loss function, gradient clipping, a schedule, and
progress (a bar on a terminal, a log line every tenth of the way without one)."""

from __future__ import annotations

import logging
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
