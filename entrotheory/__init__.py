"""entrotheory: the mathematics of policy entropy under policy-gradient updates.

Pure tensor functions, no training loops and no I/O. See ``docs/theory.md``.
"""

from .advantages import ESTIMATORS, compute_advantages
from .core import (
    RULES,
    entropy,
    entropy_change_contributions,
    entropy_gradient,
    exact_entropy_change,
    expected_entropy_change,
    logit_update,
    predicted_entropy_change,
    second_order_entropy_change,
)
from .fit import LineFit, fit_measured_on_predicted
from .methods import METHODS, MethodOptions, MethodPlan, make_method, masked_token_mean
from .param_space import (
    ParamSpaceContributions,
    StepPreconditioner,
    adam_preconditioner,
    first_order_entropy_change,
    momentum_carry_factor,
    optimizer_step_direction,
    param_space_contributions,
    policy_loss_gradient,
    preconditioner_from_optimizer,
    sgd_preconditioner,
)
from .rejection import EntropyRejectionSampler, SamplerOptions, Selection
from .schedules import Band, Schedule, anchor_schedule_spec, is_relative_spec, parse_band, parse_schedule
from .state_estimate import EntropyStateEstimate, batch_entropy_variance
from .tokens import (
    TokenEntropyStats,
    token_entropy_contributions,
    token_entropy_stats,
    token_mean_contributions,
    token_mean_entropy_change,
)

__all__ = [
    "RULES",
    "entropy",
    "entropy_gradient",
    "logit_update",
    "predicted_entropy_change",
    "entropy_change_contributions",
    "expected_entropy_change",
    "second_order_entropy_change",
    "exact_entropy_change",
    "TokenEntropyStats",
    "token_entropy_stats",
    "token_entropy_contributions",
    "token_mean_entropy_change",
    "token_mean_contributions",
    "ESTIMATORS",
    "compute_advantages",
    "Schedule",
    "Band",
    "parse_schedule",
    "parse_band",
    "is_relative_spec",
    "anchor_schedule_spec",
    "EntropyRejectionSampler",
    "Selection",
    "METHODS",
    "MethodPlan",
    "MethodOptions",
    "SamplerOptions",
    "make_method",
    "masked_token_mean",
    "ParamSpaceContributions",
    "StepPreconditioner",
    "adam_preconditioner",
    "sgd_preconditioner",
    "optimizer_step_direction",
    "preconditioner_from_optimizer",
    "param_space_contributions",
    "momentum_carry_factor",
    "first_order_entropy_change",
    "policy_loss_gradient",
    "EntropyStateEstimate",
    "batch_entropy_variance",
    "LineFit",
    "fit_measured_on_predicted",
]
