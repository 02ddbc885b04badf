"""Environments, policies and the seed-batched optimiser of toy_envs."""

from __future__ import annotations

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
