"""The pair-batch format: packing, documented truncation, and errors for bad inputs."""

import numpy as np
import pytest

from eva_jax.solver import make_pair_batch, validate_pair_batch


def test_packs_prompt_and_response_right_padded_with_a_response_mask():
  b = make_pair_batch([[5, 6, 7]], [[8, 9]], [[10]], max_length=8, pad_id=0)
  np.testing.assert_array_equal(b["chosen_tokens"], [[5, 6, 7, 8, 9, 0, 0, 0]])
  np.testing.assert_array_equal(b["chosen_loss_mask"], [[0, 0, 0, 1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(b["rejected_tokens"], [[5, 6, 7, 10, 0, 0, 0, 0]])
  np.testing.assert_array_equal(b["rejected_loss_mask"], [[0, 0, 0, 1, 0, 0, 0, 0]])
  assert b["chosen_tokens"].dtype == np.int32
  validate_pair_batch(b, max_length=8)


def test_truncation_keeps_the_end_of_the_prompt_then_the_start_of_the_response():
  prompt, chosen, rejected = list(range(10, 20)), list(range(30, 40)), [50, 51]
  b = make_pair_batch([prompt], [chosen], [rejected], max_length=8, max_prompt_length=3)
  np.testing.assert_array_equal(b["chosen_tokens"], [[17, 18, 19, 30, 31, 32, 33, 34]])
  np.testing.assert_array_equal(b["chosen_loss_mask"], [[0, 0, 0, 1, 1, 1, 1, 1]])
  # Both sides share the truncated prompt.
  np.testing.assert_array_equal(b["rejected_tokens"], [[17, 18, 19, 50, 51, 0, 0, 0]])
  # A pair that fits keeps its whole prompt even if longer than max_prompt_length.
  b = make_pair_batch([prompt[:5]], [[60]], [[61]], max_length=8, max_prompt_length=3)
  np.testing.assert_array_equal(b["chosen_tokens"], [[10, 11, 12, 13, 14, 60, 0, 0]])


def test_too_long_without_truncation_is_an_error():
  with pytest.raises(ValueError, match="pair 0 has 12 tokens.*max_length=8"):
    make_pair_batch([[3] * 6], [[4] * 6], [[5]], max_length=8, truncate=False)


@pytest.mark.parametrize("prompts,chosen,rejected,match", [
    ([[3, 4]], [[]], [[5]], "pair 0 has an empty chosen response"),
    ([[3, 4]], [[5]], [[]], "pair 0 has an empty rejected response"),
    ([[]], [[5]], [[6]], "pair 0 has an empty prompt"),
    ([[3, 0]], [[5]], [[6]], "contains pad_id=0"),
    ([[3], [4]], [[5]], [[6], [7]], "2 prompts, 1 chosen"),
])
def test_bad_pairs_raise(prompts, chosen, rejected, match):
  with pytest.raises(ValueError, match=match):
    make_pair_batch(prompts, chosen, rejected, max_length=8)


def test_max_prompt_length_must_leave_room_for_a_response():
  with pytest.raises(ValueError, match="max_prompt_length=8"):
    make_pair_batch([[3]], [[4]], [[5]], max_length=8, max_prompt_length=8)


def _good():
  return make_pair_batch([[3, 4], [5]], [[6, 7], [8]], [[9], [10, 11]], max_length=6)


@pytest.mark.parametrize("edit,match", [
    (lambda b: b.update(chosen_loss_mask=b["chosen_loss_mask"][:, :5]), "chosen_loss_mask has shape"),
    (lambda b: b["rejected_loss_mask"].__setitem__((1, 0), 1), "rejected_loss_mask\\[1, 0\\] is 1"),
    (lambda b: b["chosen_loss_mask"].__setitem__((0, 5), 1), "scores a pad token"),
    (lambda b: b["rejected_loss_mask"].__setitem__(1, 0), "rejected response of row 1 is empty"),
    (lambda b: b["chosen_loss_mask"].__setitem__((0, 2), 2), "must be 0/1"),
    (lambda b: b.pop("rejected_tokens"), "missing \\['rejected_tokens'\\]"),
])
def test_validate_rejects_malformed_batches(edit, match):
  b = _good()
  edit(b)
  with pytest.raises(ValueError, match=match):
    validate_pair_batch(b)


def test_validate_checks_length_and_reference_entries():
  b = _good()
  with pytest.raises(ValueError, match="rows have 6 tokens, more than the configured max_length=4"):
    validate_pair_batch(b, max_length=4)
  with pytest.raises(ValueError, match="missing.*ref_chosen_logps.*reference_logps"):
    validate_pair_batch(b, needs_reference=True)
  b.update(ref_chosen_logps=np.zeros(2, np.float32), ref_rejected_logps=np.array([0, np.nan]))
  with pytest.raises(ValueError, match="ref_rejected_logps has non-finite values at rows \\[1\\]"):
    validate_pair_batch(b, needs_reference=True)
  b["ref_rejected_logps"] = np.zeros(3)
  with pytest.raises(ValueError, match="ref_rejected_logps has shape \\(3,\\), expected \\(2,\\)"):
    validate_pair_batch(b, needs_reference=True)


def test_validate_refuses_a_response_longer_than_scored_length():
  b = make_pair_batch([[5, 6]], [[7, 8, 9]], [[7]], max_length=8)
  validate_pair_batch(b, scored_length=3)
  with pytest.raises(ValueError, match=r"chosen response of row 0 scores 3 tokens, more than "
                     r"scored_length=2.*make_train_step.scored_length"):
    validate_pair_batch(b, scored_length=2)
