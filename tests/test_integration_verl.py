"""integrations.verl and entrotheory side by side with the installed verl (0.9.1) on CPU.

Skipped where verl is not installed (``pip install -e ".[verl]"`` and ``pip install --no-deps verl==0.9.1``).
"""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
from omegaconf import OmegaConf  # noqa: E402
from verl.workers.config import FSDPActorConfig  # noqa: E402

import integrations.verl as ev  # noqa: E402
from entrotheory.advantages import compute_group_advantages  # noqa: E402
from entrotheory.methods import aggregate_loss, clipped_surrogate, make_method, sequence_log_ratio  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
UID = np.array(["p0", "p1", "p0", "p2", "p1", "p0", "p2", "p2", "p3"], dtype=object)  # sizes 3, 2, 3, 1
SCORES = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0, -1.0, 1.0])


def verl_batch(seed: int = 0, b: int = 9, t: int = 5):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(-1)).float()
    rewards = torch.zeros(b, t)
    rewards[torch.arange(b), lengths - 1] = SCORES[:b]  # verl puts the outcome score on the last token
    old = torch.log(torch.rand(b, t, generator=g) * 0.9 + 0.05)
    token_h = torch.rand(b, t, generator=g) * 2
    return rewards, mask, old, token_h


@pytest.fixture(autouse=True)
def fresh_state():
    ev.reset_controllers()
    yield
    ev.reset_controllers()


