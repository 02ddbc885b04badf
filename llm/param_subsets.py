"""Subset experiment: does a per-token prediction tell what one update on a chosen subset does to entropy?

``python -m llm.param_subsets --model smoke|embedded --out DIR``

One real GRPO batch (the task of the ``smoke`` or ``cpu-demo`` preset, sampled from the model itself) is
scored, turned into GRPO advantages, and its per-token first-order contributions are computed twice: in
parameter space (:func:`entrotheory.param_space_contributions`, with the optimiser's preconditioner, docs/
theory.md §5) and in logit space (:func:`entrotheory.token_entropy_contributions`, the per-position form of
§3). Then, for ``--subsets`` random accept masks over the batch's rows (each row kept with probability 1/2;
a rejected row trains with advantage 0 and keeps its place in the loss normaliser, as the Entrocraft
sampler does), one optimiser step is taken from the same saved state (model and optimiser restored each
time) and the change of the token-mean entropy on the same contexts is measured. The predicted change of
a subset is the sum of its rows' contributions (+ the optimiser's drift, param space) or
``lr * sum c / (M N)`` (logit space, eq. 3.3). Reported per optimiser (SGD; AdamW after ``--warmup`` steps on
other batches, so that its moments are meaningful): Pearson r and least-squares slope of measured on
predicted, and the same for the exact first-order ``<grad Hbar, dtheta>`` known only after the step.
Writes ``param_subsets.json`` (and a markdown table, :func:`table`) into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from entrotheory import (
    first_order_entropy_change,
    param_space_contributions,
    policy_loss_gradient,
    preconditioner_from_optimizer,
    token_entropy_contributions,
    token_entropy_stats,
    token_mean_entropy_change,
)
from entrotheory.advantages import compute_advantages
from entrotheory.param_space import masked_mean_entropy

from .config import PRESETS, TrainConfig
from .errors import UserError
from .models import load_model_and_tokenizer
from .rollout import encode_prompts, generate, pad_rollout, response_logits
from .tasks import make_task

__all__ = ["SubsetBatch", "run", "table", "main"]

PRESET_OF_MODEL = {"smoke": "smoke", "embedded": "cpu-demo"}

#: probability that a row is accepted in a random subset
ACCEPT = 0.5

#: the predictions compared, and how the table names them
PREDICTIONS = {
    "param": "param-space, v frozen (before the step)",
    "param_linearized": "param-space, Adam linearised at the expected gradient (before the step)",
    "logit": "logit-space (per position)",
    "exact_first_order": "<grad Hbar, dtheta> (after the step)",
}


class _Responses(nn.Module):
    """``forward() -> logits / temperature [B, T, V]`` of a fixed batch, so that ``functional_call`` can swap
    the wrapped model's parameters for the whole (prefix-shared, several-call) forward pass."""

    def __init__(self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, prompt_index: Tensor,
                 tokens: Tensor, temperature: float) -> None:
        super().__init__()
        self.model = model
        self.inputs = (prompt_ids, prompt_mask, prompt_index, tokens)
        self.temperature = temperature

    def forward(self) -> Tensor:
        return response_logits(self.model, *self.inputs).float() / self.temperature


@dataclass
class SubsetBatch:
    """One scored batch: ``tokens``/``mask`` ``[B, T]``, ``advantages`` ``[B]``, and its forward wrapper."""

    tokens: Tensor
    mask: Tensor
    advantages: Tensor
    forward: _Responses
    accuracy: float


