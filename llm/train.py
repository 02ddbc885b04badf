"""GRPO training of a causal LM with the entropy predictor and the Entrocraft sampler.

    python -m llm.train                       # cpu-demo: the embedded SmolLM2-135M on few-shot addition
    python -m llm.train --preset smoke        # tiny random model, seconds
    python -m llm.train --method vanilla --steps 100 --output-dir runs/vanilla
    python -m llm.train --resume runs/cpu-demo

One step (reads top to bottom in :meth:`Trainer.train_step`):

1. sample ``G`` responses for each of ``P`` prompts (KV-cached, the prompt run once per group),
   collecting per-token statistics (log-prob, entropy, pg baseline) from the sampling logits;
2. rewards -> advantages (``entrotheory.advantages``) -> per-token contributions to the entropy
   change (``entrotheory.token_entropy_contributions``) -> ``method.prepare`` over the WHOLE batch
   (rejection sampling, covariance selections, ...);
3. ``ppo_epochs`` optimiser steps, each accumulating the method's token loss over micro-batches,
   normalised by the token count of the whole batch;
4. theory against practice: the predicted change (per-position, logit space, ``lr * mean c_t``),
   the measured change (entropy of the updated policy on the same contexts, one no-grad forward),
   fed back to the method (``method.observe``) for calibration.

Metrics go to ``metrics.jsonl`` (one line per step), checkpoints to ``checkpoint/`` (safetensors
weights, optimizer, scheduler, method/sampler state, RNG), the figure to ``figure.png``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import random
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

import torch

from entrotheory import entropy as policy_entropy
from entrotheory import token_entropy_contributions, token_entropy_stats, token_mean_entropy_change
from entrotheory.advantages import ESTIMATORS, compute_advantages
from entrotheory.core import all_finite
from entrotheory.methods import METHODS, make_method, masked_token_mean, ppo_clipped

from .config import TrainConfig, build_parser, config_from_args, method_options, save_yaml
from .errors import UserError
from .models import load_model_and_tokenizer
from .rollout import encode_prompts, generate, response_log_probs, response_logits
from .tasks import Problem, make_task, pass_at_k

__all__ = ["Trainer", "main", "derive_seed", "summarize"]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from the run seed and a purpose/step: every step's randomness is a pure function
    of (seed, step), which makes ``--resume`` reproduce an uninterrupted run exactly."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    n = int(mask.sum())
    return float(torch.where(mask, x, torch.zeros_like(x)).sum()) / n if n else 0.0


def build_method(cfg: TrainConfig):
    """``make_method`` with the run's schedule, horizon, rule, learning rate and ``method_options``."""
    if cfg.method not in METHODS:
        raise UserError(f"unknown method {cfg.method!r}; expected one of {', '.join(METHODS)}")
    if cfg.estimator not in ESTIMATORS:
        raise UserError(f"unknown estimator {cfg.estimator!r}; expected one of {', '.join(ESTIMATORS)}")
    opts: dict[str, object] = {"total_steps": cfg.steps, "rule": cfg.rule, "lr": cfg.lr}
    accepts_schedule = "schedule" in METHODS[cfg.method].OPTIONS
    if cfg.schedule:
        if not accepts_schedule:
            raise UserError(f"method {cfg.method!r} takes no --schedule (got {cfg.schedule!r}); methods that do: "
                            + ", ".join(n for n, c in METHODS.items() if "schedule" in c.OPTIONS))
        opts["schedule"] = cfg.schedule
    if cfg.calibration_prior > 0 and "k_scale" in METHODS[cfg.method].OPTIONS:
        opts["k_scale"] = cfg.calibration_prior
    opts.update(method_options(cfg))
    if cfg.method == "kl-cov" and cfg.ppo_epochs == 1:
        print("warning: kl-cov's penalty |log pi - log pi_old| has zero gradient on the first, on-policy epoch; "
              "with --ppo-epochs 1 it changes nothing but the clipping (use --ppo-epochs 2 or more)", file=sys.stderr)
    try:
        return make_method(cfg.method, **opts)
    except (TypeError, ValueError) as exc:
        what = f"--schedule {cfg.schedule!r}" if cfg.schedule else f"--method {cfg.method!r}"
        raise UserError(f"{what}: {exc}") from None


