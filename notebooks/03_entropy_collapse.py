# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 — Entropy collapse under vanilla GRPO
#
# Notebooks 01-02 showed what one policy-gradient step does to the entropy of a softmax policy. Here we
# let vanilla GRPO run for a hundred steps on the environments of `toy_envs` and watch the consequence
# that motivates the whole project: **entropy collapses and performance saturates**.
#
# GRPO samples $G$ responses per prompt, scores them $r \in \{+1, -1\}$ and trains on the group-normalised
# advantage $A = (r - \bar r)/(\mathrm{std}(r) + 10^{-6})$. To first order one step of size $\eta$ changes
# the entropy of a tabular softmax policy by (Cui et al. 2025, arXiv 2505.22617; docs/theory.md §2)
#
# $$\Delta H \approx -\eta\, \mathrm{Cov}_{a\sim\pi}\big(\log \pi(a),\ \pi(a)\,A(a)\big).$$
#
# When the rewarded answers are the ones the policy already finds likely, high $\log\pi$ goes with high
# advantage, the covariance is positive and entropy falls, step after step. Two things then stop the
# learning:
#
# * **collapse** — the policy puts its mass on a single correct answer per prompt, so sampling more
#   (pass@k for large $k$) finds nothing new: diversity is traded for pass@1;
# * **saturation** — once every sample in a group gets the same reward, $A = 0$ and the group carries no
#   signal; where the correct answers are rare, most groups are all wrong and never produce a gradient.
#
# Cui et al. observe that along such runs performance and entropy obey $R = -a\,e^{H} + b$: performance is
# bought with entropy, and the ceiling reached when the entropy is spent ($H = 0$) is $b - a$. We fit that
# law on our own curves at the end.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from scipy.optimize import curve_fit

from toy_envs import BanditConfig, TokenConfig, TrainConfig, make_bandit, make_token_env, train

sns.set_theme(style="whitegrid", context="notebook")
torch.manual_seed(0)
STEPS = 100

# %% [markdown]
# ## Three environments
# * **bandit, correlated** — 100 arms per prompt ("answers") with a Zipf-shaped prior like a pretrained
#   model's; 4 correct arms, the likeliest of them just below the two likeliest (wrong) arms, the others
#   of decreasing prior probability: the pretrained-model picture;
# * **bandit, uncorrelated** — 1000 arms, the 4 correct ones drawn at random: correct answers are rare;
# * **token task** — an autoregressive policy over 8 tokens, responses of 3 tokens, a softmax per prefix;
#   3 correct sequences per prompt, correlated with the prior.
#
# Each is batched over 4 independent seeds; SGD with learning rate 1, $G = 8$ samples per prompt, and the
# exact pass@k of the current policy evaluated at every step (`task.evaluate`).

# %%
envs = {
    "bandit K=100, correlated": make_bandit(BanditConfig(n_arms=100, n_prompts=64, n_seeds=4), seed=0),
    "bandit K=1000, uncorrelated": make_bandit(
        BanditConfig(n_arms=1000, n_prompts=32, n_seeds=4, regime="uncorrelated"), seed=0),
    "token V=8 L=3": make_token_env(TokenConfig(vocab=8, seq_len=3, n_prompts=32, n_seeds=4), seed=0),
}
results, n_prompts = {}, {}
t0 = time.perf_counter()
for name, (policy, task) in envs.items():
    cfg = TrainConfig(steps=STEPS, lr=1.0, optimizer="sgd", method="vanilla", estimator="grpo",
                      eval_ks=(1, 8, 64), eval_every=1, seed=0)
    results[name] = train(policy, task, cfg)
    n_prompts[name] = policy.n_prompts
print(f"trained {len(envs)} environments x 4 seeds x {STEPS} steps in {time.perf_counter() - t0:.1f} s")

# %%
rows = []
for name, res in results.items():
    curves = {
        "entropy (nats)": res.mean("entropy"),
        "pass@1": res.mean("pass@1"),
        "pass@64": res.mean("pass@64"),
        "distinct correct in 64 samples": res.mean("distinct"),
        "groups without signal": res.mean("zero_signal_groups") / n_prompts[name],
    }
    for metric, values in curves.items():
        rows += [{"environment": name, "metric": metric, "step": t, "value": v} for t, v in enumerate(values)]
