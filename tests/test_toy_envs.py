"""Environments, policies and the seed-batched optimiser of toy_envs."""

from __future__ import annotations

import math

import pytest
import torch

from entrotheory import entropy_change_contributions, logit_update
from toy_envs.envs import BanditConfig, TokenConfig, correct_ranks, make_bandit, make_token_env
from toy_envs.optim import SeedOptimizer
from toy_envs.policies import TabularTokenPolicy


def test_bandit_shapes_rewards_and_metrics():
    policy, task = make_bandit(BanditConfig(n_arms=50, n_prompts=8, n_seeds=3, n_correct=3))
    tokens = policy.sample(16, torch.Generator().manual_seed(0))
    assert tokens.shape == (3, 8, 16, 1)
    r = task.reward(tokens, torch.Generator())
    assert set(r.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(r > 0, task.correct.gather(-1, tokens[..., 0]))
    assert int(task.correct.sum(-1).unique()) == 3
    m = task.evaluate(policy, (1, 8), 64)
    assert torch.all(m["pass@8"] >= m["pass@1"]) and torch.all((m["pass@1"] > 0) & (m["pass@8"] <= 1))


def test_bernoulli_bandit_and_regimes():
    _, task = make_bandit(BanditConfig(n_arms=20, n_prompts=4, n_seeds=2, reward="bernoulli"))
    assert task.success is not None and task.success.shape == (2, 4, 20)
    assert correct_ranks(3, 2, 100, "correlated") == sorted(set(correct_ranks(3, 2, 100, "correlated")))
    assert correct_ranks(2, 1, 10, "anti") == [8, 9]
    assert correct_ranks(2, 1, 10, "uncorrelated") is None
    with pytest.raises(ValueError):
        correct_ranks(10, 1, 10, "correlated")


def test_sgd_step_on_tabular_bandit_is_exactly_lr_times_logit_update():
    """The loop's loss (sum over prompts of the per-prompt sample mean) gives dz = lr * logit_update."""
    policy, _ = make_bandit(BanditConfig(n_arms=30, n_prompts=5, n_seeds=2))
    tokens = policy.sample(8, torch.Generator().manual_seed(1))
    adv = torch.randn(2, 5, 8)
    z0 = policy.logits.detach().clone()
    # per-position contributions are n times entropy_change_contributions (N = n -> N = 1)
    c = policy.contributions(tokens, adv.unsqueeze(-1), "pg")[..., 0]
    torch.testing.assert_close(c, 8 * entropy_change_contributions(z0, tokens[..., 0], adv, "pg").float())
    lp, _ = policy.forward(tokens)
    n_tok, scale = 5 * 8, 5.0
    (-(adv.unsqueeze(-1) * lp).sum() / n_tok * scale).backward()
    opt = SeedOptimizer(policy.parameters(), "sgd", lr=0.01)
    opt.step()
    expected = 0.01 * logit_update(z0, tokens[..., 0], adv, rule="pg")
    torch.testing.assert_close(policy.logits.detach() - z0, expected, atol=1e-6, rtol=1e-4)


def test_npg_preconditioning_matches_logit_update_up_to_a_shift():
    policy, _ = make_bandit(BanditConfig(n_arms=12, n_prompts=3, n_seeds=2))
    tokens = policy.sample(6, torch.Generator().manual_seed(2))
    adv = torch.randn(2, 3, 6)
    z0 = policy.logits.detach().clone()
    lp, _ = policy.forward(tokens)
    (-(adv.unsqueeze(-1) * lp).sum() / 18 * 3).backward()
    policy.precondition_npg()
    SeedOptimizer(policy.parameters(), "sgd", lr=0.01).step()
    dz = policy.logits.detach() - z0
    expected = 0.01 * logit_update(z0, tokens[..., 0], adv, rule="npg")
    diff = dz - expected
    torch.testing.assert_close(diff, diff[..., :1].expand_as(diff), atol=1e-5, rtol=1e-4)  # constant shift


@pytest.mark.parametrize("kind", ["tabular", "neural"])
def test_token_env_sampling_rewards_and_states(kind):
    policy, task = make_token_env(TokenConfig(vocab=8, seq_len=3, n_prompts=4, n_seeds=2, policy=kind))
    tokens = policy.sample(10, torch.Generator().manual_seed(0))
    assert tokens.shape == (2, 4, 10, 3) and int(tokens.max()) < 8
    r = task.reward(tokens, torch.Generator())
    # answers themselves are rewarded, and all answers of a prompt are distinct
    assert bool((task.reward(task.answers, torch.Generator()) == 1).all())
    first = task.answers[..., 0]  # distinct first tokens -> distinct answers
    assert bool((first.sort(-1).values.diff(dim=-1) != 0).all())
    assert r.shape == (2, 4, 10)
    counts = policy.visit_counts(tokens)
    assert torch.all(counts[..., 0] == 10)  # the empty prefix is shared by all samples of a prompt
    lp, ent = policy.forward(tokens, with_entropy=True)
    assert lp.shape == ent.shape == tokens.shape and lp.requires_grad
    m = task.evaluate(policy, (1, 4), 16)
    assert torch.all((m["pass@1"] > 0) & (m["pass@1"] <= m["pass@4"]))


def test_tabular_token_prefix_ids_are_unique_per_prefix():
    g = torch.Generator().manual_seed(0)
    policy = TabularTokenPolicy.zipf(1, 1, 3, 3, 1.0, g)
    all_seqs = torch.cartesian_prod(*[torch.arange(3)] * 3).reshape(1, 1, 27, 3)
    ids = policy.prefix_ids(all_seqs)
    assert int(ids.max()) == policy.n_prefixes - 1 == 12
    assert ids[..., 2].unique().numel() == 9 and ids[..., 1].unique().numel() == 3
    assert bool((ids[..., 0] == 0).all())
    # sequence probabilities of a tabular policy sum to one
    assert abs(float(policy.sequence_log_prob(all_seqs).exp().sum()) - 1.0) < 1e-5


def test_seed_optimizer_skips_inactive_seeds_including_adam_state():
    p = torch.zeros(3, 4, requires_grad=True)
    opt = SeedOptimizer([p], "adam", lr=0.1)
    p.grad = torch.ones(3, 4)
    opt.step(torch.tensor([True, False, True]))
    assert bool((p[1] == 0).all()) and bool((p[0] != 0).all())
    assert bool((opt.m[0][1] == 0).all()) and float(opt.steps[1]) == 0
    ref = torch.zeros(4, requires_grad=True)
    torch_opt = torch.optim.Adam([ref], lr=0.1)
    ref.grad = torch.ones(4)
    torch_opt.step()
    torch.testing.assert_close(p[0].detach(), ref.detach())


def test_experiments_cli_lists_all_experiments(capsys):
    from toy_envs.experiments import EXPERIMENTS
    from toy_envs.experiments.__main__ import main

    assert set(EXPERIMENTS) == {"theory-vs-practice", "collapse", "schedule-control", "schedule-study", "baselines"}
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--fast" in capsys.readouterr().out


def test_exact_sampling_metrics_hand_computed():
    from toy_envs.envs import exact_sampling_metrics

    answer_probs = torch.tensor([[[0.5, 0.25, 0.0]]], dtype=torch.float64)  # [S=1, P=1, X=3]
    m = exact_sampling_metrics(answer_probs.sum(-1), answer_probs, ks=(1, 2), n_eval=2)
    assert m["pass@1"].item() == pytest.approx(0.75)
    assert m["pass@2"].item() == pytest.approx(1 - 0.25**2)
    assert m["distinct"].item() == pytest.approx((1 - 0.5**2) + (1 - 0.75**2))


def test_row_blocks_cover_every_row_in_whole_simd_multiples():
    from toy_envs.policies import row_blocks

    for n_rows, row_len, chunk in [(1000, 100, 6400), (100, 1000, 65536), (7, 3, 1), (5, 1000, 10**6), (9, 24, 100)]:
        blocks = row_blocks(n_rows, row_len, chunk)
        assert [i for b in blocks for i in range(b.start, b.stop)] == list(range(n_rows))
        if chunk >= n_rows * row_len:
            assert len(blocks) == 1
        for b in blocks[:-1]:  # every block but the last: whole multiples of 64 elements where it holds enough rows
            rows = b.stop - b.start
            assert (rows * row_len) % 64 == 0 or rows < 64 // math.gcd(row_len, 64)
            assert rows * row_len <= max(chunk, row_len)
    assert [b.stop - b.start for b in row_blocks(1000, 100, 6400)] == [64] * 15 + [40]
    with pytest.raises(ValueError, match="chunk_elements"):
        row_blocks(4, 4, 0)


def _policy_of(kind: str):
    if kind == "bandit":
        policy, _ = make_bandit(BanditConfig(n_arms=40, n_prompts=6, n_seeds=3))
    else:
        policy, _ = make_token_env(TokenConfig(vocab=6, seq_len=3, n_prompts=5, n_seeds=3, policy=kind))
    if hasattr(policy, "chunk_elements"):
        policy.chunk_elements = 64  # several blocks
    return policy


@pytest.mark.parametrize("kind", ["bandit", "tabular", "neural"])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_forward_leaves_gives_forward_values_and_its_autograd_gradients_bit_for_bit(kind, with_entropy):
    """The cut graph (loss -> lp, H leaves -> parameters, block by block) gives the very gradient of
    back-propagating through forward(); with .grad already set it accumulates."""
    policy = _policy_of(kind)
    g = torch.Generator().manual_seed(3)
    tokens = policy.sample(7, g)
    w, u = torch.randn(tokens.shape, generator=g), torch.randn(tokens.shape, generator=g)

    def loss(lp, ht):
        out = (w * lp).sum() * 0.37
        return out + (u * ht).sum() if ht is not None else out

    lp, ht = policy.forward(tokens, with_entropy=with_entropy)
    loss(lp, ht).backward()
    ref = [p.grad.clone() for p in policy.parameters()]
    for p in policy.parameters():
        p.grad = None
    lp2, ht2, backward = policy.forward_leaves(tokens, with_entropy=with_entropy)
    assert torch.equal(lp2, lp.detach()) and lp2.requires_grad
    assert (ht2 is None) == (not with_entropy)
    if with_entropy:
        assert torch.equal(ht2, ht.detach())
    loss(lp2, ht2).backward()
    backward()
    for p, r in zip(policy.parameters(), ref):
        assert torch.equal(p.grad, r)
    lp3, ht3, backward = policy.forward_leaves(tokens, with_entropy=with_entropy)
    loss(lp3, ht3).backward()
    backward()
    for p, r in zip(policy.parameters(), ref):
        assert torch.equal(p.grad, r + r)


@pytest.mark.parametrize("kind", ["bandit", "tabular"])
def test_block_wise_statistics_equal_the_whole_batch(kind):
    """entropy, contributions, bonus contributions and the npg preconditioning: one row per block = one block."""
    policies = [_policy_of(kind) for _ in range(2)]
    policies[0].chunk_elements, policies[1].chunk_elements = 1, 10**9
    tokens = policies[0].sample(5, torch.Generator().manual_seed(4))
    adv = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(5))
    out = []
    for policy in policies:
        lp, _ = policy.forward(tokens)
        (adv * lp).sum().backward()
        policy.precondition_npg()
        out.append([policy.entropy(tokens), policy.contributions(tokens, adv, "pg"),
                    policy.contributions(tokens, adv, "npg"), policy.bonus_contributions(tokens, adv, "npg"),
                    policy.parameters()[0].grad])
    for a, b in zip(*out):
        assert a.shape == b.shape and torch.equal(a, b)
    assert out[0][0].dtype == torch.float64 and out[0][1].dtype == torch.float32


