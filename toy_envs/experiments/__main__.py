"""``python -m toy_envs.experiments NAME [--fast] [--seed S] [--out DIR] [--figures DIR]``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from . import EXPERIMENTS
from .common import save_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toy_envs.experiments", description=__doc__)
    parser.add_argument("name", choices=[*EXPERIMENTS, "all"])
    parser.add_argument("--fast", action="store_true", help="small configuration (< 1 min each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/toy_envs"), help="JSON (and default figure) dir")
    parser.add_argument("--figures", type=Path, default=None, help="figure dir (default: --out)")
    args = parser.parse_args(argv)
    names = list(EXPERIMENTS) if args.name == "all" else [args.name]
    for name in names:
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        payload = EXPERIMENTS[name].run(fast=args.fast, seed=args.seed, out=args.out, figures=args.figures)
        payload["wall_seconds"] = round(time.perf_counter() - t0, 1)
        path = save_json(payload, args.out / f"{name}.json")
        print(f"{name}: {payload['wall_seconds']} s -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
