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

Cache blocking. The bandit's per-prompt computations (sampling, log-probabilities and their gradient,
entropies, contributions) are row-wise over its ``[S * P, K]`` logits, so they run block by block of about
:data:`CHUNK_ELEMENTS` logits (:func:`row_blocks`): every temporary then stays in the core's cache instead of
being a full ``[S, P, K]`` tensor that each pass re-reads from memory. Every row is computed by the same
operations as on the whole tensor, so the results are the same bits for any block size (see
``docs/performance.md``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

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
    "CHUNK_ELEMENTS",
    "row_blocks",
    "ToyPolicy",
    "TabularBanditPolicy",
    "TokenPolicy",
    "TabularTokenPolicy",
    "NeuralTokenPolicy",
    "zipf_logits",
]


#: logits per block of rows in the bandit's block-wise computations (256 KiB of float32): a block's handful of
#: temporaries fits in a 2 MiB L2 cache. A policy's ``chunk_elements`` attribute overrides it.
CHUNK_ELEMENTS = 1 << 16


def row_blocks(n_rows: int, row_len: int, chunk_elements: int = CHUNK_ELEMENTS) -> list[slice]:
    """Consecutive row ranges of a ``[n_rows, row_len]`` tensor, each of about ``chunk_elements`` elements.

    At least one row per block; ``chunk_elements >= n_rows * row_len`` gives one block (the whole tensor).
    Where a block holds enough rows, every block but the last has a multiple of 64 elements: torch's
    element-wise CPU kernels (``exp``, ``pow``) take a scalar code path for the last elements of a range that
    does not fill whole SIMD registers, and that path may round differently; with blocks of whole registers an
    element takes the vector path exactly where it does in the whole tensor.
    """
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
    row_len = max(row_len, 1)
    rows = max(1, chunk_elements // row_len)
    align = 64 // math.gcd(row_len, 64)  # rows per multiple of 64 elements
    if rows >= align:
        rows -= rows % align
    return [slice(a, min(a + rows, n_rows)) for a in range(0, n_rows, rows)]


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
    #: whether the state of every position is its (seed, prompt) alone, so that the entropies of a batch's
    #: states do not depend on the sampled tokens (the bandit); then :meth:`prompt_entropy` gives them
    prompt_states: bool = False

    def parameters(self) -> list[Tensor]:
        """Trainable tensors, each with the seed dimension first."""
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` responses per prompt: ``[S, P, n, T]`` int64, without gradient."""
        raise NotImplementedError

    def forward(self, tokens: Tensor, with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        """``(log pi(y_t) [S, P, n, T], H_t [S, P, n, T] or None)`` with gradient."""
        raise NotImplementedError

    def forward_leaves(
        self, tokens: Tensor, with_entropy: bool = False
    ) -> tuple[Tensor, Tensor | None, Callable[[], None]]:
        """:meth:`forward` cut in two: ``(lp, H_t, backward)``.

        ``lp`` ``[S, P, n, T]`` and ``H_t`` (or ``None``) have the values of :meth:`forward`'s but start a new
        graph (``lp`` is a leaf that requires grad; ``H_t`` a leaf or a view of one). After a loss built from
        them has been back-propagated, ``backward()`` carries their gradients on into the parameters'
        ``.grad`` (accumulating): the same gradients, bit for bit, as back-propagating the loss through
        :meth:`forward`'s graph. This default replays :meth:`forward`'s graph; the bandit recomputes it block
        by block of prompts.
        """
        lp, ht = self.forward(tokens, with_entropy)
        lp_leaf = lp.detach().requires_grad_(True)
        ht_leaf = ht.detach().requires_grad_(True) if ht is not None else None

        def backward() -> None:
            pairs = [(out, leaf.grad) for out, leaf in ((lp, lp_leaf), (ht, ht_leaf))
                     if leaf is not None and leaf.grad is not None]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])

        return lp_leaf, ht_leaf, backward

    def _gradient_target(self, param: Tensor, name: str) -> tuple[Tensor, bool]:
        """Where a block-wise backward writes ``param``'s gradient: ``(tensor, fresh)``.

        With ``param.grad`` unset (the training loop clears it after every step), a buffer the policy keeps
        between calls, which the new ``.grad`` then is (``fresh=True``: every element gets written): a fresh
        tensor of tens of MB would cost a page fault per 4 KiB on its first writes, every step. With
        ``param.grad`` set, a new tensor to add to it (``fresh=False``). A ``.grad`` kept past the next
        backward of the policy must therefore be copied.
        """
        if param.grad is not None:
            return torch.empty_like(param), False
        buffers = self.__dict__.setdefault("_grad_buffers", {})
        buf = buffers.get(name)
        if buf is None or buf.shape != param.shape or buf.dtype != param.dtype:
            buf = buffers[name] = torch.empty_like(param)
        return buf, True

    @staticmethod
    def _set_gradient(param: Tensor, grad: Tensor, fresh: bool) -> None:
        if fresh:
            param.grad = grad
        else:
            param.grad += grad

    def entropy(self, tokens: Tensor) -> Tensor:
        """Entropy of the state of every position, ``[S, P, n, T]`` float64, no gradient.

        float64 so that tiny measured changes (small learning rates) are not rounding noise.
        """
        raise NotImplementedError

    def prompt_entropy(self) -> Tensor:
        """Entropy of every (seed, prompt) state ``[S, P]`` float64, for policies with ``prompt_states``."""
        raise NotImplementedError(f"{type(self).__name__} has states below the prompt (prefixes)")

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

    Sampling, :meth:`forward_leaves`, :meth:`prompt_entropy`, :meth:`contributions`,
    :meth:`bonus_contributions` and :meth:`precondition_npg` work block by block of ``chunk_elements`` logits
    (:func:`row_blocks`; default :data:`CHUNK_ELEMENTS`) with the same results as on the whole tensor.
    """

    tabular = True
    prompt_states = True

    def __init__(self, logits: Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> None:
        if logits.ndim != 3:
            raise ValueError(f"bandit logits must be [S, P, K], got {tuple(logits.shape)}")
        if chunk_elements < 1:
            raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
        self.logits = logits.detach().clone().to(torch.float32).requires_grad_(True)
        self.n_seeds, self.n_prompts, self.vocab = logits.shape
        self.seq_len = 1
        self.chunk_elements = int(chunk_elements)

    def parameters(self) -> list[Tensor]:
        return [self.logits]

    def _rows(self) -> Tensor:
        """The logits as ``[S * P, K]`` rows (a view, no gradient)."""
        return self.logits.detach().reshape(-1, self.vocab)

    def _blocks(self) -> list[slice]:
        return row_blocks(self.n_seeds * self.n_prompts, self.vocab, self.chunk_elements)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        z = self._rows()
        if n == 1:  # torch's one-sample path draws from the generator for the whole tensor at once
            arms = torch.multinomial(torch.softmax(z, -1), 1, replacement=True, generator=generator)
        else:  # row after row, n uniforms each: block by block draws the same numbers in the same order
            arms = torch.cat([torch.multinomial(torch.softmax(z[b], -1), n, replacement=True, generator=generator)
                              for b in self._blocks()])
        return arms.reshape(self.n_seeds, self.n_prompts, n, 1)

    def forward(self, tokens: Tensor, with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        logp = torch.log_softmax(self.logits, -1)
        lp = logp.gather(-1, tokens[..., 0]).unsqueeze(-1)
        ent = None
        if with_entropy:
            ent = entropy(self.logits)[:, :, None, None].expand_as(lp)
        return lp, ent

    def forward_leaves(
        self, tokens: Tensor, with_entropy: bool = False
    ) -> tuple[Tensor, Tensor | None, Callable[[], None]]:
        s, p, n, _ = tokens.shape
        z, idx, blocks = self._rows(), tokens[..., 0].reshape(-1, n), self._blocks()
        lp_leaf = torch.empty(s, p, n, 1)
        h_leaf = torch.empty(s, p) if with_entropy else None
        with torch.no_grad():
            lp_rows = lp_leaf.view(-1, n)
            for b in blocks:
                lp_rows[b] = torch.log_softmax(z[b], -1).gather(-1, idx[b])
                if h_leaf is not None:
                    h_leaf.view(-1)[b] = entropy(z[b])
        lp_leaf.requires_grad_(True)
        ht = None
        if h_leaf is not None:
            h_leaf.requires_grad_(True)
            ht = h_leaf[:, :, None, None].expand_as(lp_leaf)

        def backward() -> None:
            g_lp = lp_leaf.grad
            g_h = h_leaf.grad if h_leaf is not None else None
            if g_lp is None and g_h is None:
                return
            g_lp_rows = g_lp.reshape(-1, n) if g_lp is not None else None
            g_h_rows = g_h.reshape(-1) if g_h is not None else None
            grad, fresh = self._gradient_target(self.logits, "logits")
            grad_rows = grad.view(-1, self.vocab)
            for b in blocks:  # forward's graph, one block of rows at a time
                zb = z[b].requires_grad_(True)
                outs, grads = [], []
                if g_lp_rows is not None:
                    outs.append(torch.log_softmax(zb, -1).gather(-1, idx[b]))
                    grads.append(g_lp_rows[b])
                if g_h_rows is not None:
                    outs.append(entropy(zb))
                    grads.append(g_h_rows[b])
                (grad_rows[b],) = torch.autograd.grad(outs, zb, grads)
            self._set_gradient(self.logits, grad, fresh)

        return lp_leaf, ht, backward

    @torch.no_grad()
    def prompt_entropy(self) -> Tensor:
        z = self._rows()
        out = torch.empty(z.shape[0], dtype=torch.float64)
        for b in self._blocks():
            out[b] = entropy(z[b].double())
        return out.reshape(self.n_seeds, self.n_prompts)

    @torch.no_grad()
    def entropy(self, tokens: Tensor) -> Tensor:
        return self.prompt_entropy()[:, :, None, None].expand(tokens.shape).contiguous()

    @torch.no_grad()
    def contributions(self, tokens: Tensor, advantages: Tensor, rule: str = "pg") -> Tensor:
        # entropy_change_contributions averages over the n samples of a state (1/N);
        # the per-position convention is N = 1, hence the factor n.
        n = tokens.shape[2]
        z, idx, adv = self._rows(), tokens[..., 0].reshape(-1, n), advantages[..., 0].reshape(-1, n)
        out = torch.empty(z.shape[0], n)
        for b in self._blocks():
            out[b] = n * entropy_change_contributions(z[b], idx[b], adv[b], rule)
        return out.reshape(tokens.shape)

    @torch.no_grad()
    def bonus_contributions(self, tokens: Tensor, weights: Tensor, rule: str = "pg") -> Tensor:
        npg = check_rule(rule) == "npg"
        z = self._rows()
        per_state = torch.empty(z.shape[0])
        for b in self._blocks():
            dz = entropy_gradient(z[b])
            if npg:
                dz = dz / torch.softmax(z[b], -1)
            per_state[b] = predicted_entropy_change(z[b], dz)
        return weights * per_state.reshape(self.n_seeds, self.n_prompts)[:, :, None, None]

    def visit_counts(self, tokens: Tensor) -> Tensor:
        return torch.full(tokens.shape, float(tokens.shape[2]), dtype=torch.float32)

    @torch.no_grad()
    def sequence_log_prob(self, sequences: Tensor) -> Tensor:
        return torch.log_softmax(self.logits, -1).gather(-1, sequences[..., 0])

    @torch.no_grad()
    def precondition_npg(self) -> None:
        if self.logits.grad is not None:
            z, grad = self._rows(), self.logits.grad.view(-1, self.vocab)
            for b in self._blocks():
                grad[b].div_(torch.softmax(z[b], -1))

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

    :meth:`entropy`, :meth:`forward_leaves` and :meth:`precondition_npg` work block by block of (seed, prompt)
    rows of about ``chunk_elements`` logits (:func:`row_blocks`), with the same results as on the whole batch.
    """

    tabular = True

    def __init__(
        self, table: Tensor, seq_len: int, max_elements: int = 50_000_000, chunk_elements: int = CHUNK_ELEMENTS
    ) -> None:
        s, p, n_prefixes, v = table.shape
        super().__init__(s, p, v, seq_len)
        if n_prefixes != self.n_prefixes:
            raise ValueError(f"table has {n_prefixes} prefixes, V={v}, L={seq_len} need {self.n_prefixes}")
        if table.numel() > max_elements:
            raise ValueError(f"tabular token policy with {table.numel()} logits exceeds {max_elements}")
        if chunk_elements < 1:
            raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
        self.chunk_elements = int(chunk_elements)
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
        s, p, n, t = tokens.shape
        rows = self.table.reshape(s * p, self.n_prefixes, self.vocab)
        return self._rows_logits(rows, self.prefix_ids(tokens).reshape(s * p, n, t)).reshape(*tokens.shape, -1)

    def param_logits(self, params: tuple[Tensor, ...], tokens: Tensor) -> Tensor:
        (table,) = params
        return table[self._seed_idx, self._prompt_idx, self.prefix_ids(tokens)]

    def next_logits(self, prefix: Tensor) -> Tensor:
        t = prefix.shape[-1]
        ids = torch.zeros(prefix.shape[:-1], dtype=torch.int64)
        for j in range(t):
            ids = ids * self.vocab + prefix[..., j]
        ids = ids + (self.vocab**t - 1) // (self.vocab - 1)
        s, p, n = ids.shape
        return self._rows_logits(self._table_rows(), ids.reshape(s * p, n, 1)).reshape(s, p, n, self.vocab)

    # ------------------------------------------------------------------ block by block of (seed, prompt) rows
    def _table_rows(self) -> Tensor:
        """The table as ``[S * P, n_prefixes, V]`` (a view, no gradient)."""
        return self.table.detach().reshape(-1, self.n_prefixes, self.vocab)

    @staticmethod
    def _rows_logits(table_rows: Tensor, ids: Tensor) -> Tensor:
        """Logits ``[r, n, T, V]`` of the prefix ids ``[r, n, T]`` of ``r`` (seed, prompt) rows ``[r, n_prefixes, V]``
        of the table: one ``index_select`` of the flattened rows (several times faster than advanced indexing;
        its gradient accumulates the positions in the same order)."""
        r, n_prefixes, v = table_rows.shape
        offsets = TabularTokenPolicy._rows_offsets(ids, n_prefixes)
        return table_rows.reshape(r * n_prefixes, v).index_select(0, offsets).reshape(*ids.shape, v)

    @staticmethod
    def _rows_offsets(ids: Tensor, n_prefixes: int) -> Tensor:
        """Rows of the flattened ``[r * n_prefixes, V]`` table rows that :meth:`_rows_logits` reads."""
        return (torch.arange(ids.shape[0]).reshape(-1, 1, 1) * n_prefixes + ids).reshape(-1)

    def _position_blocks(self, tokens: Tensor) -> list[slice]:
        n, t = tokens.shape[2], tokens.shape[3]
        return row_blocks(self.n_seeds * self.n_prompts, n * t * self.vocab, self.chunk_elements)

    @torch.no_grad()
    def entropy(self, tokens: Tensor) -> Tensor:
        s, p, n, t = tokens.shape
        table, ids = self._table_rows(), self.prefix_ids(tokens).reshape(s * p, n, t)
        out = torch.empty(s * p, n, t, dtype=torch.float64)
        for b in self._position_blocks(tokens):
            out[b] = entropy(self._rows_logits(table[b], ids[b]).double())
        return out.reshape(tokens.shape)

    def forward_leaves(
        self, tokens: Tensor, with_entropy: bool = False
    ) -> tuple[Tensor, Tensor | None, Callable[[], None]]:
        s, p, n, t = tokens.shape
        table, ids = self._table_rows(), self.prefix_ids(tokens).reshape(s * p, n, t)
        blocks = self._position_blocks(tokens)
        y = tokens.reshape(s * p, n, t, 1)
        lp_leaf = torch.empty(tokens.shape)
        h_leaf = torch.empty(tokens.shape) if with_entropy else None
        with torch.no_grad():
            lp_rows = lp_leaf.view(s * p, n, t)
            for b in blocks:
                z = self._rows_logits(table[b], ids[b])
                lp_rows[b] = torch.log_softmax(z, -1).gather(-1, y[b]).squeeze(-1)
                if h_leaf is not None:
                    h_leaf.view(s * p, n, t)[b] = entropy(z)
        lp_leaf.requires_grad_(True)
        if h_leaf is not None:
            h_leaf.requires_grad_(True)

        def backward() -> None:
            g_lp = lp_leaf.grad.reshape(s * p, n, t) if lp_leaf.grad is not None else None
            g_h = h_leaf.grad.reshape(s * p, n, t) if h_leaf is not None and h_leaf.grad is not None else None
            if g_lp is None and g_h is None:
                return
            grad, fresh = self._gradient_target(self.table, "table")
            grad_rows = grad.view(-1, self.n_prefixes, self.vocab)
            for b in blocks:  # forward's graph, one block of (seed, prompt) rows at a time
                z = self._rows_logits(table[b], ids[b]).requires_grad_(True)
                outs, grads = [], []
                if g_lp is not None:
                    outs.append(torch.log_softmax(z, -1).gather(-1, y[b]).squeeze(-1))
                    grads.append(g_lp[b])
                if g_h is not None:
                    outs.append(entropy(z))
                    grads.append(g_h[b])
                (g_z,) = torch.autograd.grad(outs, z, grads)
                # the gradient of _rows_logits' index_select: zeros, then index_add_ of the positions in order
                rows = grad_rows[b].view(-1, self.vocab).zero_()
                rows.index_add_(0, self._rows_offsets(ids[b], self.n_prefixes), g_z.reshape(-1, self.vocab))
            self._set_gradient(self.table, grad, fresh)

        return lp_leaf, h_leaf, backward

    @torch.no_grad()
    def precondition_npg(self) -> None:
        if self.table.grad is not None:
            table, grad = self._table_rows(), self.table.grad.view(-1, self.n_prefixes, self.vocab)
            for b in row_blocks(table.shape[0], self.n_prefixes * self.vocab, self.chunk_elements):
                grad[b].div_(torch.softmax(table[b], -1))


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
