"""The preference-pair batch: its one format, a builder with documented truncation, checks.

Format (numpy on the host, global jax arrays on the device; B pairs, T = the padded length):

    chosen_tokens       int32 [B, T]  prompt + chosen response, right-padded with pad_id
    chosen_loss_mask    int32 [B, T]  1 on the chosen response's tokens, 0 on prompt and padding
    rejected_tokens     int32 [B, T]  prompt + rejected response, right-padded
    rejected_loss_mask  int32 [B, T]
    ref_chosen_logps    float32 [B]   sum of the reference model's log-probs of the chosen
                                      response tokens (absent for reference-free losses)
    ref_rejected_logps  float32 [B]

A loss-mask entry at position t means token t is scored by the logits at position t - 1, so
position 0 is never scored (the prompt is at least one token, e.g. BOS). Rows are right-padded
and the model's key mask is `tokens != pad_id`, so a real token may not equal pad_id.

Truncation (`make_pair_batch`, as TRL's DPO data collator): when prompt + response exceeds
`max_length`, the prompt keeps its *last* `max_prompt_length` tokens (the end of a prompt is
what the response answers), then the response keeps its *first* `max_length - len(prompt)`
tokens. `truncate=False` raises instead. Empty responses are always an error.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

TOKEN_KEYS = ("chosen_tokens", "chosen_loss_mask", "rejected_tokens", "rejected_loss_mask")
REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


def _pack(prompt: Sequence[int], response: Sequence[int], length: int, pad_id: int):
  tokens = np.full((length,), pad_id, np.int32)
  mask = np.zeros((length,), np.int32)
  n = len(prompt)
  tokens[:n] = prompt
  tokens[n:n + len(response)] = response
  mask[n:n + len(response)] = 1
  return tokens, mask


def make_pair_batch(prompts: Sequence[Sequence[int]], chosen: Sequence[Sequence[int]],
                    rejected: Sequence[Sequence[int]], *, max_length: int,
                    max_prompt_length: Optional[int] = None, pad_id: int = 0,
                    truncate: bool = True) -> dict[str, np.ndarray]:
  """Packs token-id pairs into the batch format above, padded to `max_length` columns.

  Args:
    prompts / chosen / rejected: one token-id sequence per pair (the chat template already
      applied; responses end with their end-of-turn / EOS tokens).
    max_length: T, the padded length of every row (static, so a round compiles once).
    max_prompt_length: prompts longer than this keep their last `max_prompt_length` tokens
      (only when the pair would not fit otherwise). Default: max_length // 2.
    pad_id: the model's pad id (`config.pad_id`).
    truncate: False raises ValueError for a pair longer than `max_length` instead.

  Returns:
    The four token arrays of the format (no reference log-probs yet).
  """
  if not len(prompts) == len(chosen) == len(rejected):
    raise ValueError(f"make_pair_batch: got {len(prompts)} prompts, {len(chosen)} chosen and "
                     f"{len(rejected)} rejected responses; pass one of each per pair.")
  max_prompt_length = max_length // 2 if max_prompt_length is None else max_prompt_length
  if not 0 < max_prompt_length < max_length:
    raise ValueError(f"make_pair_batch: max_prompt_length={max_prompt_length} must be in "
                     f"[1, max_length={max_length}) so that every response keeps a token.")
  rows = {k: [] for k in TOKEN_KEYS}
  for i, (prompt, *responses) in enumerate(zip(prompts, chosen, rejected)):
    prompt = list(prompt)
    if not prompt:
      raise ValueError(f"make_pair_batch: pair {i} has an empty prompt; the first response "
                       "token must be scored from a prompt token (at least BOS).")
    for side, response in zip(("chosen", "rejected"), responses):
      if len(response) == 0:
        raise ValueError(f"make_pair_batch: pair {i} has an empty {side} response; drop the "
                         "pair (its log-prob would be 0 and its average undefined).")
      if pad_id in prompt or pad_id in list(response):
        raise ValueError(f"make_pair_batch: pair {i} ({side}) contains pad_id={pad_id} as a "
                         "real token; the model would treat it as padding. Re-tokenize or "
                         "change pad_id.")
    longest = len(prompt) + max(len(r) for r in responses)
    if longest > max_length:
      if not truncate:
        raise ValueError(f"make_pair_batch: pair {i} has {longest} tokens (prompt "
                         f"{len(prompt)} + response), more than max_length={max_length}; "
                         "raise max_length, drop the pair or pass truncate=True.")
      prompt = prompt[-max_prompt_length:] if len(prompt) > max_prompt_length else prompt
    room = max_length - len(prompt)
    for side, response in zip(("chosen", "rejected"), responses):
      tokens, mask = _pack(prompt, list(response)[:room], max_length, pad_id)
      rows[f"{side}_tokens"].append(tokens)
      rows[f"{side}_loss_mask"].append(mask)
  return {k: np.stack(v) if v else np.zeros((0, max_length), np.int32) for k, v in rows.items()}


def shared_prompt_length(length: int, scored_length: Optional[int]) -> int:
  """Columns of a pair's packed row when its prompt is computed once (`pair_logps`'s
  `share_prompt`): the chosen row (T), then the rejected response, at most `scored_length`
  tokens (and at most T - 1, a prompt being at least one token)."""
  return length + min(length - 1, length if scored_length is None else scored_length)


def packed_pair_lengths(batch: Mapping[str, np.ndarray], pad_id: int) -> np.ndarray:
  """int [B]: the tokens each pair needs packed with its prompt once: the chosen row's
  tokens up to its last real one, then the rejected row's after the prefix the two rows
  share (equal tokens, neither scored, not padding). numpy mirror of the device packing in
  `eva_jax.solver.logprobs`."""
  chosen, rejected = (np.asarray(batch[f"{k}_tokens"]) for k in ("chosen", "rejected"))
  same = ((chosen == rejected) & (chosen != pad_id)
          & (np.asarray(batch["chosen_loss_mask"]) == 0)
          & (np.asarray(batch["rejected_loss_mask"]) == 0))
  shared = np.cumprod(same, axis=1).sum(axis=1)
  # Each row's last real token's slot + 1 (0 for an all-padding row).
  ends = [np.max(np.where(x != pad_id, np.arange(x.shape[1]) + 1, 0), axis=1)
          for x in (chosen, rejected)]
  return ends[0] + ends[1] - shared


def validate_pair_batch(batch: Mapping[str, np.ndarray], *, pad_id: int = 0,
                        max_length: Optional[int] = None,
                        needs_reference: bool = False,
                        scored_length: Optional[int] = None,
                        share_prompt: bool = False) -> None:
  """Raises ValueError, naming the key and row, if `batch` breaks the format above.

  Checks shapes ([B, T] tokens and masks, [B] reference log-probs), T <= max_length, 0/1
  masks, nothing scored at position 0 or on padding, at least one scored token per response
  and, with `scored_length` (the train step's and reference's bound on scored positions per
  row), at most that many; with `share_prompt`, that each pair fits its packed row
  (`shared_prompt_length`). Host-side (numpy); the jitted step only checks shapes.
  """
  missing = [k for k in TOKEN_KEYS + (REF_KEYS if needs_reference else ()) if k not in batch]
  if missing:
    hint = (" Compute reference log-probs once per round with eva_jax.solver.reference_logps."
            if set(missing) & set(REF_KEYS) else "")
    raise ValueError(f"Pair batch is missing {missing}.{hint}")
  shape = np.shape(batch["chosen_tokens"])
  if len(shape) != 2:
    raise ValueError(f"Pair batch: chosen_tokens must be [B, T], got shape {shape}.")
  for k in TOKEN_KEYS:
    if np.shape(batch[k]) != shape:
      raise ValueError(f"Pair batch: {k} has shape {np.shape(batch[k])}, expected {shape} "
                       "(chosen and rejected rows are padded to one length).")
  if max_length is not None and shape[1] > max_length:
    raise ValueError(f"Pair batch: rows have {shape[1]} tokens, more than the configured "
                     f"max_length={max_length}; build the batch with make_pair_batch("
                     f"max_length={max_length}) to truncate, or raise max_length.")
  for side in ("chosen", "rejected"):
    tokens = np.asarray(batch[f"{side}_tokens"])
    mask = np.asarray(batch[f"{side}_loss_mask"])
    if not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(f"Pair batch: {side}_tokens must be integer token ids, got {tokens.dtype}.")
    if not np.isin(mask, (0, 1)).all():
      raise ValueError(f"Pair batch: {side}_loss_mask must be 0/1.")
    if mask[:, 0].any():
      row = int(np.argmax(mask[:, 0]))
      raise ValueError(f"Pair batch: {side}_loss_mask[{row}, 0] is 1, but position 0 cannot be "
                       "scored (it has no preceding logits); the prompt needs >= 1 token.")
    on_pad = (mask == 1) & (tokens == pad_id)
    if on_pad.any():
      row, col = map(int, np.argwhere(on_pad)[0])
      raise ValueError(f"Pair batch: {side}_loss_mask[{row}, {col}] scores a pad token "
                       f"(pad_id={pad_id}); the mask must cover response tokens only.")
    scored = mask.sum(axis=1)
    empty = np.flatnonzero(scored == 0)
    if empty.size:
      raise ValueError(f"Pair batch: {side} response of row {int(empty[0])} is empty (no "
                       "scored tokens); drop the pair.")
    if scored_length is not None and scored.size and scored.max() > scored_length:
      row = int(np.argmax(scored))
      raise ValueError(f"Pair batch: {side} response of row {row} scores {int(scored[row])} "
                       f"tokens, more than scored_length={scored_length} (the positions the "
                       "step unembeds per row); raise make_train_step.scored_length / "
                       "reference_logps.scored_length, or truncate the responses.")
  if share_prompt and shape[0]:
    room = shared_prompt_length(shape[1], scored_length)
    need = packed_pair_lengths(batch, pad_id)
    if need.max() > room:
      row = int(np.argmax(need))
      raise ValueError(f"Pair batch: pair {row} needs {int(need[row])} tokens with its prompt "
                       f"computed once, more than the packed row's {room} (T + scored "
                       "length): its chosen and rejected rows do not begin with the same "
                       "prompt, or its rejected response is longer than scored_length. Build "
                       "pairs with make_pair_batch, or set make_train_step.share_prompt = "
                       "False.")
  if needs_reference:
    for k in REF_KEYS:
      ref = np.asarray(batch[k])
      if ref.shape != shape[:1]:
        raise ValueError(f"Pair batch: {k} has shape {ref.shape}, expected {shape[:1]}.")
      if not np.isfinite(ref).all():
        raise ValueError(f"Pair batch: {k} has non-finite values at rows "
                         f"{np.flatnonzero(~np.isfinite(ref))[:5].tolist()}.")
