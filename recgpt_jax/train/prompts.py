"""On-device prompt generation for prompt-tuning (no gradient, current parameters, every step).

Given the model's item scores at every position of the *real* view of a packed batch (the user's true
prefix), a ``lax.scan`` over the columns picks the generated items: at column ``t`` it adds the item
the prompted sequence holds at ``t`` to the user's *used* set and takes the best-scoring items not in
it, so a generated item never repeats an item already in its prefix (real or generated). The scan
carries a ``[rows, items + 1]`` used-set and resets it where a new user starts in the row; it is cheap
next to the forward pass that produced the scores. The layout (which slot takes which pick) comes from
``recgpt_jax.data.prompts``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

# Candidates per column kept by the scan (see pick_prompt_items); the exact fallback keeps it correct.
NUM_CANDIDATES = 32


def _mask_padding(scores: jax.Array) -> jax.Array:
  """Column 0 (padding) gets the lowest score, so it is never a candidate."""
  return jnp.where(jnp.arange(scores.shape[-1]) == 0, jnp.finfo(scores.dtype).min, scores)


def top_candidates(scores_rlv: jax.Array) -> jax.Array:
  """The ``NUM_CANDIDATES`` best items of every column in score order (column 0 excluded)."""
  return jax.lax.top_k(_mask_padding(scores_rlv), min(NUM_CANDIDATES, scores_rlv.shape[-1] - 1))[1]


def pick_prompt_items(
  scores_rlv: jax.Array,
  batch: dict[str, jax.Array],
  mode: str,
  width: int,
  candidates_rlc: jax.Array | None = None,
) -> jax.Array:
  """``pick_from_candidates`` for a full ``[rows, len, items + 1]`` score array (column 0 = padding)."""
  if candidates_rlc is None:
    candidates_rlc = top_candidates(scores_rlv)
  return pick_from_candidates(candidates_rlc, batch, mode, width, scores_rlv, lambda column_rv: column_rv)


def pick_from_candidates(
  candidates_rlc: jax.Array,
  batch: dict[str, jax.Array],
  mode: str,
  width: int,
  columns_rl: jax.Array,
  column_scores: Callable[[jax.Array], jax.Array],
) -> jax.Array:
  """Chooses the generated items, column by column.

  Args:
    candidates_rlc: ``[rows, len, c]`` best items of each column in score order (column 0 excluded), from
      ``top_candidates`` or the two-stage top-k over a vocabulary-sharded table.
    batch: the prompt-tuning batch (``items``, ``positions``, ``seq_ids`` of the real view; ``gen_col``).
    mode: ``'last'`` (only one pick per column is used: it fills slot ``t + 1`` and then counts as the
      item at ``t + 1``) or ``'interleave'`` (``width`` picks after each real item, all added to the used
      set).
    width: prompt width ``w``.
    columns_rl: ``[rows, len, ...]`` what ``column_scores`` needs for one column: the hidden states (the
      model scores a column only when its candidates run out) or the scores themselves.
    column_scores: ``[rows, ...] -> [rows, items + 1]`` scores of every item for one column.

  Returns:
    ``[rows, len, picks]`` int32 picks per real-view column (``picks`` = ``width`` for interleave, 1 for
    last), in score order.
  """
  rows, length, _ = candidates_rlc.shape
  row_idx = jnp.arange(rows)
  # Last mode: is column t a slot (its prompted item is the pick made at t - 1)?
  slot_rl = jnp.zeros((rows, length), bool)
  if mode == "last":
    cols = jnp.where(batch["gen_col"] >= 0, batch["gen_col"] + 1, length)  # the slot's own column
    slot_rl = slot_rl.at[row_idx[:, None], cols].set(True, mode="drop")
  num_picks = width if mode == "interleave" else 1
  # The scan only compares each column's few candidates with the user's used items ([rows, few] work per
  # column instead of [rows, items]); a column whose candidates are all used falls back to the exact
  # argmax over the whole catalogue, scoring that column then.
  max_used = length * (1 + num_picks)  # every column adds its item (and its interleaved picks)
  slots_m = jnp.arange(max_used)

  def step(carry, xs):
    used_rm, count_r, prev_pick_r = carry
    item_r, pos_r, seq_r, slot_r, cand_rc, column_r = xs
    count_r = jnp.where((pos_r == 0) & (seq_r > 0), 0, count_r)  # a new user starts: forget the last one
    here_r = jnp.where(slot_r, prev_pick_r, item_r)  # the item the prompted sequence holds at t

    def add(used_rm, count_r, item_r):
      return used_rm.at[row_idx, count_r].set(item_r), count_r + 1

    used_rm, count_r = add(used_rm, count_r, here_r)
    picks = []
    for _ in range(num_picks):
      live_rm = slots_m[None, :] < count_r[:, None]
      is_used_rc = jnp.any((cand_rc[:, :, None] == used_rm[:, None, :]) & live_rm[:, None, :], axis=-1)
      exhausted_r = jnp.all(is_used_rc, axis=-1)
      pick_r = jnp.take_along_axis(cand_rc, jnp.argmax(~is_used_rc, axis=-1)[:, None], axis=-1)[:, 0]

      def exact(used_rm=used_rm, live_rm=live_rm, pick_r=pick_r, exhausted_r=exhausted_r, column_r=column_r):
        scores_rv = _mask_padding(column_scores(column_r))
        used_rv = jnp.zeros(scores_rv.shape, bool).at[row_idx[:, None], jnp.where(live_rm, used_rm, 0)].set(True)
        best_r = jnp.argmax(jnp.where(used_rv, jnp.finfo(scores_rv.dtype).min, scores_rv), axis=-1)
        return jnp.where(exhausted_r, best_r.astype(pick_r.dtype), pick_r)

      pick_r = jax.lax.cond(jnp.any(exhausted_r), exact, lambda p=pick_r: p).astype(jnp.int32)
      picks.append(pick_r)
      if mode == "interleave":
        used_rm, count_r = add(used_rm, count_r, pick_r)
    return (used_rm, count_r, picks[0]), jnp.stack(picks, axis=-1)

  init = (jnp.zeros((rows, max_used), jnp.int32), jnp.zeros((rows,), jnp.int32), jnp.zeros((rows,), jnp.int32))
  xs = (
    batch["items"].T,
    batch["positions"].T,
    batch["seq_ids"].T,
    slot_rl.T,
    jnp.swapaxes(candidates_rlc, 0, 1),
    jnp.swapaxes(columns_rl, 0, 1),
  )
  _, picks_lrk = jax.lax.scan(step, init, xs)
  return jnp.swapaxes(picks_lrk, 0, 1)


def fill_prompts(picks_rlk: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
  """The prompted view's items: real items, and each slot's pick (``gen_col``, ``gen_rank``)."""
  rows = jnp.arange(picks_rlk.shape[0])[:, None]
  gen_col = batch["gen_col"]
  filled = picks_rlk[rows, jnp.maximum(gen_col, 0), batch["gen_rank"]]
  return jnp.where(gen_col >= 0, filled, batch["p_items"])
