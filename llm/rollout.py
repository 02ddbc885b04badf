"""Batched, KV-cached sampling and the response-token forward pass, both sharing the prompt prefix.

A GRPO batch is ``P`` prompts with ``G`` samples each (``B = P * G`` rows). The prompt is
identical within a group, so both sampling and the training forward pass run the prompt once
per *prompt* and reuse its key/value cache for the ``G`` responses (``Cache.batch_select_indices``).
Gradients flow through the shared cache, so the result equals a full forward pass over
prompt + response while costing ``P * L_prompt + B * L_response`` tokens instead of
``B * (L_prompt + L_response)``. ``share_prefix=False`` runs the plain full forward instead.

Token statistics for the entropy theory are taken from the sampling logits themselves, position
by position (:func:`entrotheory.token_entropy_stats`), so no extra forward pass is needed for them.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
from torch import Tensor

from entrotheory import TokenEntropyStats, token_entropy_stats

__all__ = ["Rollout", "encode_prompts", "generate", "pad_rollout", "response_logits", "response_log_probs"]


def encode_prompts(tokenizer, prompts: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
    """Left-padded prompt ids ``[P, L]`` and attention mask ``[P, L]`` (long)."""
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [[tokenizer.bos_token_id, *x] for x in ids]
    if any(len(x) == 0 for x in ids):
        raise ValueError("a prompt encodes to zero tokens")
    length = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (length - len(x)) + x for x in ids], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (length - len(x)) + [1] * len(x) for x in ids], dtype=torch.long, device=device)
    return input_ids, mask


def _cache_kwarg(model) -> str:
    """transformers >= 5.x renamed ``past_key_values`` to ``cache`` in forward(); support both."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


@dataclass
class Rollout:
    """Sampled responses. ``tokens``/``mask`` ``[B, T]`` (right-padded; the stop token counts);
    ``stats`` per-position statistics of the sampling policy ``softmax(logits / temperature)``;
    ``prompt_index`` ``[B]`` maps rows to prompts."""

    tokens: Tensor
    mask: Tensor
    stats: TokenEntropyStats
    prompt_index: Tensor
    texts: list[str]


class _StopTokens:
    """Decides whether a sampled token ends a response: EOS, or any token containing a newline."""

    def __init__(self, tokenizer, stop_at_newline: bool) -> None:
        self.tokenizer = tokenizer
        self.newline = stop_at_newline
        self.known: dict[int, bool] = {}
        self.eos = {i for i in (tokenizer.eos_token_id, getattr(tokenizer, "pad_token_id", None)) if i is not None}

    def __call__(self, token_ids: Tensor) -> Tensor:
        out = torch.zeros(token_ids.shape, dtype=torch.bool)
        for i, t in enumerate(token_ids.tolist()):
            hit = self.known.get(t)
            if hit is None:
                hit = t in self.eos or (self.newline and "\n" in self.tokenizer.decode([t]))
                self.known[t] = hit
            out[i] = hit
        return out.to(token_ids.device)


