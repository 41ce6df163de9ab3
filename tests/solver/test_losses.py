"""Every registered preference loss against values worked out by hand from its formula."""

import glob
import math
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eva_jax.solver import losses
from eva_jax.solver.losses import PreferenceLogps, get_loss_fn

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def softplus(x):  # -log sigmoid(-x)
  return math.log1p(math.exp(x))


# Two pairs. Pair 0: chosen log-ratio +1, rejected -1 (margin z = 2); lengths 4 and 8.
# Pair 1: chosen log-ratio -1, rejected +2 (z = -3); lengths 2 and 3.
LOGPS = PreferenceLogps(
    chosen=jnp.array([-10.0, -6.0]), rejected=jnp.array([-14.0, -3.0]),
    chosen_length=jnp.array([4.0, 2.0]), rejected_length=jnp.array([8.0, 3.0]),
    ref_chosen=jnp.array([-11.0, -5.0]), ref_rejected=jnp.array([-13.0, -5.0]))


def run(name, **hparams):
  out, metrics = get_loss_fn(name, **hparams)(LOGPS)
  return np.asarray(out), {k: np.asarray(v) for k, v in metrics.items()}


def test_registry_holds_every_loss_of_the_issue():
  assert set(losses.loss_names()) == {"dpo", "robust_dpo", "ipo", "hinge", "sppo_hard", "rpo",
                                      "dpo_reference_free", "simpo", "orpo"}
  assert not get_loss_fn("simpo").needs_reference and get_loss_fn("dpo").needs_reference
  with pytest.raises(ValueError, match="Unknown preference loss 'kto'.*dpo"):
    get_loss_fn("kto")


def test_dpo_sigmoid_and_metrics():
  out, m = run("dpo", beta=0.5)
  # beta * z = 1 and -1.5: loss = -log s(x) = log(1 + e^-x).
  np.testing.assert_allclose(out, [softplus(-1.0), softplus(1.5)], rtol=1e-6)
  np.testing.assert_allclose(m["rewards/chosen"], [0.5, -0.5])
  np.testing.assert_allclose(m["rewards/rejected"], [-0.5, 1.0])
  np.testing.assert_allclose(m["rewards/margins"], [1.0, -1.5])
  np.testing.assert_array_equal(m["rewards/accuracies"], [1.0, 0.0])
  np.testing.assert_array_equal(m["logps/chosen"], [-10.0, -6.0])
  np.testing.assert_array_equal(m["logps/rejected"], [-14.0, -3.0])


def test_cdpo_label_smoothing():
  out, _ = run("dpo", beta=0.5, label_smoothing=0.1)
  # 0.9 * (-log s(x)) + 0.1 * (-log s(-x)) = softplus(-x) + 0.1 x.
  np.testing.assert_allclose(out, [softplus(-1.0) + 0.1, softplus(1.5) - 0.15], rtol=1e-6)


def test_robust_dpo():
  out, _ = run("robust_dpo", beta=0.5, label_smoothing=0.1)
  expected = [(0.9 * softplus(-x) - 0.1 * softplus(x)) / 0.8 for x in (1.0, -1.5)]
  np.testing.assert_allclose(out, expected, rtol=1e-6)
  with pytest.raises(ValueError, match="label_smoothing must be in \\[0, 0.5\\)"):
    run("robust_dpo", label_smoothing=0.5)


def test_ipo_length_normalised_and_summed():
  out, m = run("ipo", beta=0.5)
  # Averaged log-ratios: pair 0: 1/4 - (-1/8) = 0.375; pair 1: -1/2 - 2/3. Target 1/(2 beta) = 1.
  np.testing.assert_allclose(out, [(0.375 - 1) ** 2, (-0.5 - 2 / 3 - 1) ** 2], rtol=1e-6)
  np.testing.assert_allclose(m["rewards/chosen"], [0.5 * 0.25, 0.5 * -0.5], rtol=1e-6)
  out, _ = run("ipo", beta=0.5, length_normalize=False)
  np.testing.assert_allclose(out, [(2 - 1) ** 2, (-3 - 1) ** 2], rtol=1e-6)


def test_hinge():
  out, _ = run("hinge", beta=0.5)
  np.testing.assert_allclose(out, [0.0, 2.5], atol=1e-7)  # max(0, 1 - beta z)


def test_sppo_hard():
  out, m = run("sppo_hard", beta=0.5)
  # (a - 1)^2 + (b + 1)^2 with (a, b) = (1, -1) and (-1, 2).
  np.testing.assert_allclose(out, [0.0, 4.0 + 9.0], atol=1e-6)
  np.testing.assert_allclose(m["rewards/rejected"], [-0.5, 1.0])


