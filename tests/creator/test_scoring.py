"""Informativeness metrics, selection and pairs against values worked out by hand."""

import itertools

import numpy as np
import pytest

from eva_jax.creator import (best_worst_pairs, informativeness, minmax_weights, mix_pairs,
                             reward_statistics, select_prompts)

REWARDS = np.array([[1.0, 4.0, 2.0, 1.0],    # gap 3, mean 2, max-mean 2, std sqrt(1.5)
                    [5.0, 5.0, 5.0, 5.0],    # flat
                    [0.0, np.nan, 2.0, 1.0],  # one failed sample: gap 2, mean 1
                    [np.nan] * 4])            # nothing scored


@pytest.mark.parametrize("metric, want", [
    ("reward_gap", [3.0, 0.0, 2.0, np.nan]),
    ("max_mean", [2.0, 0.0, 1.0, np.nan]),
    ("std", [np.sqrt(1.5), 0.0, np.sqrt(2 / 3), np.nan]),
    ("mean_inverse", [-2.0, -5.0, -1.0, np.nan]),
    ("uniform", [0.0, 0.0, 0.0, np.nan]),
])
def test_informativeness_by_hand(metric, want):
  np.testing.assert_allclose(informativeness(REWARDS, metric), want, rtol=1e-12)


def test_reward_statistics_ignore_failed_samples():
  stats = reward_statistics(REWARDS)
  np.testing.assert_allclose(stats["reward_mean"], [2.0, 5.0, 1.0, np.nan])
  np.testing.assert_array_equal(stats["num_scored"], [4, 4, 3, 0])


def test_unknown_metric_lists_the_known_ones():
  with pytest.raises(ValueError, match=r"Unknown informativeness metric 'gap'; known: "
                                       r"max_mean, mean_inverse, reward_gap, std, uniform"):
    informativeness(REWARDS, "gap")
  with pytest.raises(ValueError, match=r"\[prompts, samples\]"):
    informativeness([1.0, 2.0])


def _exact_inclusion(w, n):
  """P(i in sample) under successive sampling without replacement, by enumeration."""
  w = np.asarray(w, float)
  probs = np.zeros(len(w))
  for seq in itertools.permutations(range(len(w)), n):
    p, left = 1.0, w.sum()
    for i in seq:
      p *= w[i] / left
      left -= w[i]
    probs[list(seq)] += p
  return probs


def test_weighted_selection_matches_exact_inclusion_probabilities():
  info = np.array([0.0, 1.0, 2.0, 3.0, 8.0])
  epsilon = 0.1
  w = minmax_weights(info, epsilon)
  np.testing.assert_allclose(w, [0.1, 0.225, 0.35, 0.475, 1.1])
  want = _exact_inclusion(w, 2)
  assert np.isclose(want.sum(), 2.0)
  draws = 20000
  counts = np.zeros(5)
  for seed in range(draws):
    picked = select_prompts(info, fraction=0.4, epsilon=epsilon, seed=seed)
    assert len(picked) == 2 and len(set(picked)) == 2
    counts[picked] += 1
  # Binomial standard error <= sqrt(0.25 / 20000) = 0.0035; 0.015 is more than 4 of them.
  np.testing.assert_allclose(counts / draws, want, atol=0.015)


def test_epsilon_zero_never_draws_the_least_informative_prompt():
  info = np.array([1.0, 2.0, 3.0, 4.0])
  picked = {int(i) for s in range(300) for i in select_prompts(info, fraction=0.5, epsilon=0.0,
                                                                seed=s)}
  assert picked == {1, 2, 3}
  # Fewer positive weights than asked for: only those come back.
  assert list(select_prompts(np.array([0.0, 0.0, 1.0, 0.0]), fraction=0.5, epsilon=0.0)) == [2]


def test_flat_info_still_samples_and_nan_is_never_selected():
  info = np.array([2.0, 2.0, np.nan, 2.0])
  seen = {int(i) for s in range(200) for i in select_prompts(info, fraction=0.5, seed=s)}
  assert seen == {0, 1, 3}
  assert 2 not in select_prompts(info, fraction=0.75, method="greedy")


def test_greedy_and_uniform():
  info = np.array([0.5, 3.0, 1.0, 3.0, 2.0, 0.1, 0.2, 0.3])
  assert list(select_prompts(info, fraction=0.25, method="greedy")) == [1, 3]  # ties: order
  assert list(select_prompts(info, fraction=0.5, method="greedy")) == [1, 2, 3, 4]
  u = select_prompts(info, fraction=0.5, method="uniform", seed=3)
  assert len(set(u)) == 4
  assert list(u) == list(select_prompts(info, fraction=0.5, method="uniform", seed=3))


def test_selection_is_a_function_of_the_seed():
  info = np.random.default_rng(0).random(50)
  a = select_prompts(info, seed=7)
  assert len(a) == 12  # int(0.25 * 50)
  np.testing.assert_array_equal(a, select_prompts(info.copy(), seed=7))
  assert not np.array_equal(a, select_prompts(info, seed=8))


def test_selection_bad_inputs():
  with pytest.raises(ValueError, match="the prompt buffer is empty"):
    select_prompts(np.zeros(0))
  for f in (0.0, 1.5, -0.1):
    with pytest.raises(ValueError, match=r"fraction=.* must be in \(0, 1\]"):
      select_prompts(np.ones(4), fraction=f)
  with pytest.raises(ValueError, match="Unknown selection method 'top'; known: greedy, "
                                       "uniform, weighted"):
    select_prompts(np.ones(4), method="top")


def test_pairs_best_worst_ties_and_unscored():
  rewards = np.array([[1.0, 3.0, 3.0, 0.0],     # best: first 3.0 (index 1), worst 3
                      [2.0, 2.0, 2.0, 2.0],     # tie: dropped
                      [np.nan, 1.0, np.nan, 0.5],  # scored 1 and 3
                      [np.nan, 1.0, np.nan, np.nan],  # one scored: dropped
                      [0.0, 0.0, 1.0, 1.0]])    # best 2, worst 0
  pairs, counts = best_worst_pairs(rewards)
  assert [(p.prompt_index, p.chosen, p.rejected) for p in pairs] == [(0, 1, 3), (2, 1, 3),
                                                                       (4, 2, 0)]
  assert counts == {"pairs": 3, "dropped_ties": 1, "dropped_unscored": 1}
  assert pairs[0].chosen_reward == 3.0 and pairs[0].rejected_reward == 0.0
  _, counts = best_worst_pairs(rewards, tie_tolerance=0.6)
  assert counts["dropped_ties"] == 2  # prompt 2's gap is 0.5


def test_mix_counts_are_fractions_of_each_set():
  evolved = [("e", i) for i in range(10)]
  fresh = [("f", i) for i in range(7)]
  mixed, counts = mix_pairs(evolved, fresh, seed=0)
  assert counts == {"mix/evolved": 8, "mix/fresh": 1, "mix/total": 9}  # int(8.0), int(1.4)
  assert sum(1 for s, _ in mixed if s == "e") == 8 and len(set(mixed)) == 9
  again, _ = mix_pairs(evolved, fresh, seed=0)
  assert again == mixed
  _, counts = mix_pairs(evolved, fresh, seed=0, evolved_fraction=1.0, fresh_fraction=1.0)
  assert counts["mix/total"] == 17
  with pytest.raises(ValueError, match="fresh_fraction=1.2 must be in"):
    mix_pairs(evolved, fresh, fresh_fraction=1.2)
