"""`python -m bench.join_leave`: what a sequence joining or leaving a running batch costs, against the context
the batch already holds. 16 active sequences hold 64 or 512 tokens each; one more joins (its 16-token prompt
prefilled, its cache joined to the batch's) and leaves again, timed together, in the scheduler's own calls:

- the shared-buffer slot cache (SmolLM2, `models/smollm2`, server/generation/slot_cache.py): the join writes the
  prompt into a free slot and the leave frees it; nothing else moves;
- the concatenating cache (GPT-2-small size, `.cache/bench-models/sized/gpt2-small`, kv_cache.py): the join
  pads and copies every layer's keys and values of all 17 rows, the leave gathers 16 of them again;
- the slot cache on the same GPT-2-small weights (`.cache/bench-models/sized-slots/gpt2-small`, exported with
  `--kv-cache shared-buffer`; `python -m bench generate --sizes sized --kv-cache shared-buffer` builds it).

The ratio 512/64 of the median join+leave time says whether the cost grows with the context held (the issue's
target: at most 1.5). Both sides run in this process, in alternating rounds; 2 threads for ONNX Runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from bench.machine import ROOT, cpu_model
from bench.stats import ratio_of_rounds
from server.config import Device
from server.generation.kv_cache import KVCache
from server.generation.model import make_generator
from server.generation.slot_cache import SlotCache
from server.repository import ModelConfig
from server.runtime import Session

ACTIVE = 16
NEW_PROMPT = 16
CONTEXTS = (64, 512)


def _model(folder: Path, threads: int, slots: int):
    config = ModelConfig.read(folder)
    return make_generator(config, Session(config.model_file("fp32")[1], Device.CPU, threads), slots)


def _version(model_dir: Path) -> Path:
    return max((p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def join_leave_seconds(model, context: int, repeats: int, rng: np.random.Generator) -> list[float]:
    """Per repetition: the newcomer's prefill and its join to 16 sequences of `context` tokens, then its leave."""
    vocab = model.sampled_vocab_size
    prompts = [rng.integers(0, vocab, context).tolist() for _ in range(ACTIVE)]
    _, cache = model.prefill(prompts)
    seconds = []
    keep = list(range(ACTIVE))
    for _ in range(repeats):
        new_prompt = rng.integers(0, vocab, NEW_PROMPT).tolist()
        start = time.perf_counter()
        _, new = model.prefill([new_prompt])
        joined = type(cache).join(cache, new)
        if isinstance(joined, KVCache):
            joined.keys  # noqa: B018 - the join's copies happen when the arrays are next read: in the step
        cache = joined.select(keep)
        if isinstance(cache, KVCache):
            cache.keys  # noqa: B018 - the leave's gather, likewise
        seconds.append(time.perf_counter() - start)
    if isinstance(cache, SlotCache):
        cache.release()
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slot-model", type=Path, default=ROOT / "models" / "smollm2")
    parser.add_argument("--concat-model", type=Path, default=ROOT / ".cache" / "bench-models" / "sized" / "gpt2-small")
    parser.add_argument("--gpt2-slot-model", type=Path,
                        default=ROOT / ".cache" / "bench-models" / "sized-slots" / "gpt2-small")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sides = {}
    for label, folder in (("slot cache", args.slot_model), ("concatenating cache", args.concat_model),
                          ("slot cache, GPT-2-small", args.gpt2_slot_model)):
        if not folder.is_dir():
            print(f"{label}: {folder} is missing; skipped")
            continue
        sides[label] = _model(_version(folder), args.threads, ACTIVE + 1)
    rng = np.random.default_rng(0)
    per_round: dict[str, dict[int, list[float]]] = {label: {c: [] for c in CONTEXTS} for label in sides}
    for r in range(args.rounds):
        for label, model in (list(sides.items()) if r % 2 == 0 else list(sides.items())[::-1]):
            for context in (CONTEXTS if r % 2 == 0 else CONTEXTS[::-1]):
                times = join_leave_seconds(model, context, args.repeats, rng)
                per_round[label][context].append(statistics.median(times))
    figures = {"machine": cpu_model(), "active": ACTIVE, "new_prompt_tokens": NEW_PROMPT, "rounds": args.rounds,
               "repeats": args.repeats, "sides": {}}
    for label, rounds in per_round.items():
        ratio = ratio_of_rounds(rounds[CONTEXTS[1]], rounds[CONTEXTS[0]])
        figures["sides"][label] = {"ms": {str(c): round(statistics.median(v) * 1000, 3) for c, v in rounds.items()},
                                   "per_round_ms": {str(c): [round(x * 1000, 3) for x in v] for c, v in rounds.items()},
                                   "ratio_512_over_64": ratio}
        ms = figures["sides"][label]["ms"]
        print(f"{label}: join+leave with 16 sequences of 64 tokens {ms['64']} ms, of 512 tokens {ms['512']} ms: "
              f"ratio {ratio['ratio']}")
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
