import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotheory.advantages import ESTIMATORS, compute_advantages, compute_group_advantages

rewards_st = st.integers(1, 5).flatmap(
    lambda p: st.integers(2, 8).flatmap(
        lambda g: st.lists(st.lists(st.sampled_from([-1.0, 0.0, 0.5, 1.0]), min_size=g, max_size=g),
                           min_size=p, max_size=p)
    )
)


def test_known_values():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    grpo, info = compute_advantages(r, "grpo")
    std = torch.tensor([1.0, 0, 0, 1]).std(unbiased=True)
    assert torch.allclose(grpo[0], (torch.tensor([1.0, 0, 0, 1]) - 0.5) / (std + 1e-6))
    assert torch.equal(grpo[1], torch.zeros(4))
    assert info["zero_signal_groups"] == 1 and info["num_groups"] == 2 and info["group_size"] == 4
    dr, _ = compute_advantages(r, "dr-grpo")
    assert torch.allclose(dr[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    rloo, _ = compute_advantages(r, "rloo")
    # r_0 - mean(r_1, r_2, r_3) = 1 - 1/3
    assert rloo[0, 0].item() == pytest.approx(2 / 3) and rloo[0, 1].item() == pytest.approx(-2 / 3)
    rf, _ = compute_advantages(r, "reinforce-baseline")
    assert torch.allclose(rf, r - 0.75)  # batch-mean baseline keeps the all-correct group's signal
    released, _ = compute_advantages(r, "reinforce")
    assert torch.equal(released, r)  # the Entrocraft release's REINFORCE baseline: the raw reward
    # TRL scale_rewards="batch": group baseline, one unbiased std over the 8 rewards (6 ones, 2 zeros)
    batch_std = (6 * 0.25**2 + 2 * 0.75**2) / 7
    bs, _ = compute_advantages(r, "grpo-batch-std", eps=1e-4)
    assert torch.allclose(bs[0], (torch.tensor([1.0, 0, 0, 1]) - 0.5) / (batch_std**0.5 + 1e-4))
    assert torch.equal(bs[1], torch.zeros(4))
    raw, _ = compute_advantages(r, "raw")
    assert torch.equal(raw, r)


def test_group_of_one_and_one_dim():
    adv, info = compute_advantages(torch.tensor([[2.0], [-1.0]]), "grpo")
    assert torch.allclose(adv, torch.tensor([[2.0], [-1.0]]) / (1 + 1e-6))  # verl: mean 0, std 1
    assert info["zero_signal_groups"] == 0
    a1, _ = compute_advantages(torch.tensor([1.0, 0.0, 1.0]), "dr-grpo")
    assert a1.shape == (3,) and torch.allclose(a1, torch.tensor([1 / 3, -2 / 3, 1 / 3]))
    ints, _ = compute_advantages(torch.tensor([[1, 0], [0, 0]]), "grpo")
    assert ints.dtype == torch.float32 and ints[1].abs().sum() == 0


@given(rewards_st, st.sampled_from(ESTIMATORS))
@settings(max_examples=80, deadline=None)
def test_estimator_invariants(rows, estimator):
    r = torch.tensor(rows, dtype=torch.float64)
    adv, info = compute_advantages(r, estimator)
    assert adv.shape == r.shape and adv.dtype == torch.float64 and torch.isfinite(adv).all()
    flat = (r == r[:, :1]).all(-1)
    assert info["zero_signal_groups"] == int(flat.sum())
    if estimator in ("grpo", "grpo-batch-std", "dr-grpo", "rloo"):
        assert torch.allclose(adv.sum(-1), torch.zeros(r.shape[0], dtype=torch.float64), atol=1e-9)
        assert (adv[flat] == 0).all()
        # order-preserving within a group: better reward, larger advantage
        diff_r = r.unsqueeze(-1) - r.unsqueeze(-2)
        diff_a = adv.unsqueeze(-1) - adv.unsqueeze(-2)
        assert ((diff_r > 0) <= (diff_a > 0)).all()
    if estimator == "grpo":
        ok = ~flat
        if ok.any():
            assert torch.allclose(adv[ok].std(-1, unbiased=True), torch.ones(int(ok.sum()), dtype=torch.float64),
                                  atol=1e-4)
    if estimator == "reinforce-baseline":
        assert abs(float(adv.sum())) < 1e-9
    if estimator in ("reinforce", "raw"):
        assert torch.equal(adv, r)


def test_bad_input():
    with pytest.raises(ValueError, match="unknown estimator"):
        compute_advantages(torch.ones(2, 2), "ppo")
    with pytest.raises(TypeError, match="torch.Tensor"):
        compute_advantages([[1.0, 0.0]], "grpo")
    with pytest.raises(ValueError, match="NaN"):
        compute_advantages(torch.tensor([[1.0, float("nan")]]), "grpo")
    with pytest.raises(ValueError, match=r"\[P, G\]"):
        compute_advantages(torch.ones(2, 2, 2), "grpo")
    with pytest.raises(ValueError, match="empty"):
        compute_advantages(torch.ones(0, 3), "grpo")
    with pytest.raises(ValueError, match="eps"):
        compute_advantages(torch.ones(2, 2), "grpo", eps=0.0)


@pytest.mark.parametrize("shape", [(3, 1), (2, 4), (5,)])
def test_no_tensor_is_made_on_the_default_device(shape):
    """Groups of one included: every tensor is created on the rewards' device. With the default device
    set to 'meta', a tensor made without ``device=`` would be a meta tensor and mixing it with the CPU
    rewards raises."""
    r = torch.arange(float(torch.Size(shape).numel())).reshape(shape) % 3
    for estimator in ESTIMATORS:
        expected, _ = compute_advantages(r, estimator)
        with torch.device("meta"):
            adv, _ = compute_advantages(r, estimator)
        assert adv.device.type == "cpu" and torch.equal(adv, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_groups_of_one_on_cuda():
    r = torch.tensor([[2.0], [-1.0]], device="cuda")
    adv, info = compute_advantages(r, "grpo")
    assert adv.device == r.device and info["zero_signal_groups"] == 0


def test_unequal_groups_by_uid_hand_computed():
    """Groups of sizes 3, 1 and 2, interleaved, ids as strings (verl's uid): values by hand."""
    r = torch.tensor([1.0, 5.0, 0.0, 2.0, 0.0, 4.0])
    uid = np.array(["a", "b", "a", "c", "a", "c"], dtype=object)
    adv, info = compute_group_advantages(r, uid, "grpo")
    std_a = (((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2) ** 0.5  # group a = [1, 0, 0], mean 1/3
    std_c = 2**0.5  # group c = [2, 4], mean 3
    expected = torch.tensor([(2 / 3) / (std_a + 1e-6), 5 / (1 + 1e-6), (-1 / 3) / (std_a + 1e-6),
                             -1 / (std_c + 1e-6), (-1 / 3) / (std_a + 1e-6), 1 / (std_c + 1e-6)])
    assert torch.allclose(adv, expected, atol=1e-6)
    assert info["num_groups"] == 3 and info["group_size"] == 3 and info["min_group_size"] == 1
    rloo, _ = compute_group_advantages(r, uid, "rloo")
    assert torch.allclose(rloo, torch.tensor([1.0, 5.0, -0.5, -2.0, -0.5, 2.0]))  # r_i - mean of the others
    dr, _ = compute_group_advantages(r, uid, "dr-grpo")
    assert torch.allclose(dr, torch.tensor([2 / 3, 5.0, -1 / 3, -1.0, -1 / 3, 1.0]))
    ints, _ = compute_group_advantages(r, torch.tensor([7, 3, 7, 9, 7, 9]), "grpo")
    assert torch.equal(ints, adv)


@given(rewards_st, st.sampled_from(ESTIMATORS))
@settings(max_examples=40, deadline=None)
def test_grouped_equals_rectangular_for_equal_groups(rows, estimator):
    r = torch.tensor(rows, dtype=torch.float64)
    p, g = r.shape
    perm = torch.randperm(p * g, generator=torch.Generator().manual_seed(p * 31 + g))
    uid = torch.arange(p).repeat_interleave(g)[perm]
    flat_adv, info = compute_group_advantages(r.reshape(-1)[perm], uid, estimator)
    rect, rinfo = compute_advantages(r, estimator)
    assert torch.allclose(flat_adv, rect.reshape(-1)[perm], atol=1e-12)
    assert info["zero_signal_groups"] == rinfo["zero_signal_groups"]


def test_grouped_bad_input():
    with pytest.raises(ValueError, match="one per response"):
        compute_group_advantages(torch.ones(3), torch.tensor([0, 1]), "grpo")
    with pytest.raises(ValueError, match=r"\[N\]"):
        compute_group_advantages(torch.ones(2, 2), torch.tensor([0, 1]), "grpo")
    with pytest.raises(ValueError, match="integer"):
        compute_group_advantages(torch.ones(2), torch.tensor([0.0, 1.0]), "grpo")
    with pytest.raises(ValueError, match="NaN"):
        compute_group_advantages(torch.tensor([1.0, float("nan")]), [0, 0], "grpo")