def sample_batch(model: nn.Module, tokenizer, task, cfg: TrainConfig, prompts: int, samples: int, seed: int
                 ) -> SubsetBatch:
    """Sample ``samples`` responses for ``prompts`` task prompts, score them, GRPO advantages per row."""
    problems = task.train_batch(prompts, random.Random(seed))
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [p.prompt for p in problems], torch.device("cpu"))
    gens = [torch.Generator().manual_seed(seed * 1000 + i) for i in range(prompts)]
    model.eval()
    roll = generate(model, tokenizer, prompt_ids, prompt_mask, samples, cfg.max_new_tokens, cfg.temperature,
                    cfg.top_p, gens, task.stop_at_newline)
    roll = pad_rollout(roll, roll.tokens.shape[1], tokenizer.pad_token_id)
    correct = torch.tensor([task.score(problems[i // samples], t) for i, t in enumerate(roll.texts)])
    rewards = torch.where(correct, cfg.reward_correct, cfg.reward_wrong).float().reshape(prompts, samples)
    adv, _ = compute_advantages(rewards, "grpo")
    fwd = _Responses(model, prompt_ids, prompt_mask, roll.prompt_index, roll.tokens, cfg.temperature)
    return SubsetBatch(roll.tokens, roll.mask, adv.reshape(-1).double(), fwd, float(correct.float().mean()))


def _logits_fn(batch: SubsetBatch, names: list[str]):
    def fn(params: tuple[Tensor, ...]) -> Tensor:
        return torch.func.functional_call(batch.forward, {f"model.{n}": p for n, p in zip(names, params)}, ())
    return fn


def _mean_entropy(batch: SubsetBatch) -> float:
    with torch.no_grad():
        return float(masked_mean_entropy(batch.forward().double(), batch.mask))


def _step(model: nn.Module, opt: torch.optim.Optimizer, batch: SubsetBatch, accept: Tensor, normalizer: float
          ) -> None:
    """One optimiser step on ``-(1/N) sum_{accepted rows} A log pi`` (rejected rows: advantage 0)."""
    opt.zero_grad(set_to_none=True)
    logits = batch.forward()
    logp = torch.log_softmax(logits, -1).gather(-1, batch.tokens.unsqueeze(-1)).squeeze(-1)
    adv = torch.where(accept, batch.advantages, torch.zeros_like(batch.advantages)).float()
    loss = -(adv[:, None] * torch.where(batch.mask, logp, torch.zeros_like(logp))).sum() / normalizer
    loss.backward()
    opt.step()


def _fit(predicted: list[float], measured: list[float]) -> dict[str, float]:
    p, m = np.asarray(predicted, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    if p.size < 3 or np.std(p) == 0 or np.std(m) == 0:
        return {"r": math.nan, "slope": math.nan, "n": int(p.size)}
    slope = float(np.polyfit(p, m, 1)[0])
    return {"r": float(np.corrcoef(p, m)[0, 1]), "slope": slope, "n": int(p.size)}


def _accept_masks(rows: int, advantages: Tensor, count: int, seed: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    out: list[Tensor] = []
    while len(out) < count:
        accept = torch.rand(rows, generator=g) < ACCEPT
        if bool((advantages[accept] != 0).any()):
            out.append(accept)
    return out


def run_optimizer(model: nn.Module, tokenizer, task, cfg: TrainConfig, kind: str, lr: float, batch: SubsetBatch,
                  subsets: int, warmup: int, seed: int, prompts: int, samples: int, method: str = "jvp") -> dict:
    """The subset experiment for one optimiser, from a copy of ``model``'s current weights."""
    model = copy.deepcopy(model)
    batch = SubsetBatch(batch.tokens, batch.mask, batch.advantages,
                        _Responses(model, *batch.forward.inputs, batch.forward.temperature), batch.accuracy)
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    if kind == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        for k in range(warmup):  # other batches of the same task, every row accepted
            warm = sample_batch(model, tokenizer, task, cfg, prompts, samples, seed + 101 + k)
            _step(model, opt, warm, torch.ones(warm.tokens.shape[0], dtype=torch.bool), float(warm.mask.sum()))
    model.eval()
    n_tok = float(batch.mask.sum())
    t0 = time.perf_counter()
    fn = _logits_fn(batch, names)
    pre = preconditioner_from_optimizer(opt, params)
    par = param_space_contributions(fn, params, batch.tokens, batch.advantages, pre, batch.mask, n_tok,
                                    method=method)
    t_param = time.perf_counter() - t0
    par_lin = par
    if kind == "adamw":
        # Adam's step linearised about the expected gradient of a selection: each row is kept with
        # probability ACCEPT, so E[g] = ACCEPT * (the whole batch's gradient) (eq. 5.2b)
        g_all = policy_loss_gradient(fn, params, batch.tokens, batch.advantages, batch.mask, n_tok)
        pre_lin = preconditioner_from_optimizer(opt, params, grads=[ACCEPT * g for g in g_all])
        par_lin = param_space_contributions(fn, params, batch.tokens, batch.advantages, pre_lin, batch.mask, n_tok,
                                            method=method)
    with torch.no_grad():
        stats = token_entropy_stats(batch.forward(), batch.tokens, batch.mask)
    c_logit = token_entropy_contributions(stats, batch.advantages.float(), batch.mask)
    h0 = _mean_entropy(batch)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    rows = []
    print(f"{kind}: contributions in {t_param:.1f} s; {subsets} subsets ...", file=sys.stderr, flush=True)
    for accept in _accept_masks(batch.tokens.shape[0], batch.advantages, subsets, seed + 7):
        model.load_state_dict(saved_model)
        opt.load_state_dict(copy.deepcopy(saved_opt))  # load_state_dict keeps the tensors: Adam would mutate them
        before = [p.detach().clone() for p in params]
        _step(model, opt, batch, accept, n_tok)
        measured = _mean_entropy(batch) - h0
        delta = [p.detach() - b for p, b in zip(params, before)]
        keep = accept[:, None] & batch.mask
        rows.append({
            "accepted_rows": int(accept.sum()),
            "measured": measured,
            "param": float(par.drift + par.contributions[keep].sum()),
            "param_linearized": float(par_lin.drift + par_lin.contributions[keep].sum()),
            "logit": float(lr * token_mean_entropy_change(torch.where(keep, c_logit, 0.0), batch.mask, n_tok)),
            "exact_first_order": float(first_order_entropy_change(par.entropy_grad, delta)),
        })
    model.load_state_dict(saved_model)
    measured = [r["measured"] for r in rows]
    return {
        "optimizer": kind, "lr": lr, "warmup_steps": warmup if kind == "adamw" else 0, "entropy": h0,
        "drift": float(par.drift), "param_seconds": round(t_param, 3),
        "fit": {key: _fit([r[key] for r in rows], measured) for key in PREDICTIONS},
        "subsets": rows,
    }


def run(model_spec: str, out: Path, subsets: int = 30, prompts: int | None = None, samples: int | None = None,
        lr_sgd: float | None = None, lr_adamw: float | None = None, warmup: int = 10, seed: int = 0,
        method: str = "jvp") -> dict:
    """The whole experiment; returns (and writes to ``out/param_subsets.json``) the payload."""
    if model_spec not in PRESET_OF_MODEL:
        raise UserError(f"--model must be one of {sorted(PRESET_OF_MODEL)}, got {model_spec!r}")
    if subsets < 3:
        raise UserError(f"--subsets must be >= 3 (a correlation needs them), got {subsets}")
    cfg = TrainConfig(**PRESETS[PRESET_OF_MODEL[model_spec]])
    prompts = prompts or cfg.prompts_per_step
    samples = samples or cfg.samples_per_prompt
    # SGD needs a much larger lr than AdamW for a visible change (no per-parameter normalisation)
    lr_sgd = lr_sgd or (3e-3 if model_spec == "smoke" else 1e-3)
    lr_adamw = lr_adamw or (1e-4 if model_spec == "smoke" else cfg.lr)
    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(model_spec, seed=seed)
    model = model.float()
    if method == "jvp":  # forward-mode AD has no rule for the fused SDPA kernel
        model.config._attn_implementation = "eager"
    task = make_task(cfg, tokenizer)
    batch = sample_batch(model, tokenizer, task, cfg, prompts, samples, seed)
    if not bool((batch.advantages != 0).any()):
        raise UserError("the sampled batch carries no signal (every group all-correct or all-wrong); try --seed")
    results = [run_optimizer(model, tokenizer, task, cfg, kind, lr, batch, subsets, warmup, seed, prompts, samples,
                             method) for kind, lr in (("sgd", lr_sgd), ("adamw", lr_adamw))]
    payload = {
        "experiment": "param-subsets", "model": model_spec, "method": method, "preset": PRESET_OF_MODEL[model_spec],
        "seed": seed,
        "prompts": prompts, "samples_per_prompt": samples, "max_new_tokens": cfg.max_new_tokens,
        "response_tokens": int(batch.mask.sum()), "rows": int(batch.tokens.shape[0]),
        "batch_accuracy": batch.accuracy, "results": results,
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "param_subsets.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "param_subsets.md").write_text(table(payload))
    return payload


def table(payload: dict) -> str:
    """Markdown table of a payload: r and slope of measured on predicted per optimiser and predictor."""
    head = ("| optimiser (lr) | predictor | r | slope (measured / predicted) |\n"
            "|---|---|---|---|\n")
    lines = []
    for res in payload["results"]:
        label = f"{'SGD' if res['optimizer'] == 'sgd' else 'AdamW'} ({res['lr']:g})"
        for key, name in PREDICTIONS.items():
            if res["optimizer"] == "sgd" and key == "param_linearized":
                continue  # SGD has no second moment: the same as "param"
            fit = res["fit"][key]
            lines.append(f"| {label} | {name} | {fit['r']:.4f} | {fit['slope']:.4g} |")
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm.param_subsets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smoke", choices=sorted(PRESET_OF_MODEL))
    parser.add_argument("--out", type=Path, default=Path("runs/param_subsets"))
    parser.add_argument("--subsets", type=int, default=30)
    parser.add_argument("--prompts", type=int, default=None, help="default: the preset's prompts_per_step")
    parser.add_argument("--samples", type=int, default=None, help="default: the preset's samples_per_prompt")
    parser.add_argument("--lr-sgd", type=float, default=None)
    parser.add_argument("--lr-adamw", type=float, default=None)
    parser.add_argument("--warmup", type=int, default=10, help="AdamW steps on other batches before the subsets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", default="jvp", choices=["jvp", "fd"],
                        help="directional derivative: jvp (exact; the model runs with eager attention) or fd")
    args = parser.parse_args(argv)
    try:
        payload = run(args.model, args.out, args.subsets, args.prompts, args.samples, args.lr_sgd, args.lr_adamw,
                      args.warmup, args.seed, args.method)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table(payload), end="")
    print(f"-> {args.out / 'param_subsets.json'} ({payload['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