def _sample(logits: Tensor, top_p: float, generators: list[torch.Generator]) -> Tensor:
    """Sample one token per row from ``softmax(logits)`` restricted to the top-p nucleus.

    The rows form ``len(generators)`` equal groups (a prompt's samples), and group ``i`` draws from
    ``generators[i]`` alone, so a group's tokens do not depend on which other groups share the batch
    (the same prompt gives the same samples on one process or on rank ``r`` of ``N``).
    """
    probs = torch.softmax(logits.float(), dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    gen_device = generators[0].device
    src = probs if probs.device.type == gen_device.type else probs.cpu()
    out = torch.cat([torch.multinomial(part, 1, generator=g)
                     for part, g in zip(src.chunk(len(generators)), generators)]).squeeze(-1)
    return out.to(probs.device)


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: Tensor, prompt_mask: Tensor, samples: int, max_new_tokens: int,
             temperature: float, top_p: float, generators: list[torch.Generator], stop_at_newline: bool,
             autocast=None) -> Rollout:
    """Sample ``samples`` responses per prompt with a KV cache; the prompt is run once per prompt.

    ``generators`` holds one random generator per prompt (its samples draw from it alone).

    Per-position statistics (log-prob of the sampled token, entropy, pg baseline) of the policy
    ``softmax(logits / temperature)`` are collected from the same logits used for sampling.
    """
    device = prompt_ids.device
    n_prompts = prompt_ids.shape[0]
    batch = n_prompts * samples
    if len(generators) != n_prompts:
        raise ValueError(f"need one generator per prompt: {len(generators)} for {n_prompts} prompts")
    stop = _StopTokens(tokenizer, stop_at_newline)
    pad = tokenizer.pad_token_id
    cache_kw = _cache_kwarg(model)
    cache = _new_cache(model)
    positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)
    ctx = autocast() if autocast else contextlib.nullcontext()
    with ctx:
        out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions,
                    use_cache=True, logits_to_keep=1, **{cache_kw: cache})
    index = torch.arange(n_prompts, device=device).repeat_interleave(samples)
    cache.batch_select_indices(index)
    logits = out.logits[:, -1].float()[index] / temperature
    attn = prompt_mask[index]
    next_pos = positions[index, -1:] + 1
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, live, stats = [], [], []
    for t in range(max_new_tokens):
        tok = _sample(logits, top_p, generators)
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        alive = ~done
        stats.append(token_entropy_stats(logits, tok, alive))
        tokens.append(tok)
        live.append(alive)
        done = done | (alive & stop(tok))
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        attn = torch.cat([attn, torch.ones(batch, 1, dtype=attn.dtype, device=device)], dim=1)
        with ctx:
            out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos, use_cache=True,
                        **{cache_kw: cache})
        logits = out.logits[:, -1].float() / temperature
        next_pos = next_pos + 1
    tokens_t = torch.stack(tokens, 1)
    mask = torch.stack(live, 1)
    st = TokenEntropyStats(*(torch.stack([s[i] for s in stats], 1) for i in range(3)), mask)
    texts = [tokenizer.decode(row[m].tolist(), skip_special_tokens=True) for row, m in zip(tokens_t, mask)]
    return Rollout(tokens_t, mask, st, index, texts)


def pad_rollout(roll: Rollout, length: int, pad_id: int) -> Rollout:
    """``roll`` right-padded to ``length`` positions (pad tokens, mask off, zero statistics).

    Ranks of a distributed run sample responses of different lengths; padding every rank to the
    longest gives the ``[B, T]`` layout a single process would have built for the whole batch.
    """
    extra = length - roll.tokens.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad a rollout of {roll.tokens.shape[1]} positions to {length}")
    if extra == 0:
        return roll

    def grow(t: Tensor, value: float | int | bool) -> Tensor:
        return torch.cat([t, torch.full((t.shape[0], extra), value, dtype=t.dtype, device=t.device)], dim=1)

    st = roll.stats
    stats = TokenEntropyStats(grow(st.log_prob, 0.0), grow(st.entropy, 0.0), grow(st.pg_baseline, 0.0),
                              grow(st.mask, False))
    return Rollout(grow(roll.tokens, pad_id), grow(roll.mask, False), stats, roll.prompt_index, roll.texts)


# a prefix shared by every prompt of a forward (few-shot examples, a system prompt) is run once when it has at least
# this many tokens; below that the extra model call costs more than it saves
MIN_COMMON_PREFIX = 4


def _common_prefix(p_ids: Tensor, p_mask: Tensor) -> tuple[int, list[list[int]]]:
    """The number of leading real tokens every left-padded prompt shares (at most the shortest length - 1, so each
    prompt keeps a token of its own), and the prompts' real tokens."""
    real = [row[m.bool()].tolist() for row, m in zip(p_ids, p_mask)]
    common = min(len(r) for r in real) - 1
    for r in real[1:]:
        n = 0
        while n < common and r[n] == real[0][n]:
            n += 1
        common = n
    return common, real


def _may_share(model) -> bool:
    """Whether a common prefix may be run once: not under FSDP (each call gathers the weights, a collective, and
    ranks with other prompts would make other numbers of calls) nor with a sliding attention window (the masked
    pads between the prefix and a suffix would count towards the window)."""
    from torch.distributed.fsdp import FSDPModule

    config = getattr(model, "config", None)
    window = (config.use_sliding_window if hasattr(config, "use_sliding_window")
              else getattr(config, "sliding_window", None))
    if window:
        return False
    return not any(isinstance(m, FSDPModule) for m in model.modules())


