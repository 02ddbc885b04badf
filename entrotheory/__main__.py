"""`python -m entrotheory`: a short demo of the predictor against the exact entropy change."""

from __future__ import annotations

import torch

from . import entropy, entropy_change_contributions, exact_entropy_change, logit_update


def main() -> None:
    g = torch.Generator().manual_seed(0)
    k, n = 20, 64
    logits = torch.randn(k, generator=g, dtype=torch.float64) * 2
    actions = torch.multinomial(torch.softmax(logits, -1), n, replacement=True, generator=g)
    advantages = torch.randn(n, generator=g, dtype=torch.float64)
    print(f"state: K={k} actions, entropy {float(entropy(logits)):.4f} nats, N={n} samples")
    for rule in ("pg", "npg"):
        c = entropy_change_contributions(logits, actions, advantages, rule)
        dz = logit_update(logits, actions, advantages, rule)
        print(f"rule={rule}: {int((c < 0).sum())} samples lower entropy, {int((c > 0).sum())} raise it")
        for eta in (0.1, 0.05, 0.025):
            exact = float(exact_entropy_change(logits, eta * dz))
            pred = eta * float(c.sum())
            print(f"  eta={eta:<6} predicted {pred:+.3e}  exact {exact:+.3e}  error {abs(exact - pred):.2e}")


if __name__ == "__main__":
    main()