def test_bandit_sampling_draws_what_multinomial_draws_on_the_whole_batch():
    """Block-wise sampling is torch.multinomial of every row in order: the same arms, the generator left in the
    same state, and (a check that fails for a wrong sampler) frequencies that match pi."""
    policy, _ = make_bandit(BanditConfig(n_arms=50, n_prompts=16, n_seeds=3))
    policy.chunk_elements = 100  # two rows per block
    probs = torch.softmax(policy.logits.detach(), -1).reshape(-1, 50)
    for n in (1, 8):
        g_blocks, g_whole = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        arms = policy.sample(n, g_blocks)
        assert arms.shape == (3, 16, n, 1)
        assert torch.equal(arms.reshape(-1, n), torch.multinomial(probs, n, replacement=True, generator=g_whole))
        assert torch.equal(g_blocks.get_state(), g_whole.get_state())
    small, _ = make_bandit(BanditConfig(n_arms=5, n_prompts=2, n_seeds=1, n_correct=1, n_wrong=1))
    small.chunk_elements = 5  # one row per block
    n = 20000
    arms = small.sample(n, torch.Generator().manual_seed(6))[..., 0]  # [1, 2, n]
    freq = torch.nn.functional.one_hot(arms, 5).double().mean(2)
    pi = small.probabilities().double()
    sigma = (pi * (1 - pi) / n).sqrt()
    assert bool(((freq - pi).abs() <= 5 * sigma + 1e-12).all()), (freq, pi)