long = pd.DataFrame(rows)
grid = sns.relplot(data=long, x="step", y="value", hue="environment", col="metric", kind="line",
                   col_wrap=3, height=2.8, aspect=1.2, facet_kws={"sharey": False})
grid.set_titles("{col_name}")
grid.figure.suptitle("Vanilla GRPO: entropy collapses, pass@1 saturates, diversity shrinks", y=1.02)
plt.show()

summary = pd.DataFrame({
    name: {
        "entropy start": res.mean("entropy")[0],
        "entropy end": res.history["entropy_after"][-1].mean(),
        "pass@1 start": res.mean("pass@1")[0],
        "pass@1 end": res.final["pass@1"].mean(),
        "pass@64 start": res.mean("pass@64")[0],
        "pass@64 end": res.final["pass@64"].mean(),
        "distinct start": res.mean("distinct")[0],
        "distinct end": res.final["distinct"].mean(),
        "no-signal groups, last 10 steps": res.mean("zero_signal_groups")[-10:].mean() / n_prompts[name],
    }
    for name, res in results.items()
}).T
summary.round(3)

# %% [markdown]
# What the curves show:
#
# * Where the correct answers are likely (correlated bandit, token task) entropy falls by more than 80%
#   within a hundred steps, pass@1 climbs above 0.9 and stays there, and the number of *distinct* correct
#   answers a prompt yields in 64 samples drops towards 1: the policy has picked one answer per prompt.
#   pass@64 was already near 1 at the start — GRPO made the policy reliable, it did not make it able to
#   solve anything new.
#   The groups then stop carrying signal because every sample is *correct*: by the end more than 90% of
#   the correlated bandit's groups are all correct, and the token task follows.
# * Where the correct answers are rare (uncorrelated bandit) the entropy barely moves, and learning stalls
#   at a low pass@1 because almost every group is all wrong: no signal, no gradient.
#
# ## The collapse is what the first-order theory predicts
# `train` records, for every step, the first-order prediction of the entropy change of the update it
# applied (`predicted`, the covariance formula above summed over the batch) and the measured change on the
# same states (`measured`). We add both up from the initial entropy.
#
# On the bandits the sums follow the entropy curve itself. On the token task the sum of measured changes
# equals the sum of predictions, yet both stay above the curve. The entropy curve is the mean over the
# prefixes each new batch visits. As the policy concentrates, it visits fewer of the high-entropy
# prefixes, which lowers the batch mean beyond what any single update did.

# %%
fig, axes = plt.subplots(1, 3, figsize=(14, 3.4))
for ax, (name, res) in zip(axes, results.items()):
    h = res.history["entropy"].mean(1)
    summed = {key: h[0] + np.concatenate([[0.0], np.cumsum(res.history[key].mean(1))[:-1]])
              for key in ("measured", "predicted")}
    ax.plot(h, lw=2.5, alpha=0.6, label="batch entropy")
    ax.plot(summed["measured"], "-", lw=1, label=r"$H_0 + \sum$ measured changes (same states)")
    ax.plot(summed["predicted"], "--", label=r"$H_0 + \sum$ first-order predictions")
    ax.set(title=name, xlabel="step", ylabel="entropy (nats)")
    frac = float(np.mean(res.history["predicted"] < 0))
    ax.text(0.98, 0.95, f"predicted dH < 0 on {frac:.0%} of seed-steps", transform=ax.transAxes,
            ha="right", va="top", fontsize=8)
axes[0].legend(fontsize=7)
plt.tight_layout()
plt.show()
tok_res = results["token V=8 L=3"]
print("token task, sum of measured / predicted changes:",
      round(float(tok_res.history["measured"].mean(1).sum()), 4), "/",
      round(float(tok_res.history["predicted"].mean(1).sum()), 4))

# %% [markdown]
# ## The empirical law $R = -a\,e^{H} + b$
# Cui et al. fit the validation performance $R$ against the policy entropy $H$ along a run. We do the same
# with the exact pass@1 of the training prompts as $R$ (one point per step, mean over seeds), twice:
#
# 1. on the whole curve, to see whether the functional form describes it ($R^2$);
# 2. on the **early, high-entropy part only** (the steps before entropy has fallen below 60% of its initial
#    value; the first third of the run where it never does), then extrapolate: $b - a\,e^{H_\mathrm{end}}$
#    predicts the performance at the final entropy, and $b - a$ the ceiling reached when the entropy is
#    spent. This is the sense in which the law "predicts" saturation.

