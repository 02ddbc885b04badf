"""How precisely a fixed set of contexts pins the policy's entropy level: docs/data/fixed_set_levels.json.

Usage: python docs/gen_level_error.py [--out docs/data/fixed_set_levels.json] [--model smollm2-135m]

The held-out probe and the control set of the ``cpu-demo`` runs (docs/llm.md) are fixed contexts: prompts with
responses sampled once from the initial policy. Their token-mean entropy is a ratio ``sum_i S_i / sum_i n_i``
over prompts ``i`` (``S_i`` the summed entropy of prompt ``i``'s response tokens, ``n_i`` their number). Its
standard error as an estimate of the level of the prompts' population is the bootstrap over prompts (responses
resampled with their prompt): ``B`` resamples of the prompts with replacement, the standard deviation of the
ratio. The standard error of the difference of two independent sets is the root sum of squares. Everything
is read at the initial weights from the rollouts' own entropies (the value a run logs at step 0).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch

from llm.config import PRESETS, TrainConfig
from llm.train import FixedSet, Trainer

RESAMPLES = 4000


def per_prompt(fixed: FixedSet) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, n)`` ``[prompts]``: summed token entropy and token count of each prompt's responses."""
    roll = fixed.roll
    ent = torch.where(roll.mask, roll.stats.entropy, 0.0).sum(-1).double()
    count = roll.mask.sum(-1).double()
    prompts = int(roll.prompt_index.max()) + 1
    s = torch.zeros(prompts, dtype=torch.float64).index_add_(0, roll.prompt_index, ent)
    n = torch.zeros(prompts, dtype=torch.float64).index_add_(0, roll.prompt_index, count)
    return s, n


def level(fixed: FixedSet, seed: int = 0) -> dict[str, float]:
    """The set's token-mean entropy, its bootstrap standard error over prompts, and its sizes."""
    s, n = per_prompt(fixed)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(s), (RESAMPLES, len(s)), generator=gen)
    boot = s[idx].sum(-1) / n[idx].sum(-1)
    return {"prompts": len(s), "tokens": int(n.sum()), "level": float(s.sum() / n.sum()),
            "standard_error": float(boot.std())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/data/fixed_set_levels.json")
    parser.add_argument("--model", default=None, help="model (default: the cpu-demo preset's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sets: dict[str, dict[str, float]] = {}
    for name, probe_samples, control_prompts in (("probe 46 x 2", 2, 32), ("probe 46 x 8", 8, 64)):
        extra = {"model": args.model} if args.model else {}
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig(**{**PRESETS["cpu-demo"], **extra, "predictor": "param", "eval_prompts": 0,
                                 "probe_samples": probe_samples, "control_prompts": control_prompts,
                                 "output_dir": tmp})
            trainer = Trainer(cfg, Path(tmp))
            sets[name] = level(trainer.probe_set)
            sets[f"control {control_prompts} x 2"] = level(trainer.control_set)
    probe = sets["probe 46 x 2"]
    for name in ("control 32 x 2", "control 64 x 2"):
        sets[name]["difference_from_probe"] = sets[name]["level"] - probe["level"]
        sets[name]["difference_standard_error"] = math.hypot(sets[name]["standard_error"], probe["standard_error"])
    Path(args.out).write_text(json.dumps(sets, indent=1) + "\n")
    for name, row in sets.items():
        print(name, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
