"""The solver: preference losses, chunked log-probs, reference log-probs, the train step."""

from eva_jax.solver.batch import make_pair_batch, validate_pair_batch, TOKEN_KEYS, REF_KEYS
from eva_jax.solver.logprobs import pair_logps, sequence_logps
from eva_jax.solver.losses import (LOSSES, PreferenceLogps, PreferenceLoss, get_loss_fn,
                                   loss_names, register_loss)
from eva_jax.solver.optimizer import (MasterWeightsState, Optimizer, learning_rate_schedule,
                                      make_optimizer)
from eva_jax.solver.train_state import (TrainState, create_train_state, init_opt_state,
                                        make_policy_model, train_state_shardings)
from eva_jax.solver.train_step import (TrainStep, make_reference_fn, make_train_step,
                                       reference_logps)

__all__ = [
    "make_pair_batch", "validate_pair_batch", "TOKEN_KEYS", "REF_KEYS",
    "pair_logps", "sequence_logps",
    "LOSSES", "PreferenceLogps", "PreferenceLoss", "get_loss_fn", "loss_names", "register_loss",
    "MasterWeightsState", "Optimizer", "learning_rate_schedule", "make_optimizer",
    "TrainState", "create_train_state", "init_opt_state", "make_policy_model",
    "train_state_shardings",
    "TrainStep", "make_reference_fn", "make_train_step", "reference_logps",
]