def test_rpo_adds_length_normalised_nll_of_chosen():
  out, m = run("rpo", beta=0.5, alpha=2.0)
  np.testing.assert_allclose(m["nll"], [10 / 4, 6 / 2], rtol=1e-6)
  np.testing.assert_allclose(out, [softplus(-1.0) + 2 * 2.5, softplus(1.5) + 2 * 3.0], rtol=1e-6)


def test_reference_free_dpo_ignores_the_reference():
  out, m = run("dpo_reference_free", beta=0.5)
  # beta * (chosen - rejected) = 2 and -1.5.
  np.testing.assert_allclose(out, [softplus(-2.0), softplus(1.5)], rtol=1e-6)
  np.testing.assert_allclose(m["rewards/chosen"], [-5.0, -3.0])
  no_ref = LOGPS._replace(ref_chosen=None, ref_rejected=None)
  out2, _ = get_loss_fn("dpo_reference_free", beta=0.5)(no_ref)
  np.testing.assert_allclose(out2, out)
  out3, _ = get_loss_fn("dpo_reference_free", beta=0.5, label_smoothing=0.2)(no_ref)
  np.testing.assert_allclose(out3, [softplus(-2.0) + 0.4, softplus(1.5) - 0.3], rtol=1e-6)


def test_simpo():
  out, m = run("simpo", beta=2.0, gamma=1.0)
  # Averages: pair 0: -10/4 = -2.5 vs -14/8 = -1.75; pair 1: -3 vs -1.
  x0, x1 = 2 * (-2.5 + 1.75) - 1.0, 2 * (-3.0 + 1.0) - 1.0
  np.testing.assert_allclose(out, [softplus(-x0), softplus(-x1)], rtol=1e-6)
  np.testing.assert_allclose(m["rewards/chosen"], [-5.0, -6.0])
  np.testing.assert_array_equal(m["rewards/accuracies"], [0.0, 0.0])


def test_orpo():
  out, m = run("orpo", beta=0.1)

  def log_odds(avg):
    return avg - math.log(1 - math.exp(avg))

  for i, (c, r) in enumerate([(-2.5, -1.75), (-3.0, -1.0)]):
    ratio = -softplus(-(log_odds(c) - log_odds(r)))  # log s(.)
    np.testing.assert_allclose(m["log_odds_ratio"][i], ratio, rtol=1e-5)
    np.testing.assert_allclose(out[i], -c - 0.1 * ratio, rtol=1e-6)


def test_orpo_is_finite_when_a_response_is_certain():
  near_one = PreferenceLogps(jnp.array([0.0, -1e-9]), jnp.array([-1e-8, -30.0]),
                             jnp.array([3.0, 3.0]), jnp.array([3.0, 3.0]))
  out, _ = get_loss_fn("orpo")(near_one)
  grads = jax.grad(lambda c: get_loss_fn("orpo")(near_one._replace(chosen=c))[0].sum())(
      near_one.chosen)
  assert np.isfinite(np.asarray(out)).all() and np.isfinite(np.asarray(grads)).all()


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
  def total(c, r):
    return get_loss_fn("dpo", beta=0.5)(LOGPS._replace(chosen=c, rejected=r))[0].sum()
  gc, gr = jax.grad(total, argnums=(0, 1))(LOGPS.chosen, LOGPS.rejected)
  assert (np.asarray(gc) < 0).all() and (np.asarray(gr) > 0).all()


def test_losses_that_need_a_reference_say_so():
  no_ref = LOGPS._replace(ref_chosen=None, ref_rejected=None)
  for name in ("dpo", "robust_dpo", "ipo", "hinge", "sppo_hard", "rpo"):
    with pytest.raises(ValueError, match=f"'{name}' loss needs reference log-probs"):
      get_loss_fn(name)(no_ref)


@pytest.mark.parametrize("bad", [{"beta": 0.0}, {"beta": -1.0}, {"label_smoothing": 1.0}])
def test_bad_hyper_parameters_raise(bad):
  with pytest.raises(ValueError, match="dpo_loss"):
    run("dpo", **bad)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "gin", "losses", "*.gin"))))
def test_gin_files_select_their_loss(path):
  gin.clear_config()
  try:
    gin.parse_config_file(path)
    loss = get_loss_fn()
    stem = os.path.basename(path)[:-4]
    assert loss.name == ("dpo" if stem == "cdpo" else stem)
    out, metrics = loss(LOGPS)
    assert out.shape == (2,) and np.isfinite(np.asarray(out)).all()
    assert "rewards/accuracies" in metrics
    if stem == "cdpo":  # the binding reaches the loss: smoothing changes the value
      plain, _ = get_loss_fn("dpo", label_smoothing=0.0)(LOGPS)
      assert not np.allclose(out, plain)
  finally:
    gin.clear_config()


def test_every_registered_loss_has_a_gin_file():
  stems = {os.path.basename(p)[:-4] for p in glob.glob(os.path.join(REPO, "gin/losses/*.gin"))}
  assert set(losses.loss_names()) <= stems
