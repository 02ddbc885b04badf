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
# # 01 — The entropy of a softmax policy
#
# A policy over $K$ actions with logits $z$ is $\pi = \mathrm{softmax}(z)$. Its entropy is
# $H = -\sum_a \pi_a \log \pi_a$. This notebook builds intuition for three facts
# (docs/theory.md §1-2):
#
# 1. the gradient $\partial H/\partial z_a = -\pi_a(\log\pi_a + H)$;
# 2. a logit step $\delta z$ changes entropy by $-\mathrm{Cov}_\pi(\log \pi, \delta z)$ to first order;
# 3. which samples raise or lower entropy: the sign rule of the Entrocraft paper.

# %%
import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
import torch
from IPython.display import Math, display

import entrotheory as et
from entrotheory import symbolic

sns.set_theme(style="whitegrid")
torch.manual_seed(0)

# %% [markdown]
# ## The derivation, done by sympy
# `entrotheory.symbolic` differentiates the definition of $H$ itself. For $K = 2$ sympy proves
# that the derivative equals the closed form exactly; the general-$K$ formulas are shown below.

# %%
d = symbolic.entropy_gradient_derivation(2)
print("derived - closed form, simplified:", [sympy_zero for sympy_zero in
      (__import__("sympy").simplify(a - b) for a, b in zip(d.derived, d.closed_form))])
for name, tex in symbolic.derivation_latex().items():
    print(name)
    display(Math(tex))

# %% [markdown]
# ## Entropy and its gradient along a one-parameter family
# Logits $z = \beta \cdot (1, 0.5, 0, -0.5, -1)$: $\beta = 0$ is uniform, large $\beta$ is peaked.

# %%
base = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0], dtype=torch.float64)
betas = torch.linspace(0, 6, 61, dtype=torch.float64)
h = torch.stack([et.entropy(b * base) for b in betas])
g = torch.stack([et.entropy_gradient(b * base) for b in betas])
fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
ax[0].plot(betas, h)
ax[0].set(xlabel=r"inverse temperature $\beta$", ylabel="H (nats)", title="entropy")
for a in range(5):
    ax[1].plot(betas, g[:, a], label=f"action {a}")
ax[1].set(xlabel=r"$\beta$", ylabel=r"$\partial H/\partial z_a$", title="gradient (sums to 0)")
ax[1].legend(fontsize=7)
plt.tight_layout()
plt.show()
print("max |sum of gradient|:", float(g.sum(-1).abs().max()))

# %% [markdown]
# ## Which samples raise entropy? A sweep over action probability
# Under the natural policy gradient, one sample $y$ with advantage $A$ changes entropy by
# $-\eta A(\log\pi_y + H)$: reinforcing an action likelier than the geometric mean $e^{-H}$ lowers
# entropy. Under vanilla PG the threshold is a $\pi$-weighted baseline. We sweep over all actions of a
# peaked policy (like a pretrained model's next-token distribution).

# %%
z = torch.randn(30, dtype=torch.float64) * 2.5
p = torch.softmax(z, -1)
H = float(et.entropy(z))
rows = []
for rule in ("pg", "npg"):
    for y in range(30):
        for adv in (1.0, -1.0):
            c = et.entropy_change_contributions(z, torch.tensor([y]), torch.tensor([adv], dtype=torch.float64), rule)
            rows.append({"rule": rule, "log pi(y)": float(p[y].log()), "advantage": adv, "dH per unit lr": float(c)})
import pandas as pd  # noqa: E402  (seaborn's dependency)

df = pd.DataFrame(rows)
grid = sns.relplot(data=df, x="log pi(y)", y="dH per unit lr", hue="advantage", col="rule",
                   palette={1.0: "tab:green", -1.0: "tab:red"}, height=3.2, facet_kws={"sharey": False})
for axis in grid.axes.flat:
    axis.axhline(0, color="k", lw=0.8)
    axis.axvline(-H, color="gray", ls="--", lw=0.8)
grid.figure.suptitle(f"dashed: log of the geometric mean, -H = {-H:.2f}", y=1.03)
plt.show()

# %% [markdown]
# For npg the sign flips exactly at $\log\pi_y = -H$; for pg it flips at a nearby threshold and rare
# samples barely matter (their contribution carries a factor $\pi_y$).

# %% [markdown]
# ## The covariance form, checked
# For a random step, $\langle\nabla H, \delta z\rangle = -\mathrm{Cov}_\pi(\log\pi, \delta z)$, and both match
# the exact change for a small step.

# %%
dz = torch.randn(30, dtype=torch.float64)
logp = torch.log_softmax(z, -1)
cov = float((p * logp * dz).sum() - (p * logp).sum() * (p * dz).sum())
print(f"-Cov = {-cov:+.6f}   predicted = {float(et.predicted_entropy_change(z, dz)):+.6f}   "
      f"exact(1e-4 step)/1e-4 = {float(et.exact_entropy_change(z, 1e-4 * dz)) / 1e-4:+.6f}")
assert np.isclose(-cov, float(et.predicted_entropy_change(z, dz)))
