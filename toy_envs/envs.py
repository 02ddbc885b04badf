"""Toy environments with verifiable rewards: a K-armed bandit and an autoregressive token task.

An environment is a pair ``(policy, task)``: the policy (:mod:`toy_envs.policies`) holds the
trainable logits, the task holds what is correct and scores responses. Both are batched over
``S`` seeds and ``P`` prompts; every seed is an independent replicate (its own prompts,
correct answers and initial policy).

Reward regimes (how the correct answers relate to the *initial* policy):

* ``"correlated"`` — the pretrained-model picture: a few likely *wrong* answers on top, then
  correct answers of decreasing prior probability (ranks spread geometrically below the wrong
  ones), the rest a long tail of wrong answers.
* ``"uncorrelated"`` — correct answers drawn uniformly at random.
* ``"anti"`` — correct answers are the least likely ones.

Rewards are +1 (correct) / -1 (incorrect), as in the paper's math setup, so the raw-reward
estimators and the released band rule see the same numbers as there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .policies import (
    NeuralTokenPolicy,
    TabularBanditPolicy,
    TabularTokenPolicy,
    TokenPolicy,
    row_blocks,
    zipf_logits,
)

__all__ = [
    "REGIMES",
    "BanditConfig",
    "TokenConfig",
    "BanditTask",
    "SequenceTask",
    "make_bandit",
    "make_token_env",
    "correct_ranks",
    "exact_sampling_metrics",
    "expected_distinct",
]

REGIMES = ("correlated", "uncorrelated", "anti")


def correct_ranks(n_correct: int, n_wrong: int, n_actions: int, regime: str) -> list[int] | None:
    """Prior ranks (0 = likeliest) of the correct answers for a regime (``None``: random)."""
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; expected one of {REGIMES}")
    if not 1 <= n_correct < n_actions:
        raise ValueError(f"need 1 <= n_correct < {n_actions}, got {n_correct}")
    if regime == "uncorrelated":
        return None
    if regime == "anti":
        return list(range(n_actions - n_correct, n_actions))
    start = min(max(n_wrong, 0), n_actions - n_correct)
    hi = min(n_actions - 1, max(start + n_correct - 1, 8 * max(start, 1)))
    raw = np.round(np.geomspace(start + 1, hi + 1, n_correct) - 1).astype(int)
    ranks = [start]
    for r in raw[1:]:  # strictly increasing despite rounding collisions
        ranks.append(max(int(r), ranks[-1] + 1))
    return [int(r) for r in ranks]


# ============================================================================ tasks
def exact_sampling_metrics(p_correct: Tensor, answer_probs: Tensor, ks: tuple[int, ...], n_eval: int
                           ) -> dict[str, Tensor]:
    """Exact expected metrics of fresh sampling, per seed ``[S]`` (mean over prompts).

    ``p_correct`` ``[S, P]``: probability that one sample is correct; ``answer_probs`` ``[S, P, X]``:
    probability of each distinct correct answer (0 for the others). ``pass@k = 1 - (1 - p)^k``;
    ``distinct = sum_x 1 - (1 - pi_x)^n_eval``, the expected number of distinct correct answers among
    ``n_eval`` samples.
    """
    return _metrics(p_correct, expected_distinct(answer_probs, n_eval), ks)


def expected_distinct(answer_probs: Tensor, n_eval: int) -> Tensor:
    """``sum_x 1 - (1 - pi_x)^n_eval`` over the last dimension: ``[..., X] -> [...]``."""
    return (1.0 - (1.0 - answer_probs) ** n_eval).sum(-1)


def _metrics(p_correct: Tensor, distinct: Tensor, ks: tuple[int, ...]) -> dict[str, Tensor]:
    """pass@k from ``p_correct`` ``[S, P]`` and the mean over prompts of ``distinct`` ``[S, P]``."""
    p = p_correct.clamp(0.0, 1.0)
    out = {f"pass@{k}": (1.0 - (1.0 - p) ** k).mean(-1).float() for k in ks}
    out["distinct"] = distinct.mean(-1).float()
    return out


class BanditTask:
    """Rewards of a bandit: a set of correct arms per prompt, or per-arm success rates.

    Parameters
    ----------
    correct : ``[S, P, K]`` bool, the correct arms (``"correct-set"`` rewards).
    success : optional ``[S, P, K]`` float in [0, 1]: Bernoulli success rates (``"bernoulli"``
        rewards). ``correct`` then marks the *good* arms (success >= 0.5), used for diversity.
    """

    def __init__(self, correct: Tensor, success: Tensor | None = None) -> None:
        self.correct = correct.to(torch.bool)
        self.success = success
        self.kind = "bernoulli" if success is not None else "correct-set"

    def reward(self, tokens: Tensor, generator: torch.Generator) -> Tensor:
        """+1 / -1 rewards of responses ``[S, P, n, 1]`` -> ``[S, P, n]``."""
        arms = tokens[..., 0]
        if self.success is None:
            ok = self.correct.gather(-1, arms)
        else:
            q = self.success.gather(-1, arms)
            ok = torch.rand(q.shape, generator=generator) < q
        return ok.to(torch.float32) * 2.0 - 1.0

    @torch.no_grad()
    def evaluate(self, policy: TabularBanditPolicy, ks: tuple[int, ...], n_eval: int) -> dict[str, Tensor]:
        """Exact expected metrics of fresh sampling, per seed ``[S]`` (mean over prompts).

        ``pass@k = 1 - (1 - p)^k`` with ``p`` the probability that one sample is correct (for
        Bernoulli rewards ``p = sum_a pi_a q_a``); ``distinct`` = expected number of distinct
        correct (good) arms among ``n_eval`` samples, ``sum_{a correct} 1 - (1 - pi_a)^n_eval``.
        These are the limits of held-out sampling, without its noise. Computed block by block of prompts
        (:func:`~toy_envs.policies.row_blocks`, the policy's ``chunk_elements``), as
        :func:`exact_sampling_metrics` of the whole ``[S, P, K]`` tensors would, row for row.
        """
        if not isinstance(policy, TabularBanditPolicy):  # another class: its probabilities() [S, P, K] whole
            pi = policy.probabilities().double()
            q = self.correct.double() if self.success is None else self.success.double()
            return exact_sampling_metrics((pi * q).sum(-1), pi * self.correct.double(), ks, n_eval)
        k = policy.vocab
        z = policy.logits.detach().reshape(-1, k)
        correct = self.correct.reshape(-1, k)
        rate = correct if self.success is None else self.success.reshape(-1, k)
        p_correct = torch.empty(z.shape[0], dtype=torch.float64)
        distinct = torch.empty(z.shape[0], dtype=torch.float64)
        for b in row_blocks(z.shape[0], k, policy.chunk_elements):
            pi = torch.softmax(z[b], -1).double()
            p_correct[b] = (pi * rate[b].double()).sum(-1)
            distinct[b] = expected_distinct(pi * correct[b].double(), n_eval)
        shape = (policy.n_seeds, policy.n_prompts)
        return _metrics(p_correct.reshape(shape), distinct.reshape(shape), ks)


class SequenceTask:
    """Rewards of the token task: a set of ``C`` correct sequences ``[S, P, C, L]`` per prompt."""

    kind = "correct-set"

    def __init__(self, answers: Tensor) -> None:
        self.answers = answers.to(torch.int64)

    def reward(self, tokens: Tensor, generator: torch.Generator) -> Tensor:
        """+1 if the response ``[S, P, n, L]`` equals one of the prompt's answers, else -1."""
        match = (tokens.unsqueeze(3) == self.answers.unsqueeze(2)).all(-1).any(-1)
        return match.to(torch.float32) * 2.0 - 1.0

    @torch.no_grad()
    def evaluate(self, policy: TokenPolicy, ks: tuple[int, ...], n_eval: int) -> dict[str, Tensor]:
        """Exact ``pass@k`` and expected distinct correct answers (see :meth:`BanditTask.evaluate`)."""
        pc = policy.sequence_log_prob(self.answers).double().exp()  # [S, P, C]
        return exact_sampling_metrics(pc.sum(-1), pc, ks, n_eval)


# ============================================================================ constructors
@dataclass
class BanditConfig:
    """A batch of K-armed bandits ("prompts") with peaked, pretrained-like initial logits.

    Attributes
    ----------
    n_arms : K (2 .. 10^4).
    n_prompts, n_seeds : P and S.
    n_correct : correct arms per prompt.
    n_wrong : likely wrong arms above the correct ones (``"correlated"`` regime).
    exponent : Zipf exponent of the initial policy (larger = more peaked).
    noise : std of the Gaussian jitter added to the initial logits (prompts differ).
    regime : one of :data:`REGIMES`.
    reward : ``"correct-set"`` or ``"bernoulli"`` (correct arms succeed with rate in
        [0.6, 0.95], wrong arms with rate in [0, 0.3]).
    """

    n_arms: int = 100
    n_prompts: int = 64
    n_seeds: int = 4
    n_correct: int = 4
    n_wrong: int = 2
    exponent: float = 1.5
    noise: float = 0.5
    regime: str = "correlated"
    reward: str = "correct-set"


def make_bandit(config: BanditConfig, seed: int = 0) -> tuple[TabularBanditPolicy, BanditTask]:
    """Build the initial policy and the task of a bandit configuration (seeded)."""
    c = config
    if not 2 <= c.n_arms <= 100_000:
        raise ValueError(f"n_arms must be in [2, 1e5], got {c.n_arms}")
    if c.reward not in ("correct-set", "bernoulli"):
        raise ValueError(f"reward must be 'correct-set' or 'bernoulli', got {c.reward!r}")
    g = torch.Generator().manual_seed(seed)
    shape = (c.n_seeds, c.n_prompts, c.n_arms)
    logits = zipf_logits(shape, c.exponent, g, c.noise)
    order = logits.argsort(-1, descending=True)  # arms by prior rank
    ranks = correct_ranks(c.n_correct, c.n_wrong, c.n_arms, c.regime)
    if ranks is None:
        arms = torch.rand(shape, generator=g).argsort(-1)[..., : c.n_correct]
    else:
        arms = order[..., ranks]
    correct = torch.zeros(shape, dtype=torch.bool).scatter_(-1, arms, True)
    success = None
    if c.reward == "bernoulli":
        hi = 0.6 + 0.35 * torch.rand(shape, generator=g)
        lo = 0.3 * torch.rand(shape, generator=g)
        success = torch.where(correct, hi, lo)
    return TabularBanditPolicy(logits), BanditTask(correct, success)


@dataclass
class TokenConfig:
    """An autoregressive token task: V tokens, length L, C correct sequences per prompt.

    Attributes
    ----------
    vocab, seq_len : V (8-64) and L (2-8).
    policy : ``"tabular"`` (a softmax per prefix) or ``"neural"`` (a shared MLP).
    n_correct, n_wrong, regime : as in :class:`BanditConfig`; ranks refer to the first token,
        later tokens follow the initial policy's likeliest (``"correlated"``), a random
        (``"uncorrelated"``) or its least likely token (``"anti"``).
    exponent, noise : Zipf exponent and jitter of the tabular initial logits.
    out_scale : output scale of the neural initial logits.
    """

    vocab: int = 8
    seq_len: int = 3
    n_prompts: int = 32
    n_seeds: int = 4
    policy: str = "tabular"
    n_correct: int = 3
    n_wrong: int = 1
    exponent: float = 2.0
    noise: float = 0.5
    out_scale: float = 3.0
    regime: str = "correlated"


def make_token_env(config: TokenConfig, seed: int = 0) -> tuple[TokenPolicy, SequenceTask]:
    """Build the initial token policy and the task (correct sequences chosen per regime)."""
    c = config
    g = torch.Generator().manual_seed(seed)
    policy: TokenPolicy
    if c.policy == "tabular":
        policy = TabularTokenPolicy.zipf(c.n_seeds, c.n_prompts, c.vocab, c.seq_len, c.exponent, g, c.noise)
    elif c.policy == "neural":
        policy = NeuralTokenPolicy(c.n_seeds, c.n_prompts, c.vocab, c.seq_len, g, out_scale=c.out_scale)
    else:
        raise ValueError(f"policy must be 'tabular' or 'neural', got {c.policy!r}")
    ranks = correct_ranks(c.n_correct, c.n_wrong, c.vocab, c.regime)
    if ranks is None:
        first = torch.rand(c.n_seeds, c.n_prompts, c.vocab, generator=g).argsort(-1)[..., : c.n_correct]
        rest = torch.randint(0, c.vocab, (c.n_seeds, c.n_prompts, c.n_correct, c.seq_len - 1), generator=g)
        answers = torch.cat([first.unsqueeze(-1), rest], -1)
    else:
        answers = policy.ranked_sequences(torch.tensor(ranks), 0 if c.regime == "correlated" else -1)
    return policy, SequenceTask(answers)