def test_bandit_evaluate_block_wise_equals_the_whole_batch_formula():
    from toy_envs.envs import exact_sampling_metrics

    for reward in ("correct-set", "bernoulli"):
        policy, task = make_bandit(BanditConfig(n_arms=40, n_prompts=8, n_seeds=3, reward=reward))
        policy.chunk_elements = 80
        got = task.evaluate(policy, (1, 4), 16)
        pi = torch.softmax(policy.logits.detach(), -1).double()
        rate = task.correct.double() if task.success is None else task.success.double()
        ref = exact_sampling_metrics((pi * rate).sum(-1), pi * task.correct.double(), (1, 4), 16)
        assert set(got) == set(ref) == {"pass@1", "pass@4", "distinct"}
        for k in ref:
            assert torch.equal(got[k], ref[k]), k


def test_sgd_in_place_blocks_equal_the_plain_update(monkeypatch):
    import toy_envs.optim as optim

    monkeypatch.setattr(optim, "SGD_BLOCK_ELEMENTS", 7)  # many blocks, a ragged last one
    g = torch.Generator().manual_seed(0)
    start, grad = torch.randn(3, 50, generator=g), torch.randn(3, 50, generator=g)
    expected = start - 0.3 * grad
    p = start.clone().requires_grad_(True)
    p.grad = grad.clone()
    SeedOptimizer([p], "sgd", lr=0.3).step()
    assert torch.equal(p.detach(), expected)
    q = start.clone().requires_grad_(True)
    q.grad = grad.clone()
    SeedOptimizer([q], "sgd", lr=0.3).step(torch.tensor([True, False, True]))
    assert torch.equal(q.detach()[[0, 2]], expected[[0, 2]]) and torch.equal(q.detach()[1], start[1])