# %%
def law(h, a, b):
    return -a * np.exp(h) + b


fits, scatter = {}, []
for name, res in results.items():
    h, r = res.mean("entropy"), res.mean("pass@1")
    (a, b), _ = curve_fit(law, h, r, p0=(0.1, 1.0))
    r2 = 1 - np.sum((r - law(h, a, b)) ** 2) / np.sum((r - r.mean()) ** 2)
    below = np.nonzero(h < 0.6 * h[0])[0]
    k = int(below[0]) if below.size else STEPS // 3
    (ae, be), _ = curve_fit(law, h[:k], r[:k], p0=(0.1, 1.0))
    h_end, r_end = float(res.history["entropy_after"][-1].mean()), float(res.final["pass@1"].mean())
    fits[name] = {"a": a, "b": b, "R2 (all steps)": r2, "early steps used": k, "a (early)": ae, "b (early)": be,
                  "early fit at final H": law(h_end, ae, be), "final pass@1": r_end, "ceiling b-a (early)": be - ae}
    scatter.append(pd.DataFrame({"environment": name, "entropy": h, "pass@1": r,
                                 "steps": np.where(np.arange(STEPS) < k, "early (fitted)", "later")}))
fits = pd.DataFrame(fits).T
points = pd.concat(scatter)

grid = sns.relplot(data=points, x="entropy", y="pass@1", col="environment", hue="steps", style="steps",
                   height=3.2, facet_kws={"sharex": False, "sharey": False}, s=18,
                   palette={"early (fitted)": "tab:blue", "later": "tab:gray"})
for ax, name in zip(grid.axes.flat, results):
    hs = np.linspace(0, points.loc[points.environment == name, "entropy"].max(), 100)
    f = fits.loc[name]
    ax.plot(hs, law(hs, f["a"], f["b"]), "k-", lw=1, label=f"fit, all steps: a={f['a']:.3f}, b={f['b']:.2f}")
    ax.plot(hs, law(hs, f["a (early)"], f["b (early)"]), "r--", lw=1, label="fit, early steps only")
    lines = [h for h in ax.get_lines() if h.get_label().startswith("fit")]
    ax.legend(handles=lines, fontsize=7, loc="lower left")
grid.set_titles("{col_name}")
grid.figure.suptitle(r"$R = -a\,e^{H} + b$ fitted on our own GRPO curves", y=1.03)
plt.show()
fits.round(3)

# %% [markdown]
# The exponential law describes all three curves closely ($R^2 > 0.95$), including the uncorrelated bandit
# that saturates at a low pass@1 with its entropy almost intact. Fitted on the early high-entropy steps only,
# it predicts the final pass@1 of all three runs to within about a tenth: once a run is on this
# curve, its end point is fixed by how much entropy is left to spend. That is the argument for *controlling*
# the entropy instead of letting it collapse — notebook 04.

# %%
corr, unc, tok = results.values()
for res in (corr, tok):  # collapse: entropy < 20% of its start, pass@1 saturated, diversity lost
    assert res.history["entropy_after"][-1].mean() < 0.2 * res.mean("entropy")[0]
    assert res.final["pass@1"].mean() > 0.9
    assert res.final["distinct"].mean() < 0.75 * res.mean("distinct")[0]
# saturation where correct answers are rare: entropy barely moves, most groups carry no signal
assert unc.history["entropy_after"][-1].mean() > 0.8 * unc.mean("entropy")[0]
assert unc.mean("zero_signal_groups")[-10:].mean() / n_prompts["bandit K=1000, uncorrelated"] > 0.8
assert unc.final["pass@1"].mean() < 0.3
# first-order theory: the summed predictions match the summed measured changes (within 10%)
for res in results.values():
    total_m, total_p = res.history["measured"].mean(1).sum(), res.history["predicted"].mean(1).sum()
    assert abs(total_p - total_m) < 0.1 * abs(total_m)
# the law fits, and the early fit predicts the final performance of the collapsing runs
assert (fits["R2 (all steps)"] > 0.95).all()
for name in results:
    assert abs(fits.loc[name, "early fit at final H"] - fits.loc[name, "final pass@1"]) < 0.15
