"""Preference losses: a registry of pure functions of sequence log-probs.

Every loss takes a `PreferenceLogps` (summed response log-probs of the policy, the response
lengths, and the reference model's summed log-probs where the loss needs them) and returns

    losses:  float32 [B], one loss per pair (the train step averages them), and
    metrics: dict of float32 [B], at least `rewards/chosen`, `rewards/rejected`,
             `rewards/margins`, `rewards/accuracies`, `logps/chosen`, `logps/rejected`.

The formulas follow the papers and TRL's documentation (`DPOTrainer.dpo_loss`,
`CPOTrainer` for SimPO, `ORPOTrainer`); the implicit rewards reported are TRL's:
beta * (policy - reference) log-ratios, or beta * (average) policy log-probs for the
reference-free losses. With z the DPO margin
`(log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))`:

| name | loss per pair | reference |
|---|---|---|
| `dpo` | -(1 - eps) log s(beta z) - eps log s(-beta z)  (eps > 0: cDPO) | yes |
| `robust_dpo` | ((1 - eps)(-log s(beta z)) + eps log s(-beta z)) / (1 - 2 eps) | yes |
| `ipo` | (z - 1 / (2 beta))^2, z from length-averaged log-probs (as TRL) | yes |
| `hinge` | max(0, 1 - beta z)  (SLiC) | yes |
| `sppo_hard` | (a - 1/(2 beta))^2 + (b + 1/(2 beta))^2, a, b the chosen / rejected log-ratios | yes |
| `rpo` | dpo + alpha * (-mean log pi(y_c))  (length-normalised NLL, Pang et al. 2024) | yes |
| `dpo_reference_free` | dpo with the reference log-probs taken as 0 | no |
| `simpo` | -(1 - eps) log s(beta (avg_c - avg_r) - gamma) - eps log s(-(...)) | no |
| `orpo` | -avg_c - beta log s(log odds(y_c) - log odds(y_r)), odds(y) = p / (1 - p), p = exp(avg) | no |

Here s is the logistic sigmoid, `avg` a log-prob averaged over the response's tokens.

Each loss is `@gin.configurable`, so `gin/losses/*.gin` bind its hyper-parameters
(`dpo_loss.beta = 0.05`) and `get_loss_fn.name` picks one; `get_loss_fn("simpo", beta=2.0)`
does the same from Python.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import gin
import jax
import jax.numpy as jnp

Array = jax.Array
Metrics = dict[str, Array]
LossOutput = tuple[Array, Metrics]


class PreferenceLogps(NamedTuple):
  """Sequence log-probs of a batch of pairs (all float32 [B]).

  Attributes:
    chosen / rejected: sum over response tokens of log pi(token | prefix) under the policy.
    chosen_length / rejected_length: number of response tokens scored (>= 1 for real pairs).
    ref_chosen / ref_rejected: the same sums under the reference model (None when the loss is
      reference-free).
  """

  chosen: Array
  rejected: Array
  chosen_length: Array
  rejected_length: Array
  ref_chosen: Optional[Array] = None
  ref_rejected: Optional[Array] = None

  @property
  def chosen_mean(self) -> Array:
    return self.chosen / jnp.maximum(self.chosen_length, 1.0)

  @property
  def rejected_mean(self) -> Array:
    return self.rejected / jnp.maximum(self.rejected_length, 1.0)


@dataclasses.dataclass(frozen=True)
class LossSpec:
  name: str
  fn: Callable[..., LossOutput]
  needs_reference: bool


LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, needs_reference: bool = True):
  """Decorator adding a loss `fn(logps, **hparams) -> (losses, metrics)` to `LOSSES`."""
  def wrap(fn):
    if name in LOSSES:
      raise ValueError(f"A preference loss named {name!r} is already registered.")
    LOSSES[name] = LossSpec(name, fn, needs_reference)
    return fn
  return wrap


@dataclasses.dataclass(frozen=True)
class PreferenceLoss:
  """A registered loss with its hyper-parameters bound: `loss(logps) -> (losses, metrics)`."""

  name: str
  fn: Callable[..., LossOutput]
  needs_reference: bool
  hparams: tuple[tuple[str, Any], ...] = ()

  def __call__(self, logps: PreferenceLogps) -> LossOutput:
    if self.needs_reference and (logps.ref_chosen is None or logps.ref_rejected is None):
      raise ValueError(f"The {self.name!r} loss needs reference log-probs (ref_chosen_logps, "
                       "ref_rejected_logps); compute them once per round with "
                       "eva_jax.solver.reference_logps, or pick a reference-free loss.")
    return self.fn(logps, **dict(self.hparams))


@gin.configurable
def get_loss_fn(name: str = "dpo", **hparams) -> PreferenceLoss:
  """The registered loss `name`, with `hparams` overriding its (gin-bound) defaults."""
  if name not in LOSSES:
    raise ValueError(f"Unknown preference loss {name!r}; registered losses: "
                     f"{', '.join(sorted(LOSSES))}.")
  spec = LOSSES[name]
  return PreferenceLoss(name, spec.fn, spec.needs_reference, tuple(sorted(hparams.items())))


def loss_names() -> list[str]:
  return sorted(LOSSES)


# --------------------------------------------------------------------------------------------
# Helpers.


def _check(name: str, beta: float, label_smoothing: float = 0.0, max_smoothing: float = 1.0):
  if not beta > 0:
    raise ValueError(f"{name}: beta must be > 0, got {beta}.")
  if not 0.0 <= label_smoothing < max_smoothing:
    raise ValueError(f"{name}: label_smoothing must be in [0, {max_smoothing}), got "
                     f"{label_smoothing}.")


def _logratios(logps: PreferenceLogps) -> tuple[Array, Array]:
  """(chosen, rejected) policy-minus-reference summed log-ratios [B]."""
  return logps.chosen - logps.ref_chosen, logps.rejected - logps.ref_rejected


def _smoothed_sigmoid_loss(logits: Array, label_smoothing: float) -> Array:
  """-(1 - eps) log s(x) - eps log s(-x): the Bernoulli cross-entropy with noisy labels."""
  loss = -jax.nn.log_sigmoid(logits)
  if label_smoothing:
    loss = loss * (1.0 - label_smoothing) - jax.nn.log_sigmoid(-logits) * label_smoothing
  return loss


def _metrics(chosen_rewards: Array, rejected_rewards: Array, logps: PreferenceLogps,
             **extra: Array) -> Metrics:
  chosen_rewards = chosen_rewards.astype(jnp.float32)
  rejected_rewards = rejected_rewards.astype(jnp.float32)
  out = {
      "rewards/chosen": chosen_rewards,
      "rewards/rejected": rejected_rewards,
      "rewards/margins": chosen_rewards - rejected_rewards,
      # Strict, as TRL: a tie is not a correct preference.
      "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32),
      "logps/chosen": logps.chosen,
      "logps/rejected": logps.rejected,
  }
  out.update(extra)
  return out


def _log1mexp(x: Array) -> Array:
  """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012)."""
  x = jnp.minimum(x, -1e-7)  # exp(0) = 1 would give log(0); an average log-prob is < 0
  return jnp.where(x > -jnp.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


# --------------------------------------------------------------------------------------------
# Losses with a reference model.


@register_loss("dpo")
@gin.configurable
def dpo_loss(logps: PreferenceLogps, beta: float = 0.05,
             label_smoothing: float = 0.0) -> LossOutput:
  """DPO (Rafailov et al. 2023), sigmoid loss; label_smoothing > 0 is cDPO (Mitchell 2023).

  beta 0.05 is eva's (and its paper's) default.
  """
  _check("dpo_loss", beta, label_smoothing)
  chosen_lr, rejected_lr = _logratios(logps)
  losses = _smoothed_sigmoid_loss(beta * (chosen_lr - rejected_lr), label_smoothing)
  return losses, _metrics(beta * chosen_lr, beta * rejected_lr, logps)


@register_loss("robust_dpo")
@gin.configurable
def robust_dpo_loss(logps: PreferenceLogps, beta: float = 0.05,
                    label_smoothing: float = 0.1) -> LossOutput:
  """Robust DPO (Chowdhury et al. 2024): unbiased under label flips with rate eps < 0.5."""
  _check("robust_dpo_loss", beta, label_smoothing, max_smoothing=0.5)
  chosen_lr, rejected_lr = _logratios(logps)
  x = beta * (chosen_lr - rejected_lr)
  losses = ((1.0 - label_smoothing) * -jax.nn.log_sigmoid(x)
            + label_smoothing * jax.nn.log_sigmoid(-x)) / (1.0 - 2.0 * label_smoothing)
  return losses, _metrics(beta * chosen_lr, beta * rejected_lr, logps)


@register_loss("ipo")
@gin.configurable
def ipo_loss(logps: PreferenceLogps, beta: float = 0.1,
             length_normalize: bool = True) -> LossOutput:
  """IPO (Azar et al. 2023): squared distance of the margin to 1 / (2 beta), beta = tau.

  TRL averages the log-probs over the response tokens for IPO (`length_normalize=True`);
  False uses the paper's summed log-probs.
  """
  _check("ipo_loss", beta)
  chosen_lr, rejected_lr = _logratios(logps)
  if length_normalize:
    chosen_lr = chosen_lr / jnp.maximum(logps.chosen_length, 1.0)
    rejected_lr = rejected_lr / jnp.maximum(logps.rejected_length, 1.0)
  losses = (chosen_lr - rejected_lr - 1.0 / (2.0 * beta)) ** 2
  return losses, _metrics(beta * chosen_lr, beta * rejected_lr, logps)


@register_loss("hinge")
@gin.configurable
def hinge_loss(logps: PreferenceLogps, beta: float = 0.1) -> LossOutput:
  """SLiC hinge loss (Zhao et al. 2023) on the DPO margin: max(0, 1 - beta z)."""
  _check("hinge_loss", beta)
  chosen_lr, rejected_lr = _logratios(logps)
  losses = jax.nn.relu(1.0 - beta * (chosen_lr - rejected_lr))
  return losses, _metrics(beta * chosen_lr, beta * rejected_lr, logps)


@register_loss("sppo_hard")
@gin.configurable
def sppo_hard_loss(logps: PreferenceLogps, beta: float = 1e-3) -> LossOutput:
  """SPPO (Wu et al. 2024) with hard win probabilities (chosen wins with probability 1).

  The chosen log-ratio is pushed to eta / 2 and the rejected one to -eta / 2, eta = 1 / beta
  (the paper's eta = 1e3, i.e. beta = 1e-3).
  """
  _check("sppo_hard_loss", beta)
  chosen_lr, rejected_lr = _logratios(logps)
  losses = (chosen_lr - 0.5 / beta) ** 2 + (rejected_lr + 0.5 / beta) ** 2
  return losses, _metrics(beta * chosen_lr, beta * rejected_lr, logps)


@register_loss("rpo")
@gin.configurable
def rpo_loss(logps: PreferenceLogps, beta: float = 0.05, alpha: float = 1.0,
             label_smoothing: float = 0.0) -> LossOutput:
  """RPO (Pang et al. 2024, iterative reasoning PO): DPO + alpha * NLL of the chosen response,
  the NLL normalised by its length (the paper's; TRL's `rpo_alpha`, paper default 1.0)."""
  _check("rpo_loss", beta, label_smoothing)
  if alpha < 0:
    raise ValueError(f"rpo_loss: alpha must be >= 0, got {alpha}.")
  chosen_lr, rejected_lr = _logratios(logps)
  nll = -logps.chosen_mean
  losses = _smoothed_sigmoid_loss(beta * (chosen_lr - rejected_lr), label_smoothing) + alpha * nll
  return losses, _metrics(beta * chosen_lr, beta * rejected_lr, logps, nll=nll)


# --------------------------------------------------------------------------------------------
# Reference-free losses.


@register_loss("dpo_reference_free", needs_reference=False)
@gin.configurable
def dpo_reference_free_loss(logps: PreferenceLogps, beta: float = 0.05,
                            label_smoothing: float = 0.0) -> LossOutput:
  """DPO against a uniform reference (TRL's `reference_free=True`): ref log-probs are 0."""
  _check("dpo_reference_free_loss", beta, label_smoothing)
  losses = _smoothed_sigmoid_loss(beta * (logps.chosen - logps.rejected), label_smoothing)
  return losses, _metrics(beta * logps.chosen, beta * logps.rejected, logps)


@register_loss("simpo", needs_reference=False)
@gin.configurable
def simpo_loss(logps: PreferenceLogps, beta: float = 10.0, gamma: float = 5.0,
               label_smoothing: float = 0.0) -> LossOutput:
  """SimPO (Meng et al. 2024): length-normalised, reference-free, target reward margin gamma.

  Defaults are SimPO's recipe for gemma-2-9b-it (beta 10, gamma / beta = 0.5), the solver of
  the eva paper.
  """
  _check("simpo_loss", beta, label_smoothing)
  chosen, rejected = beta * logps.chosen_mean, beta * logps.rejected_mean
  losses = _smoothed_sigmoid_loss(chosen - rejected - gamma, label_smoothing)
  return losses, _metrics(chosen, rejected, logps)


@register_loss("orpo", needs_reference=False)
@gin.configurable
def orpo_loss(logps: PreferenceLogps, beta: float = 0.1) -> LossOutput:
  """ORPO (Hong et al. 2024): length-normalised NLL of the chosen response minus beta (the
  paper's lambda) times the log-sigmoid of the log odds ratio, odds(y) = p(y) / (1 - p(y))
  with p(y) = exp(average token log-prob)."""
  _check("orpo_loss", beta)
  chosen, rejected = logps.chosen_mean, logps.rejected_mean
  log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
  ratio = jax.nn.log_sigmoid(log_odds)
  nll = -chosen
  losses = nll - beta * ratio
  return losses, _metrics(beta * chosen, beta * rejected, logps, nll=nll,
                          log_odds_ratio=ratio, log_odds_chosen=log_odds)
