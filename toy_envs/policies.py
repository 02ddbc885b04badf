"""Softmax policies of the toy environments, batched over seeds and prompts.

Every policy holds independent parameters for ``S`` seeds and ``P`` prompts (leading
dimensions of every parameter and every tensor) and produces responses of ``T`` positions
over a vocabulary of ``V`` actions. A bandit answer is one position (``T = 1``, ``V = K``).

All theory goes through :mod:`entrotheory`: the first-order per-position contributions
come from :func:`entrotheory.entropy_change_contributions` (bandit) and
:func:`entrotheory.token_entropy_stats` + :func:`entrotheory.token_entropy_contributions`
(token policies); the effect of an entropy bonus from
:func:`entrotheory.predicted_entropy_change` of :func:`entrotheory.entropy_gradient`.

Convention for contributions (the *per-position* convention of ``docs/theory.md`` §3):
``contributions(tokens, A)[..., t]`` is the first-order change, per unit learning rate, of
the entropy of the state (prompt, prefix) of position ``t`` when that state's logits move by
the single-sample update of that position alone: ``A (e_y - pi)`` (``rule="pg"``) or
``A e_y / pi_y`` (``rule="npg"``). Because the first-order change is linear in the logit
step, the change of a state visited by several positions is the sum of their contributions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from entrotheory import (
    ParamSpaceContributions,
    StepPreconditioner,
    entropy,
    entropy_change_contributions,
    entropy_gradient,
    param_space_contributions,
    predicted_entropy_change,
    token_entropy_contributions,
    token_entropy_stats,
)
from entrotheory.core import check_rule

__all__ = [
    "ToyPolicy",
    "TabularBanditPolicy",
    "TokenPolicy",
    "TabularTokenPolicy",
    "NeuralTokenPolicy",
    "zipf_logits",
]


def zipf_logits(
    shape: tuple[int, ...], exponent: float, generator: torch.Generator, noise: float = 0.0
) -> Tensor:
    """Peaked "pretrained-like" logits: ``-exponent * log(1 + rank) + noise * N(0, 1)``.

    Each row (last dimension) gets an independent random permutation of the ranks, so
    ``softmax`` is a Zipf law over the actions (a few likely actions and a long tail),
    jittered by Gaussian noise so that rows differ in how peaked they are.
    """
    ranks = torch.rand(shape, generator=generator).argsort(-1).argsort(-1).to(torch.float32)
    z = -exponent * torch.log1p(ranks)
    if noise > 0:
        z = z + noise * torch.randn(shape, generator=generator)
    return z


class ToyPolicy:
    """Interface shared by the bandit and token policies (see module docstring).

    Attributes
    ----------
    n_seeds, n_prompts, seq_len, vocab : int
        ``S``, ``P``, ``T`` and ``V``.
    tabular : bool
        Whether every state has its own logits (the exact setting of the theory).
    """

    n_seeds: int
    n_prompts: int
    seq_len: int
    vocab: int
    tabular: bool

    def parameters(self) -> list[Tensor]:
        """Trainable tensors, each with the seed dimension first."""
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` responses per prompt: ``[S, P, n, T]`` int64, without gradient."""
        raise NotImplementedError

    def forward(self, tokens: Tensor, with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        """``(log pi(y_t) [S, P, n, T], H_t [S, P, n, T] or None)`` with gradient."""
        raise NotImplementedError

    def entropy(self, tokens: Tensor) -> Tensor:
        """Entropy of the state of every position, ``[S, P, n, T]`` float64, no gradient.

        float64 so that tiny measured changes (small learning rates) are not rounding noise.
        """
        raise NotImplementedError

    def contributions(self, tokens: Tensor, advantages: Tensor, rule: str = "pg") -> Tensor:
        """Per-position first-order contributions per unit learning rate, ``[S, P, n, T]``."""
        raise NotImplementedError

    def bonus_contributions(self, tokens: Tensor, weights: Tensor, rule: str = "pg") -> Tensor:
        """First-order entropy change of each position's state when its logits move by
        ``weights * dH/dz`` (``rule="npg"``: preconditioned by ``1 / pi``), per unit lr."""
        raise NotImplementedError

    def visit_counts(self, tokens: Tensor) -> Tensor:
        """How many positions of the batch (same seed and prompt) share each position's state."""
        raise NotImplementedError

    def sequence_log_prob(self, sequences: Tensor) -> Tensor:
        """``log pi(sequence)`` for ``[S, P, C, T]`` sequences -> ``[S, P, C]``, no gradient."""
        raise NotImplementedError

    def precondition_npg(self) -> None:
        """Turn the accumulated logit gradient into the tabular natural gradient (divide by pi)."""
        raise NotImplementedError(f"{type(self).__name__} has no tabular natural gradient")

    def param_logits(self, params: tuple[Tensor, ...], tokens: Tensor) -> Tensor:
        """Teacher-forced logits ``[S, P, n, T, V]`` of ``tokens`` as a pure function of ``params`` (tensors
        shaped like :meth:`parameters`), for :mod:`entrotheory.param_space`."""
        raise NotImplementedError

    def param_space_contributions(
        self, tokens: Tensor, advantages: Tensor, preconditioner: StepPreconditioner, normalizer: float,
        entropy_weights: Tensor | None = None, method: str = "jvp",
    ) -> ParamSpaceContributions:
        """Parameter-space contributions of the coming step to every seed's token-mean entropy (eq. 5.3).

        The loss is ``-(1/normalizer) sum A log pi`` per seed (``- sum w H`` with ``entropy_weights``) and
        the step is ``preconditioner``'s; the seeds are independent models (``batch_dims=1``), so one
        backward pass of the summed token-mean entropies and one JVP give every seed's ``s_t`` at once.
        Shapes: ``tokens``/``advantages`` ``[S, P, n, T]``; ``predicted``/``drift`` ``[S]``.
        """
        return param_space_contributions(
            lambda ps: self.param_logits(ps, tokens), self.parameters(), tokens, advantages, preconditioner,
            normalizer=normalizer, method=method, batch_dims=1, entropy_weights=entropy_weights)


# ============================================================================ bandit
class TabularBanditPolicy(ToyPolicy):
    """One tabular softmax over ``K`` arms per (seed, prompt): logits ``[S, P, K]``.

    Plain SGD with learning rate ``eta`` on the loss ``sum_p mean_i -A_i log pi_p(y_i)``
    moves the logits of prompt ``p`` by exactly ``eta * logit_update(z_p, y_p, A_p, "pg")``.
    """

    tabular = True

    def __init__(self, logits: Tensor) -> None:
        if logits.ndim != 3:
            raise ValueError(f"bandit logits must be [S, P, K], got {tuple(logits.shape)}")
        self.logits = logits.detach().clone().to(torch.float32).requires_grad_(True)
        self.n_seeds, self.n_prompts, self.vocab = logits.shape
        self.seq_len = 1

    def parameters(self) -> list[Tensor]:
        return [self.logits]

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        probs = torch.softmax(self.logits, -1).reshape(-1, self.vocab)
        arms = torch.multinomial(probs, n, replacement=True, generator=generator)
        return arms.reshape(self.n_seeds, self.n_prompts, n, 1)

    def forward(self, tokens: Tensor, with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        logp = torch.log_softmax(self.logits, -1)
        lp = logp.gather(-1, tokens[..., 0]).unsqueeze(-1)
        ent = None
        if with_entropy:
            ent = entropy(self.logits)[:, :, None, None].expand_as(lp)
        return lp, ent

    @torch.no_grad()
    def entropy(self, tokens: Tensor) -> Tensor:
        return entropy(self.logits.double())[:, :, None, None].expand(tokens.shape).contiguous()

    @torch.no_grad()
    def contributions(self, tokens: Tensor, advantages: Tensor, rule: str = "pg") -> Tensor:
        # entropy_change_contributions averages over the n samples of a state (1/N);
        # the per-position convention is N = 1, hence the factor n.
        n = tokens.shape[2]
        c = entropy_change_contributions(self.logits.detach(), tokens[..., 0], advantages[..., 0], rule)
        return (n * c).unsqueeze(-1).to(torch.float32)

    @torch.no_grad()
    def bonus_contributions(self, tokens: Tensor, weights: Tensor, rule: str = "pg") -> Tensor:
        z = self.logits.detach()
        dz = entropy_gradient(z)
        if check_rule(rule) == "npg":
            dz = dz / torch.softmax(z, -1)
        per_state = predicted_entropy_change(z, dz).to(torch.float32)  # [S, P]
        return weights * per_state[:, :, None, None]

    def visit_counts(self, tokens: Tensor) -> Tensor:
        return torch.full(tokens.shape, float(tokens.shape[2]), dtype=torch.float32)

    @torch.no_grad()
    def sequence_log_prob(self, sequences: Tensor) -> Tensor:
        return torch.log_softmax(self.logits, -1).gather(-1, sequences[..., 0])

    @torch.no_grad()
    def precondition_npg(self) -> None:
        if self.logits.grad is not None:
            self.logits.grad.div_(torch.softmax(self.logits, -1))

    @torch.no_grad()
    def probabilities(self) -> Tensor:
        """``pi`` over the arms, ``[S, P, K]``."""
        return torch.softmax(self.logits, -1)

    def param_logits(self, params: tuple[Tensor, ...], tokens: Tensor) -> Tensor:
        (logits,) = params
        return logits[:, :, None, None, :].expand(*tokens.shape, self.vocab)


# ============================================================================ token policies
class TokenPolicy(ToyPolicy):
    """Autoregressive policy over ``V`` tokens and ``L`` positions; subclasses give the logits.

    A state is (seed, prompt, prefix); prefixes are numbered ``offset_t + code(prefix)`` with
    ``offset_t = (V^t - 1) / (V - 1)`` and ``code`` the base-``V`` value of the prefix.
    """

    def __init__(self, n_seeds: int, n_prompts: int, vocab: int, seq_len: int) -> None:
        if vocab < 2 or seq_len < 1:
            raise ValueError(f"need vocab >= 2 and seq_len >= 1, got V={vocab}, L={seq_len}")
        self.n_seeds, self.n_prompts, self.vocab, self.seq_len = n_seeds, n_prompts, vocab, seq_len
        self.n_prefixes = (vocab**seq_len - 1) // (vocab - 1)
        self.offsets = torch.tensor([(vocab**t - 1) // (vocab - 1) for t in range(seq_len)])

    # ------------------------------------------------------------------ subclass hooks
    def logits(self, tokens: Tensor) -> Tensor:
        """Teacher-forced logits ``[S, P, n, T, V]`` of every position (with gradient)."""
        raise NotImplementedError

    def next_logits(self, prefix: Tensor) -> Tensor:
        """Logits ``[S, P, n, V]`` after the prefixes ``[S, P, n, t]`` (no gradient needed)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared machinery
    def prefix_ids(self, tokens: Tensor) -> Tensor:
        """Index of the prefix state of every position, ``[S, P, n, T]`` int64."""
        codes = torch.zeros(tokens.shape[:-1] + (1,), dtype=torch.int64)
        parts = [codes]
        for t in range(1, tokens.shape[-1]):
            codes = codes * self.vocab + tokens[..., t - 1 : t]
            parts.append(codes)
        return torch.cat(parts, -1) + self.offsets[: tokens.shape[-1]]

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        out = torch.zeros(self.n_seeds, self.n_prompts, n, 0, dtype=torch.int64)
        for _ in range(self.seq_len):
            z = self.next_logits(out)
            probs = torch.softmax(z.float(), -1).reshape(-1, self.vocab)
            y = torch.multinomial(probs, 1, generator=generator).reshape(self.n_seeds, self.n_prompts, n, 1)
            out = torch.cat([out, y], -1)
        return out

    def forward(self, tokens: Tensor, with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        z = self.logits(tokens)
        lp = torch.log_softmax(z, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return lp, (entropy(z) if with_entropy else None)

    @torch.no_grad()
    def entropy(self, tokens: Tensor) -> Tensor:
        return entropy(self.logits(tokens).double())

    @torch.no_grad()
    def contributions(self, tokens: Tensor, advantages: Tensor, rule: str = "pg") -> Tensor:
        stats = token_entropy_stats(self.logits(tokens), tokens)
        return token_entropy_contributions(stats, advantages.to(torch.float32), rule=rule)

    @torch.no_grad()
    def bonus_contributions(self, tokens: Tensor, weights: Tensor, rule: str = "pg") -> Tensor:
        z = self.logits(tokens)
        dz = entropy_gradient(z)
        if check_rule(rule) == "npg":
            dz = dz / torch.softmax(z, -1)
        return weights * predicted_entropy_change(z, dz).to(torch.float32)

    @torch.no_grad()
    def visit_counts(self, tokens: Tensor) -> Tensor:
        s, p, n, t = tokens.shape
        seed_prompt = torch.arange(s * p).reshape(s, p, 1, 1)
        key = seed_prompt * self.n_prefixes + self.prefix_ids(tokens)
        _, inverse, counts = torch.unique(key.reshape(-1), return_inverse=True, return_counts=True)
        return counts[inverse].reshape(tokens.shape).to(torch.float32)

    @torch.no_grad()
    def sequence_log_prob(self, sequences: Tensor) -> Tensor:
        lp, _ = self.forward(sequences)
        return lp.sum(-1)

    @torch.no_grad()
    def ranked_sequences(self, first_ranks: Tensor, rest_rank: int) -> Tensor:
        """Build ``C`` sequences per (seed, prompt) from the policy's own ranking.

        Sequence ``c`` starts with the token of rank ``first_ranks[c]`` (0 = likeliest) after the
        empty prefix and continues with the token of rank ``rest_rank`` at every later prefix
        (``-1`` = least likely). Distinct first ranks give distinct sequences. ``[S, P, C, L]``.
        """
        c = first_ranks.numel()
        seqs = torch.zeros(self.n_seeds, self.n_prompts, c, 0, dtype=torch.int64)
        for t in range(self.seq_len):
            order = self.next_logits(seqs).argsort(-1, descending=True)  # [S, P, C, V]
            if t == 0:
                idx = first_ranks.reshape(1, 1, c, 1).expand(self.n_seeds, self.n_prompts, c, 1)
            else:
                idx = torch.full((self.n_seeds, self.n_prompts, c, 1), rest_rank % self.vocab)
            seqs = torch.cat([seqs, order.gather(-1, idx)], -1)
        return seqs


class TabularTokenPolicy(TokenPolicy):
    """One softmax per (seed, prompt, prefix): a table ``[S, P, n_prefixes, V]``.

    The exact setting of the per-position theory. Feasible while ``S * P * V^L`` is small
    (checked against ``max_elements``).
    """

    tabular = True

    def __init__(self, table: Tensor, seq_len: int, max_elements: int = 50_000_000) -> None:
        s, p, n_prefixes, v = table.shape
        super().__init__(s, p, v, seq_len)
        if n_prefixes != self.n_prefixes:
            raise ValueError(f"table has {n_prefixes} prefixes, V={v}, L={seq_len} need {self.n_prefixes}")
        if table.numel() > max_elements:
            raise ValueError(f"tabular token policy with {table.numel()} logits exceeds {max_elements}")
        self.table = table.detach().clone().to(torch.float32).requires_grad_(True)
        self._seed_idx = torch.arange(s).reshape(s, 1, 1, 1)
        self._prompt_idx = torch.arange(p).reshape(1, p, 1, 1)

    @classmethod
    def zipf(
        cls, n_seeds: int, n_prompts: int, vocab: int, seq_len: int, exponent: float,
        generator: torch.Generator, noise: float = 0.0,
    ) -> TabularTokenPolicy:
        """Every prefix gets independent Zipf-peaked logits (see :func:`zipf_logits`)."""
        n_prefixes = (vocab**seq_len - 1) // (vocab - 1)
        shape = (n_seeds, n_prompts, n_prefixes, vocab)
        return cls(zipf_logits(shape, exponent, generator, noise), seq_len)

    def parameters(self) -> list[Tensor]:
        return [self.table]

    def logits(self, tokens: Tensor) -> Tensor:
        return self.param_logits((self.table,), tokens)

    def param_logits(self, params: tuple[Tensor, ...], tokens: Tensor) -> Tensor:
        (table,) = params
        return table[self._seed_idx, self._prompt_idx, self.prefix_ids(tokens)]

    def next_logits(self, prefix: Tensor) -> Tensor:
        t = prefix.shape[-1]
        ids = torch.zeros(prefix.shape[:-1], dtype=torch.int64)
        for j in range(t):
            ids = ids * self.vocab + prefix[..., j]
        ids = ids + (self.vocab**t - 1) // (self.vocab - 1)
        return self.table.detach()[self._seed_idx[..., 0], self._prompt_idx[..., 0], ids]

    @torch.no_grad()
    def precondition_npg(self) -> None:
        if self.table.grad is not None:
            self.table.grad.div_(torch.softmax(self.table, -1))


class NeuralTokenPolicy(TokenPolicy):
    """A small MLP shared by all prompts and prefixes (one independent network per seed).

    Input of position ``t``: prompt embedding + position embedding + the sum of
    position-specific embeddings of the prefix tokens ``y_<t``; one ``tanh`` hidden layer;
    ``V`` output logits. Function approximation: an update on one prefix moves the logits of
    every other prefix, so the per-position (tabular) theory is only an approximation.
    """

    tabular = False

    def __init__(
        self, n_seeds: int, n_prompts: int, vocab: int, seq_len: int, generator: torch.Generator,
        embed_dim: int = 32, hidden: int = 64, out_scale: float = 3.0,
    ) -> None:
        super().__init__(n_seeds, n_prompts, vocab, seq_len)
        s, g = n_seeds, generator

        def init(*shape: int, scale: float) -> Tensor:
            return (torch.randn(*shape, generator=g) * scale).requires_grad_(True)

        self.prompt_emb = init(s, n_prompts, embed_dim, scale=1.0)
        self.pos_emb = init(s, seq_len, embed_dim, scale=1.0)
        self.tok_emb = init(s, seq_len, vocab, embed_dim, scale=1.0 / math.sqrt(max(1, seq_len - 1)))
        self.w1 = init(s, embed_dim, hidden, scale=1.0 / math.sqrt(embed_dim))
        self.b1 = init(s, hidden, scale=0.0)
        self.w2 = init(s, hidden, vocab, scale=out_scale / math.sqrt(hidden))
        self.b2 = init(s, vocab, scale=0.0)

    def parameters(self) -> list[Tensor]:
        return [self.prompt_emb, self.pos_emb, self.tok_emb, self.w1, self.b1, self.w2, self.b2]

    @staticmethod
    def _head(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
        # x: [S, P, n, t, d] -> logits [S, P, n, t, V]
        h = torch.tanh(torch.einsum("spntd,sdh->spnth", x, w1) + b1[:, None, None, None, :])
        return torch.einsum("spnth,shv->spntv", h, w2) + b2[:, None, None, None, :]

    @staticmethod
    def _token_embeddings(tok_emb: Tensor, tokens: Tensor) -> Tensor:
        # embedding of the token at position j (for later positions): [S, P, n, t, d]
        s, p, n, t = tokens.shape
        emb = tok_emb[:, :t]  # [S, t, V, d]
        idx = tokens.permute(0, 3, 1, 2).reshape(s, t, p * n)  # [S, t, P*n]
        e = torch.gather(emb, 2, idx.unsqueeze(-1).expand(s, t, p * n, emb.shape[-1]))
        return e.reshape(s, t, p, n, -1).permute(0, 2, 3, 1, 4)

    def logits(self, tokens: Tensor) -> Tensor:
        return self.param_logits(tuple(self.parameters()), tokens)

    def param_logits(self, params: tuple[Tensor, ...], tokens: Tensor) -> Tensor:
        prompt_emb, pos_emb, tok_emb, w1, b1, w2, b2 = params
        t = tokens.shape[-1]
        e = self._token_embeddings(tok_emb, tokens)
        prefix_sum = e.cumsum(3) - e  # sum over j < t
        x = prompt_emb[:, :, None, None, :] + pos_emb[:, None, None, :t, :] + prefix_sum
        return self._head(x, w1, b1, w2, b2)

    def next_logits(self, prefix: Tensor) -> Tensor:
        s, p, n, t = prefix.shape
        with torch.no_grad():
            x = (self.prompt_emb[:, :, None, :] + self.pos_emb[:, None, None, t, :]).expand(
                s, p, n, self.prompt_emb.shape[-1]
            )
            if t > 0:
                x = x + self._token_embeddings(self.tok_emb, prefix).sum(3)
            return self._head(x.unsqueeze(3), self.w1, self.b1, self.w2, self.b2).squeeze(3)
