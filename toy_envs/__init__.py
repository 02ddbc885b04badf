"""toy_envs: bandit and token environments where the entropy theory is checked exactly.

* :mod:`toy_envs.policies` — tabular bandit, tabular per-prefix and neural token policies,
  batched over seeds and prompts; their first-order entropy contributions come from
  :mod:`entrotheory`.
* :mod:`toy_envs.envs` — tasks with verifiable rewards and the environment constructors.
* :mod:`toy_envs.training` — one GRPO-style loop for both, with any advantage estimator and any
  entropy method of :mod:`entrotheory.methods`.
* :mod:`toy_envs.experiments` — ``python -m toy_envs.experiments NAME [--fast]``.

See ``docs/validation.md``.
"""

from .envs import REGIMES, BanditConfig, TokenConfig, make_bandit, make_token_env
from .optim import SeedOptimizer
from .policies import NeuralTokenPolicy, TabularBanditPolicy, TabularTokenPolicy
from .training import TrainConfig, TrainResult, train

__all__ = [
    "REGIMES",
    "BanditConfig",
    "TokenConfig",
    "make_bandit",
    "make_token_env",
    "SeedOptimizer",
    "TabularBanditPolicy",
    "TabularTokenPolicy",
    "NeuralTokenPolicy",
    "TrainConfig",
    "TrainResult",
    "train",
]
