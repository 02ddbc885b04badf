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
# # 02 — Predicting the next step's entropy change
#
# On a batch of bandit states we take one policy-gradient step and compare three predictions with
# the exact change $H(z + \eta\,\delta z) - H(z)$: first order (`predicted_entropy_change`, error
# $O(\eta^2)$), second order (`second_order_entropy_change`, error $O(\eta^3)$), for vanilla PG and
# natural PG (docs/theory.md §1.3-1.4, §2).

# %%
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
import torch

import entrotheory as et

sns.set_theme(style="whitegrid")
g = torch.Generator().manual_seed(0)
S, K, N = 256, 12, 16  # states, actions, samples per state
logits = torch.randn(S, K, generator=g, dtype=torch.float64) * 2
probs = torch.softmax(logits, -1)
actions = torch.multinomial(probs, N, replacement=True, generator=g)
rewards = (actions < 3).double()  # actions 0..2 are "correct"
advantages = rewards - rewards.mean(-1, keepdim=True)

# %% [markdown]
# ## Predicted vs exact, per state

# %%
rows = []
for rule in ("pg", "npg"):
    dz = et.logit_update(logits, actions, advantages, rule)
    dz = dz / dz.abs().amax(-1, keepdim=True).clamp_min(1e-12)  # unit max-norm step per state
    for eta in (0.01, 0.1, 0.5):
        exact = et.exact_entropy_change(logits, eta * dz)
        first = eta * et.predicted_entropy_change(logits, dz)
        second = et.second_order_entropy_change(logits, eta * dz)
        for i in range(S):
            rows.append({"rule": rule, "eta": eta, "exact": float(exact[i]), "first order": float(first[i]),
                         "second order": float(second[i])})
df = pd.DataFrame(rows)
grid = sns.relplot(data=df, x="first order", y="exact", col="eta", row="rule", height=2.6,
                   facet_kws={"sharex": False, "sharey": False}, s=10)
for axis in grid.axes.flat:
    lo, hi = axis.get_xlim()
    axis.plot([lo, hi], [lo, hi], "k--", lw=0.8)
plt.show()

# %% [markdown]
# ## The error's order: a log-log plot
# The slope of log(error) against log(eta) is the order: 2 for first order, 3 for second order.

# %%
etas = torch.logspace(-4, -0.5, 12).tolist()
rows = []
for rule in ("pg", "npg"):
    dz = et.logit_update(logits, actions, advantages, rule)
    dz = dz / dz.abs().amax(-1, keepdim=True).clamp_min(1e-12)
    for eta in etas:
        exact = et.exact_entropy_change(logits, eta * dz)
        e1 = (exact - eta * et.predicted_entropy_change(logits, dz)).abs().mean()
        e2 = (exact - et.second_order_entropy_change(logits, eta * dz)).abs().mean()
        rows += [{"rule": rule, "eta": eta, "error": float(e1), "approximation": "first order"},
                 {"rule": rule, "eta": eta, "error": float(e2), "approximation": "second order"}]
err = pd.DataFrame(rows)
grid = sns.relplot(data=err, x="eta", y="error", hue="approximation", col="rule", kind="line", marker="o",
                   height=3)
grid.set(xscale="log", yscale="log")
plt.show()
import numpy as np  # noqa: E402

for (rule, approx), sub in err.groupby(["rule", "approximation"]):
    small = sub[sub.eta < 1e-2]
    slope = np.polyfit(np.log(small.eta), np.log(small.error), 1)[0]
    print(f"{rule:4s} {approx:13s}: fitted order {slope:.2f}")
    assert abs(slope - (2 if approx == "first order" else 3)) < 0.15

# %% [markdown]
# ## The per-sample decomposition
# `entropy_change_contributions` splits the first-order prediction into one term per sample. Their
# sum is the prediction; their signs say which samples the Entrocraft sampler should keep.

# %%
c = et.entropy_change_contributions(logits, actions, advantages, "pg")
dz = et.logit_update(logits, actions, advantages, "pg")
print("max |sum c - prediction| =", float((c.sum(-1) - et.predicted_entropy_change(logits, dz)).abs().max()))
lp = torch.log_softmax(logits, -1).gather(-1, actions)
frame = pd.DataFrame({"log pi(y)": lp.flatten(), "contribution": c.flatten(),
                      "advantage sign": np.where(advantages.flatten() > 0, "positive", "negative / zero")})
sns.scatterplot(data=frame, x="log pi(y)", y="contribution", hue="advantage sign", s=8)
plt.axhline(0, color="k", lw=0.8)
plt.show()