def test_grpo_and_rloo_match_verl_on_unequal_groups():
    rewards, mask, _, _ = verl_batch()
    theirs, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, UID)
    ours, _ = compute_group_advantages(rewards.sum(-1), UID, "grpo")
    assert torch.allclose(theirs, ours.unsqueeze(-1) * mask, atol=1e-6)
    theirs, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, UID, norm_adv_by_std_in_grpo=False)
    ours, _ = compute_group_advantages(rewards.sum(-1), UID, "dr-grpo")
    assert torch.allclose(theirs, ours.unsqueeze(-1) * mask, atol=1e-6)
    theirs, _ = core_algos.compute_rloo_outcome_advantage(rewards, mask, UID)
    ours, _ = compute_group_advantages(rewards.sum(-1), UID, "rloo")
    assert torch.allclose(theirs, ours.unsqueeze(-1) * mask, atol=1e-6)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_aggregation_matches_verl_agg_loss(mode):
    _, mask, old, _ = verl_batch(1)
    mask[3] = 0  # a fully masked response
    loss = torch.randn(mask.shape, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(aggregate_loss(loss, mask, mode), core_algos.agg_loss(loss, mask, mode), atol=1e-6)
    # a global count (verl's global_batch_info with dp_size 1) is the same normaliser in both
    kw = {"num_tokens": 40} if mode == "token-mean" else {"num_sequences": 12}
    verl_kw = {"batch_num_tokens": 40} if mode == "token-mean" else {"global_batch_size": 12}
    assert torch.allclose(aggregate_loss(loss, mask, mode, **kw), core_algos.agg_loss(loss, mask, mode, **verl_kw))


def actor_config(**kw):
    return FSDPActorConfig(strategy="fsdp", rollout_n=1, ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2, **kw)


@pytest.mark.parametrize("clip_ratio_c", [3.0, 10.0])
def test_dual_clip_surrogate_matches_verl_vanilla_loss(clip_ratio_c):
    _, mask, old, _ = verl_batch(3)
    g = torch.Generator().manual_seed(4)
    log_prob = old + 3.0 * torch.randn(old.shape, generator=g)  # ratios well past 1 +- eps and past c
    adv = torch.randn(old.shape, generator=g)
    cfg = actor_config(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=clip_ratio_c)
    theirs, _ = core_algos.compute_policy_loss_vanilla(old, log_prob, adv, mask, "token-mean", cfg)
    ours = aggregate_loss(clipped_surrogate(log_prob, old, adv, 0.2, 0.28, clip_ratio_c), mask, "token-mean")
    assert torch.allclose(ours, theirs, atol=1e-6)
    plain = aggregate_loss(clipped_surrogate(log_prob, old, adv, 0.2, 0.28), mask, "token-mean")
    active = (adv < 0) & ((log_prob - old).exp() > clip_ratio_c) & mask.bool()
    assert active.any() and not torch.allclose(plain, theirs)  # the dual clip is active on this batch


def test_gspo_matches_verl_gspo_loss_and_gradient():
    _, mask, old, _ = verl_batch(5)
    g = torch.Generator().manual_seed(6)
    adv = torch.randn(old.shape[0], 1, generator=g).expand(old.shape) * mask
    cfg = actor_config(clip_ratio_low=0.2, clip_ratio_high=0.28)
    lp1 = (old + 0.3 * torch.randn(old.shape, generator=g)).requires_grad_()
    lp2 = lp1.detach().clone().requires_grad_()
    theirs, _ = core_algos.compute_policy_loss_gspo(old, lp1, adv, mask, "seq-mean-token-mean", cfg)
    ours = aggregate_loss(clipped_surrogate(lp2, old, adv, 0.2, 0.28, log_ratio=sequence_log_ratio(lp2, old, mask)),
                          mask, "seq-mean-token-mean")
    assert torch.allclose(ours, theirs, atol=1e-6)
    theirs.backward()
    ours.backward()
    assert torch.allclose(lp1.grad, lp2.grad, atol=1e-7)


def band_config(**extra):
    return OmegaConf.create({"adv_estimator": "entrocraft_band",
                             "entrocraft": {"band": "linear:0.6->0.4..linear:0.7->0.5", "total_steps": 10, **extra}})


def test_registered_band_estimator_equals_entrotheory_and_keeps_its_step():
    fn = core_algos.get_adv_estimator_fn("entrocraft_band")
    rewards, mask, old, token_h = verl_batch()
    method = make_method("entrocraft-band", band="linear:0.6->0.4..linear:0.7->0.5", total_steps=10)
    base, _ = compute_group_advantages(rewards.sum(-1), UID, "grpo")
    base = base.unsqueeze(-1) * mask
    for step, h in ((1, 0.9), (2, 0.3), (3, 0.65)):  # above, below, inside the band at verl's steps 1..3
        ev.feed_batch(h, step=step, token_entropy=token_h, old_log_probs=old)
        adv, returns = fn(token_level_rewards=rewards, response_mask=mask, index=UID, config=band_config())
        expected = method.prepare(base, old, old, mask.bool(), h, step, rewards=rewards.sum(-1)).advantages
        assert torch.allclose(adv, expected) and torch.equal(adv, returns)
        diag = ev.get_controller("entrocraft_band").last_diagnostics
        assert diag["lower"] == pytest.approx(0.6 - 0.02 * step) and diag["step"] == step
    # the regimes did what the band rule says: positives only, negatives only, everything
    assert ev.get_controller("entrocraft_band").calls == 3
    # without a fed step the calls are counted from 1, like verl's global_steps; the entropy is required
    ev.reset_controllers()
    with pytest.raises(ValueError, match="needs the batch entropy"):
        fn(token_level_rewards=rewards, response_mask=mask, index=UID, config=band_config())


def test_band_regimes_on_verl_tensors():
    fn = core_algos.get_adv_estimator_fn("entrocraft_band")
    rewards, mask, old, _ = verl_batch()
    seq = rewards.sum(-1)
    for h, keep in ((0.9, seq > 0), (0.2, seq < 0)):
        ev.reset_controllers()
        ev.feed_batch(h)
        adv, _ = fn(token_level_rewards=rewards, response_mask=mask, index=UID, config=band_config())
        row = (adv != 0).any(-1)
        assert bool((row <= keep).all()) and bool(row.any())
    # exact_reference: outside the band the raw +-1 scores are trained on (the release's grpo_range)
    ev.reset_controllers()
    ev.feed_batch(0.9)
    adv, _ = fn(token_level_rewards=rewards, response_mask=mask, index=UID, config=band_config(exact_reference=True))
    assert torch.equal(adv, torch.where(seq > 0, seq, 0.0).unsqueeze(-1) * mask)


def test_predictive_estimator_state_survives_across_calls_and_checkpoints():
    fn = core_algos.get_adv_estimator_fn("entrocraft_predictive")
    cfg = OmegaConf.create({"entrocraft": {"schedule": "linear:0.65->0.45", "total_steps": 10, "lr": 1e-3}})
    rewards, mask, old, token_h = verl_batch()
    ctrl = ev.get_controller("entrocraft_predictive")
    ev.feed_batch(0.8, step=1, token_entropy=token_h, old_log_probs=old)
    fn(token_level_rewards=rewards, response_mask=mask, index=UID, config=cfg)
    k0 = ctrl.method.sampler.k
    ev.feed_batch(0.7, step=2, token_entropy=token_h, old_log_probs=old)
    fn(token_level_rewards=rewards, response_mask=mask, index=UID, config=cfg)
    assert ctrl.method.sampler.calibrator.n_obs == 1 and ctrl.method.sampler.k != k0  # observed 0.7 - 0.8
    state = ctrl.state_dict()
    ev.reset_controllers()
    restored = ev.get_controller("entrocraft_predictive")
    restored.load_state_dict(state)
    assert restored.calls == 2 and restored.method.sampler.k == ctrl.method.sampler.k
    with pytest.raises(ValueError, match="changed between steps"):
        ev.feed_batch(0.7, step=3, token_entropy=token_h, old_log_probs=old)
        fn(token_level_rewards=rewards, response_mask=mask, index=UID, config=band_config())


def test_whole_batch_clip_cov_zeroes_the_selected_tokens():
    fn = core_algos.get_adv_estimator_fn("entrocraft_grpo")
    rewards, mask, old, _ = verl_batch(7, b=9, t=40)
    cfg = OmegaConf.create({"entrocraft": {"clip_cov": {"ratio": 0.05, "lb": -10.0, "ub": 10.0}}})
    ev.feed_batch(1.0, step=1, old_log_probs=old)
    adv, _ = fn(token_level_rewards=rewards, response_mask=mask, index=UID, config=cfg)
    base, _ = compute_group_advantages(rewards.sum(-1), UID, "grpo")
    base = base.unsqueeze(-1) * mask
    zeroed = (adv == 0) & (base != 0)
    n_tok = int(mask.sum())
    assert int(zeroed.sum()) == max(int(0.05 * n_tok), 1)  # one budget over the WHOLE batch
    assert torch.equal(adv[~zeroed], base[~zeroed])


def test_trainer_mixin_feeds_verl_entropy_and_step():
    """The mixin on a stand-in for RayPPOTrainer's two hooks (the real one needs a Ray cluster)."""
    from verl import DataProto

    _, mask, old, token_h = verl_batch()

    class Base:
        config = OmegaConf.create({"actor_rollout_ref": {"actor": {"loss_agg_mode": "token-mean"}},
                                   "algorithm": {"adv_estimator": "entrocraft_band"}})
        global_steps = 4

        def _compute_old_log_prob(self, batch):
            return DataProto.from_dict({"old_log_probs": old, "entropys": token_h}), 0.0

    class Trainer(ev.EntrocraftTrainerMixin, Base):
        pass

    Trainer()._compute_old_log_prob(DataProto.from_dict({"response_mask": mask}))
    fed = ev.get_controller("entrocraft_band")._fed
    assert fed["step"] == 4 and fed["entropy"] == pytest.approx(float((token_h * mask).sum() / mask.sum()))


def test_integrations_doc_verl_example_runs():
    text = (ROOT / "docs" / "integrations.md").read_text()
    blocks = re.findall(r"<!-- verl-example -->\n```python\n(.*?)```", text, flags=re.S)
    assert blocks, "docs/integrations.md has no verl example"
    for code in blocks:
        exec(compile(code, "integrations.md[verl]", "exec"), {"__name__": "__snippet__"})