def _prompt_cache(model, p_ids: Tensor, p_mask: Tensor):
    """The KV cache of the prompts ``[P, L]`` (left-padded), the logits after each prompt ``[P, V]``, the cache's
    attention mask ``[P, L']`` and the position of each prompt's last token ``[P]``. A prefix common to every prompt
    (:data:`MIN_COMMON_PREFIX` tokens or more; :func:`_may_share`) is run once and its cache repeated for the
    prompts' own suffixes (left-padded after it; the pads are masked keys), so the prompts cost
    ``L_common + P * L_suffix`` tokens; positions are those of the plain left-padded forward, and gradients flow
    through the shared part."""
    cache_kw = _cache_kwarg(model)
    cache = _new_cache(model)
    n_prompts = p_ids.shape[0]
    common, real = _common_prefix(p_ids, p_mask) if n_prompts > 1 and _may_share(model) else (0, [])
    if common < MIN_COMMON_PREFIX:
        pos = (p_mask.cumsum(1) - 1).clamp(min=0)
        out = model(input_ids=p_ids, attention_mask=p_mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                    **{cache_kw: cache})
        return cache, out.logits[:, -1], p_mask, pos[:, -1]
    device, dtype = p_ids.device, p_mask.dtype
    head = torch.tensor([real[0][:common]], dtype=p_ids.dtype, device=device)
    model(input_ids=head, attention_mask=torch.ones_like(head, dtype=dtype), use_cache=True, logits_to_keep=1,
          position_ids=torch.arange(common, device=device).unsqueeze(0), **{cache_kw: cache})
    cache.batch_repeat_interleave(n_prompts)
    width = max(len(r) for r in real) - common
    s_ids = torch.zeros(n_prompts, width, dtype=p_ids.dtype, device=device)  # masked where no suffix token
    s_mask = torch.zeros(n_prompts, width, dtype=dtype, device=device)
    for j, r in enumerate(real):
        tail = r[common:]
        s_ids[j, width - len(tail):] = torch.tensor(tail, dtype=p_ids.dtype, device=device)
        s_mask[j, width - len(tail):] = 1
    attn = torch.cat([torch.ones(n_prompts, common, dtype=dtype, device=device), s_mask], 1)
    pos = common + (s_mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=s_ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1,
                **{cache_kw: cache})
    return cache, out.logits[:, -1], attn, pos[:, -1]


def response_logits(model, prompt_ids: Tensor, prompt_mask: Tensor, prompt_index: Tensor, tokens: Tensor,
                    share_prefix: bool = True) -> Tensor:
    """Logits ``[b, T, V]`` predicting each response token of the rows ``tokens`` ``[b, T]``.

    ``prompt_index`` ``[b]`` names each row's prompt. With ``share_prefix`` the distinct prompts
    are run once (a prefix common to all of them once in all, :func:`_prompt_cache`) and their cache is
    gathered per row; gradients flow through it.
    """
    b, length = tokens.shape
    if not share_prefix:
        ids = torch.cat([prompt_ids[prompt_index], tokens], dim=1)
        attn = torch.cat([prompt_mask[prompt_index], torch.ones_like(tokens)], dim=1)
        pos = (attn.cumsum(1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False,
                    logits_to_keep=length + 1)
        return out.logits[:, :length]
    uniq, inverse = torch.unique(prompt_index, return_inverse=True)
    p_ids, p_mask = prompt_ids[uniq], prompt_mask[uniq]
    # drop columns that are padding in every selected prompt
    first = int((p_mask.sum(0) > 0).nonzero()[0])
    p_ids, p_mask = p_ids[:, first:], p_mask[:, first:]
    cache, last_logits, p_mask, last_pos = _prompt_cache(model, p_ids, p_mask)
    head = last_logits[inverse].unsqueeze(1)
    if length == 1:
        return head
    cache.batch_select_indices(inverse)
    attn = torch.cat([p_mask[inverse], torch.ones(b, length - 1, dtype=p_mask.dtype, device=p_mask.device)], 1)
    rpos = last_pos[inverse].unsqueeze(1) + 1 + torch.arange(length - 1, device=tokens.device)
    out = model(input_ids=tokens[:, :-1], attention_mask=attn, position_ids=rpos, use_cache=True,
                **{_cache_kwarg(model): cache})
    return torch.cat([head, out.logits], dim=1)


def response_log_probs(logits: Tensor, tokens: Tensor) -> Tensor:
    """``log softmax(logits)[token]`` ``[b, T]`` in float32, with gradients."""
    logits = logits.float()
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