class _StopFlag:
    """First Ctrl-C: finish the current step, checkpoint, exit. Second Ctrl-C: interrupt at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old = None

    def __enter__(self) -> _StopFlag:
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: finishing this step, then writing a checkpoint (Ctrl-C again to abort)",
              file=sys.stderr)

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


class Trainer:
    """Holds the model, optimiser, method and task of one run; :meth:`train_step` is one GRPO step."""

    def __init__(self, cfg: TrainConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            try:
                self.device = torch.device(cfg.device)
            except RuntimeError:
                raise UserError(f"device {cfg.device!r} is not a torch device (use auto, cpu, cuda or cuda:N)") \
                    from None
            if self.device.type == "cuda" and not torch.cuda.is_available():
                raise UserError(f"device {cfg.device!r} requested but CUDA is not available")
        self.method = build_method(cfg)
        self.model, self.tokenizer = load_model_and_tokenizer(cfg.model, cfg.seed)
        self.model.to(self.device)
        self.task = make_task(cfg, self.tokenizer)
        for w in getattr(self.task, "warnings", [])[:20]:
            print(f"warning: {w}", file=sys.stderr)
        self.ref_model = None
        if cfg.kl_coef > 0:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                               weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            raise UserError(f"optimizer must be adamw or sgd, got {cfg.optimizer!r}")
        warm = cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        self.params = params
        self.nan_streak = 0
        self.eval_problems = self.task.eval_set(cfg.eval_prompts) if cfg.eval_prompts else []

    # ------------------------------------------------------------------ helpers
    def autocast(self):
        if self.device.type == "cuda" and self.cfg.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _generator(self, *parts: object) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(derive_seed(self.cfg.seed, *parts))

    def _rollout(self, problems: list[Problem], samples: int, temperature: float, gen: torch.Generator):
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, [p.prompt for p in problems], self.device)
        self.model.eval()
        roll = generate(self.model, self.tokenizer, prompt_ids, prompt_mask, samples, self.cfg.max_new_tokens,
                        temperature, self.cfg.top_p, gen, self.task.stop_at_newline, autocast=self.autocast)
        return prompt_ids, prompt_mask, roll

    def _logits(self, model, prompt_ids, prompt_mask, roll, rows: slice) -> torch.Tensor:
        with self.autocast():
            logits = response_logits(model, prompt_ids, prompt_mask, roll.prompt_index[rows], roll.tokens[rows],
                                     self.cfg.share_prompt_prefix)
        return logits.float() / self.cfg.temperature

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """pass@1 and pass@k (unbiased) on the held-out split, at ``eval_temperature``."""
        cfg = self.cfg
        if not self.eval_problems:
            return {}
        t0 = time.perf_counter()
        gen = self._generator("eval", step)
        n, k = cfg.eval_samples, cfg.pass_k
        p1, pk, distinct, ent, ntok = [], [], [], 0.0, 0
        chunk = max(1, cfg.prompts_per_step * cfg.samples_per_prompt // n)
        for i in range(0, len(self.eval_problems), chunk):
            probs = self.eval_problems[i:i + chunk]
            _, _, roll = self._rollout(probs, n, cfg.eval_temperature, gen)
            ent += float(torch.where(roll.mask, roll.stats.entropy, 0.0).sum())
            ntok += int(roll.mask.sum())
            for j, prob in enumerate(probs):
                texts = roll.texts[j * n:(j + 1) * n]
                ok = [self.task.score(prob, t) for t in texts]
                c = sum(ok)
                p1.append(c / n)
                pk.append(pass_at_k(n, c, k))
                distinct.append(len({self.task.answer_key(t) for t, o in zip(texts, ok) if o}))
        return {"pass_at_1": sum(p1) / len(p1), "pass_at_k": sum(pk) / len(pk), "pass_k": float(k),
                "eval_distinct_correct": sum(distinct) / len(distinct), "eval_entropy": ent / max(ntok, 1),
                "time_eval": time.perf_counter() - t0}

    # ------------------------------------------------------------------ one GRPO step
    def train_step(self, step: int, rewards_override=None) -> dict[str, float | str]:
        """One GRPO step; returns its metrics. ``rewards_override(rollout) -> [P, G]`` replaces the task's
        rewards (tests build steps that must raise or lower entropy this way)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        torch.manual_seed(derive_seed(cfg.seed, "torch", step))  # any randomness inside the method
        problems = self.task.train_batch(cfg.prompts_per_step, random.Random(derive_seed(cfg.seed, "data", step)))
        P, G = cfg.prompts_per_step, cfg.samples_per_prompt

        # 1. sample, with per-token statistics of the sampling policy
        try:
            prompt_ids, prompt_mask, roll = self._rollout(problems, G, cfg.temperature, self._generator("gen", step))
        except (ValueError, RuntimeError) as exc:  # NaN/inf logits while sampling: the weights are broken
            raise UserError(f"step {step}: sampling failed, the model produced invalid logits ({exc}); "
                            f"resume from an earlier checkpoint with a lower --lr (now {cfg.lr})") from None
        mask, stats = roll.mask, roll.stats
        t_gen = time.perf_counter() - t0

        # 2. rewards -> advantages -> contributions -> the method's plan (whole batch)
        correct = torch.tensor([self.task.score(problems[i // G], text) for i, text in enumerate(roll.texts)])
        rewards = torch.where(correct, cfg.reward_correct, cfg.reward_wrong).reshape(P, G).float()
        if rewards_override is not None:
            rewards = rewards_override(roll).reshape(P, G).float().cpu()
        adv, adv_info = compute_advantages(rewards, cfg.estimator)
        adv_tok = torch.where(mask, adv.reshape(-1, 1).to(self.device).expand_as(mask), 0.0)
        n_tok = int(mask.sum())
        entropy = masked_mean(stats.entropy, mask)
        contrib = token_entropy_contributions(stats, adv_tok, mask, rule=cfg.rule)
        plan = self.method.prepare(advantages=adv_tok, log_probs=stats.log_prob, old_log_probs=stats.log_prob,
                                   mask=mask, entropy=entropy, step=step, contributions=contrib,
                                   rewards=rewards.reshape(-1).to(self.device))
        diag = plan.diagnostics
        groups_correct = correct.reshape(P, G)
        distinct = [len({self.task.answer_key(roll.texts[p * G + g]) for g in range(G) if groups_correct[p, g]})
                    for p in range(P)]
        row: dict[str, float | str] = {
            "step": step,
            "entropy": entropy,
            "reward_mean": float(rewards.mean()),
            "accuracy": float(correct.float().mean()),
            "signal_fraction": 1.0 - float(adv_info["zero_signal_groups"]) / P,
            "distinct_correct": sum(distinct) / P,
            "response_length": n_tok / (P * G),
            "accepted_fraction": float(diag.get("accepted_fraction", 1.0)),
            "accepted_pos_fraction": float(diag.get("accepted_pos_fraction", 1.0)),
            "accepted_neg_fraction": float(diag.get("accepted_neg_fraction", 1.0)),
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        renamed = {"k": "calibration_k", "predicted_change": "calibrated_predicted_change"}
        for key in ("target_entropy", "lower", "upper", "regime", "k", "predicted_change", "entropy_coef", "alpha"):
            if key in diag:
                row[renamed.get(key, key)] = diag[key]
        lr_now = self.optimizer.param_groups[0]["lr"]
        if "calibration_k" in row:
            row["calibration_factor"] = float(row["calibration_k"]) / lr_now
        # per-position (logit-space) prediction of the token-mean entropy change for the advantages actually
        # trained on, under the token-mean loss with the whole batch's normaliser (docs/theory.md eq. 3.3)
        c_plan = token_entropy_contributions(stats, plan.advantages, mask, rule=cfg.rule)
        row["predicted_entropy_change"] = lr_now * float(token_mean_entropy_change(c_plan, mask, n_tok))
        if plan.skip:
            row.update(skipped="all_rejected" if diag.get("all_rejected") else "no_signal",
                       measured_entropy_change=0.0, predicted_entropy_change=0.0,
                       time_generate=t_gen, time_step=time.perf_counter() - t0,
                       tokens_per_s=n_tok / (time.perf_counter() - t0))
            self._scheduler_step()
            return row

        # 3. optimiser steps over micro-batches, normalised by the whole batch's token count
        t1 = time.perf_counter()
        B, T = mask.shape
        old_lp = torch.zeros(B, T, device=self.device)
        h_before = torch.zeros(B, T, device=self.device)
        mb = cfg.micro_batch_size
        loss_sum, clipped, kl_ref, nan = 0.0, 0.0, 0.0, False
        grad_norm = 0.0
        if cfg.exact_first_order:  # <dH/dtheta, theta_after - theta_before>, the parameter-space prediction
            theta0 = [p.detach().clone() for p in self.params]
            grad_h = [torch.zeros_like(p) for p in self.params]
        self.model.eval()  # dropout off: old log-probs, the update and the measured change see one policy
        for epoch in range(cfg.ppo_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            for start in range(0, B, mb):
                rows = slice(start, start + mb)
                logits = self._logits(self.model, prompt_ids, prompt_mask, roll, rows)
                if not all_finite(logits):  # skipped and reported like a NaN loss
                    nan = True
                    break
                lp = response_log_probs(logits, roll.tokens[rows])
                if epoch == 0:  # the pre-update policy on these contexts: old log-probs and entropy
                    old_lp[rows] = lp.detach()
                    h_before[rows] = token_entropy_stats(logits, roll.tokens[rows], mask[rows]).entropy
                tok_ent = None
                if self.method.needs_token_entropy or (cfg.exact_first_order and epoch == 0):
                    tok_ent = policy_entropy(logits)  # differentiable: the bonus and <dH/dtheta, .> need it
                if cfg.exact_first_order and epoch == 0:
                    h_mb = masked_token_mean(tok_ent, mask[rows], n_tok)
                    for acc, g in zip(grad_h, torch.autograd.grad(h_mb, self.params, retain_graph=True,
                                                                  allow_unused=True)):
                        if g is not None:
                            acc += g
                loss_tok = self.method.token_loss(plan.rows(rows), lp, old_lp[rows], mask[rows], token_entropy=tok_ent)
                if self.ref_model is not None:
                    with torch.no_grad():
                        ref_lp = response_log_probs(self._logits(self.ref_model, prompt_ids, prompt_mask, roll, rows),
                                                    roll.tokens[rows])
                    d = ref_lp - lp
                    kl_tok = torch.exp(d) - d - 1.0  # k3 estimator of KL(pi || pi_ref)
                    loss_tok = loss_tok + cfg.kl_coef * kl_tok
                    kl_ref += float(torch.where(mask[rows], kl_tok.detach(), 0.0).sum()) / n_tok / cfg.ppo_epochs
                loss = masked_token_mean(loss_tok, mask[rows], n_tok)
                if not torch.isfinite(loss):
                    nan = True
                    break
                loss.backward()
                loss_sum += float(loss.detach()) / cfg.ppo_epochs
                clip = ppo_clipped(lp.detach(), old_lp[rows], plan.advantages[rows], plan.eps_low, plan.eps_high)
                clipped += float((clip & mask[rows]).sum()) / n_tok / cfg.ppo_epochs
            if not nan:
                limit = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, limit))
                nan = not math.isfinite(grad_norm)
            if nan:
                self.optimizer.zero_grad(set_to_none=True)
                break
            self.optimizer.step()
        self._scheduler_step()
        t_upd = time.perf_counter() - t1
        row.update(loss=loss_sum, clip_fraction=clipped, grad_norm=grad_norm, time_generate=t_gen, time_update=t_upd)
        if self.ref_model is not None:
            row["kl_ref"] = kl_ref
        if cfg.exact_first_order and not nan:
            row["exact_predicted_entropy_change"] = float(sum(
                (g * (p.detach() - p0)).sum() for g, p, p0 in zip(grad_h, self.params, theta0)))
            del theta0, grad_h
        if nan:
            self.nan_streak += 1
            row.update(skipped="nan_loss", measured_entropy_change=0.0, nan_streak=self.nan_streak)
            row.update(time_step=time.perf_counter() - t0, tokens_per_s=n_tok / (time.perf_counter() - t0))
            return row
        self.nan_streak = 0

        # 4. theory against practice: entropy of the updated policy on the same contexts
        if cfg.measure_entropy_change:
            t2 = time.perf_counter()
            h_after = torch.zeros(B, T, device=self.device)
            new_lp = torch.zeros(B, T, device=self.device)
            self.model.eval()
            with torch.no_grad():
                for start in range(0, B, mb):
                    rows = slice(start, start + mb)
                    logits = self._logits(self.model, prompt_ids, prompt_mask, roll, rows)
                    st = token_entropy_stats(logits, roll.tokens[rows], mask[rows])
                    h_after[rows], new_lp[rows] = st.entropy, st.log_prob
            measured = masked_mean(h_after, mask) - masked_mean(h_before, mask)
            log_ratio = new_lp - old_lp
            row["kl_old_new"] = masked_mean(torch.exp(log_ratio) - 1.0 - log_ratio, mask)
            row["measured_entropy_change"] = measured
            pred = float(row["predicted_entropy_change"])
            row["measured_over_predicted"] = measured / pred if pred != 0 else float("nan")
            self.method.observe(measured)
            row["time_measure"] = time.perf_counter() - t2
        elapsed = time.perf_counter() - t0
        row.update(time_step=elapsed, tokens_per_s=n_tok / elapsed)
        return row

    def _scheduler_step(self) -> None:
        """One learning-rate schedule step per training step, also for skipped steps."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "scheduler.step() before optimizer.step()"
            self.scheduler.step()

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, next_step: int) -> Path:
        """Atomically write ``checkpoint/`` (safetensors weights + optimizer/scheduler + method + RNG)."""
        from safetensors.torch import save_model

        final = self.run_dir / "checkpoint"
        tmp = self.run_dir / "checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(self.model, str(tmp / "model.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   tmp / "optimizer.pt")
        state = {"next_step": next_step, "method": self.method.state_dict(), "nan_streak": self.nan_streak,
                 "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        torch.save(state, tmp / "trainer_state.pt")
        save_yaml(self.cfg, tmp / "config.yaml")
        old = self.run_dir / "checkpoint.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, ckpt: Path) -> int:
        """Restore everything :meth:`save_checkpoint` wrote; returns the step to continue from."""
        from safetensors.torch import load_model

        try:
            load_model(self.model, str(ckpt / "model.safetensors"), device=str(self.device))
            opt = torch.load(ckpt / "optimizer.pt", map_location=self.device, weights_only=True)
            state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, KeyError) as exc:
            raise UserError(f"checkpoint {str(ckpt)!r} is unreadable or belongs to another model: "
                            f"{str(exc).splitlines()[0]}") from None
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        try:
            self.method.load_state_dict(state["method"])
        except (ValueError, KeyError) as exc:
            raise UserError(f"checkpoint {str(ckpt)!r} holds state for another method: {exc}") from None
        self.nan_streak = int(state["nan_streak"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        return int(state["next_step"])


# ---------------------------------------------------------------------- summary and I/O
def _fit(rows: list[dict], key: str, suffix: str, out: dict[str, float]) -> None:
    """Pearson correlation, slope through the origin and sign agreement of measured vs ``key``."""
    pairs = [(float(r[key]), float(r["measured_entropy_change"])) for r in rows
             if isinstance(r.get("measured_entropy_change"), (int, float)) and not r.get("skipped")
             and isinstance(r.get(key), (int, float))]
    if suffix == "":
        out["steps_measured"] = float(len(pairs))
    if len(pairs) < 3:
        return
    p = torch.tensor([a for a, _ in pairs], dtype=torch.float64)
    m = torch.tensor([b for _, b in pairs], dtype=torch.float64)
    if float(p.std()) > 0 and float(m.std()) > 0:
        out["correlation" + suffix] = float(torch.corrcoef(torch.stack([p, m]))[0, 1])
    if float((p * p).sum()) > 0:
        out["slope" + suffix] = float((p * m).sum() / (p * p).sum())
    nz = (p != 0) & (m != 0)
    if bool(nz.any()):
        out["sign_agreement" + suffix] = float(((p[nz] > 0) == (m[nz] > 0)).double().mean())


def summarize(rows: list[dict]) -> dict[str, float]:
    """Correlation and slope (through the origin) of measured vs predicted entropy change, plus start/end."""
    out: dict[str, float] = {}
    _fit(rows, "predicted_entropy_change", "", out)
    _fit(rows, "exact_predicted_entropy_change", "_exact", out)
    train = [r for r in rows if "entropy" in r]
    if train:
        head, tail = train[: max(1, len(train) // 10)], train[-max(1, len(train) // 10):]
        out.update(entropy_start=sum(r["entropy"] for r in head) / len(head),
                   entropy_end=sum(r["entropy"] for r in tail) / len(tail),
                   reward_start=sum(r["reward_mean"] for r in head) / len(head),
                   reward_end=sum(r["reward_mean"] for r in tail) / len(tail),
                   signal_fraction=sum(r["signal_fraction"] for r in train) / len(train),
                   seconds_per_step=sum(r.get("time_step", 0.0) for r in train) / len(train))
    evals = [r for r in rows if "pass_at_1" in r]
    if evals:
        out.update(pass_at_1_start=evals[0]["pass_at_1"], pass_at_k_start=evals[0]["pass_at_k"],
                   pass_at_1_end=evals[-1]["pass_at_1"], pass_at_k_end=evals[-1]["pass_at_k"])
    ks = [r["calibration_factor"] for r in rows if "calibration_factor" in r]
    if ks:
        out["calibration_factor_end"] = ks[-1]
    return out


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _json_safe(row: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


class _Scalars:
    """TensorBoard scalars when tensorboard is installed; otherwise nothing."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.writer = None
        if enabled:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                self.writer = None

    def write(self, row: dict) -> None:
        if self.writer is None:
            return
        for k, v in row.items():
            if isinstance(v, (int, float)) and k != "step" and math.isfinite(float(v)):
                self.writer.add_scalar(k, v, int(row["step"]))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _resolve_resume(path: str) -> tuple[Path, Path]:
    """``--resume DIR``: DIR is a run directory holding ``checkpoint/`` or the checkpoint itself."""
    p = Path(path).expanduser()
    if (p / "checkpoint" / "model.safetensors").exists():
        return p, p / "checkpoint"
    if (p / "model.safetensors").exists():
        return p.parent, p
    raise UserError(f"--resume {path!r}: no checkpoint there (expected {p}/checkpoint/model.safetensors)")


def _progress(cfg: TrainConfig, start: int):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=start, desc=f"{cfg.method}", unit="step", dynamic_ncols=True)


def run(argv: list[str] | None = None) -> dict[str, float]:
    """Parse the command line, train, evaluate, plot; returns the end-of-run summary."""
    args = build_parser().parse_args(argv)
    if args.resume:
        run_dir, ckpt = _resolve_resume(args.resume)
        import yaml

        base = yaml.safe_load((ckpt / "config.yaml").read_text())
        cfg = config_from_args(args, base=base)
        cfg.output_dir = str(run_dir)
        if args.stop_after is None:  # an interruption request does not carry over
            cfg.stop_after = 0
    else:
        cfg = config_from_args(args)
        run_dir = Path(cfg.output_dir).expanduser()
        if (run_dir / "checkpoint").exists() or (run_dir / "metrics.jsonl").exists():
            raise UserError(f"output directory {str(run_dir)!r} already holds a run; continue it with --resume "
                            f"{run_dir} or choose another --output-dir")
        ckpt = None
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, run_dir)
    start = trainer.load_checkpoint(ckpt) if ckpt is not None else 0
    save_yaml(cfg, run_dir / "config.yaml")
    metrics_path = run_dir / "metrics.jsonl"
    rows = [r for r in _read_rows(metrics_path) if r["step"] < start]  # drop anything after the checkpoint
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scalars = _Scalars(run_dir, cfg.tensorboard)
    bar = _progress(cfg, start)
    step = start
    done_here = 0
    finished = start >= cfg.steps
    try:
        with _StopFlag() as stop, metrics_path.open("a") as out:
            for step in range(start, cfg.steps):
                row: dict = {}
                if step == 0 or (cfg.eval_every and step % cfg.eval_every == 0):
                    row.update(trainer.evaluate(step))
                row = {**trainer.train_step(step), **row}
                rows.append(_json_safe(row))
                out.write(json.dumps(rows[-1]) + "\n")
                out.flush()
                scalars.write(rows[-1])
                done_here += 1
                if bar is not None:
                    post = {"R": f"{row['reward_mean']:+.2f}", "H": f"{row['entropy']:.3f}",
                            "acc": f"{row['accepted_fraction']:.2f}"}
                    if "target_entropy" in row:
                        post["tgt"] = f"{float(row['target_entropy']):.3f}"
                    if "pass_at_1" in row:
                        post["p@1"] = f"{row['pass_at_1']:.2f}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                if row.get("skipped") == "nan_loss" and trainer.nan_streak >= cfg.max_nan_steps:
                    trainer.save_checkpoint(step + 1)
                    raise UserError(f"loss was NaN/inf on {trainer.nan_streak} consecutive steps (last: step {step}); "
                                    f"stopped with a checkpoint in {run_dir / 'checkpoint'}; try a lower --lr "
                                    f"(now {cfg.lr})")
                if row.get("skipped") == "nan_loss":
                    print(f"warning: step {step}: NaN/inf loss, update skipped", file=sys.stderr)
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                    trainer.save_checkpoint(step + 1)
                if cfg.plot and cfg.plot_every and (step + 1) % cfg.plot_every == 0:
                    _plot(rows, run_dir, cfg)
                finished = step + 1 == cfg.steps
                if stop.requested or (cfg.stop_after and done_here >= cfg.stop_after):
                    break
            if finished:
                final = {"step": cfg.steps, "final": True, **trainer.evaluate(cfg.steps)}
                rows.append(_json_safe(final))
                out.write(json.dumps(rows[-1]) + "\n")
                scalars.write(rows[-1])
                trainer.save_checkpoint(cfg.steps)
            else:
                trainer.save_checkpoint(step + 1)
                print(f"stopped after step {step}; checkpoint in {run_dir / 'checkpoint'} "
                      f"(continue with --resume {run_dir})", file=sys.stderr)
    finally:
        if bar is not None:
            bar.close()
        scalars.close()
    summary = summarize(rows)
    (run_dir / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2) + "\n")
    if cfg.plot:
        _plot(rows, run_dir, cfg)
    return summary


def _plot(rows: list[dict], run_dir: Path, cfg: TrainConfig) -> None:
    from .plotting import plot_runs

    plot_runs({cfg.method: rows}, run_dir / "figure.png")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    try:
        summary = run(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    keys = ("entropy_start", "entropy_end", "reward_start", "reward_end", "pass_at_1_end", "pass_at_k_end",
            "correlation", "slope", "calibration_factor_end", "signal_fraction", "seconds_per_step")
    print(" ".join(f"{k}={summary[k]:.4g}" for k in keys if k in summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
