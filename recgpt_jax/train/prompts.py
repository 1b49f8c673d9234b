"""On-device prompt generation for prompt-tuning (no gradient, current parameters, every step).

Given a ranked list of candidate items for every column of the *real* view of a packed batch (the user's
true prefix), a ``lax.scan`` over the columns picks the generated items: at column ``t`` it adds the item
the prompted sequence holds at ``t`` to the user's *used* set and takes the first candidates not in it, so
a generated item never repeats an item already in its prefix (real or generated). The scan resets the set
where a new user starts in the row; it is cheap next to the forward pass that produced the scores. The
layout (which slot takes which pick) comes from ``recgpt_jax.data.prompts``.

Where the candidates come from (``SOURCES``, ``PromptConfig.source``):

* ``'top'`` (the paper): the model's best items, in score order: the picks are the best unused items.
* ``'sample'``: the top of ``scores + T * Gumbel`` (``column_noise``), which ranks like ``scores / T +
  Gumbel``: by the Gumbel-top-k trick the picks are a draw without replacement from ``softmax(scores / T)``
  restricted to the unused items.
* ``'uniform'`` and ``'popularity'``: no model; ``NUM_CANDIDATES`` independent draws with replacement from
  fixed item weights (``drawn_candidates``: 1 per item, or the training-set counts), in draw order. The
  first unused draw is distributed as the weights restricted to the unused items, which is again a draw
  without replacement (a repeat of a used or already-picked item is skipped).

A column whose candidates are all used falls back to the exact argmax over the whole catalogue of the
same ranking (``pick_from_candidates``' ``column_scores``): the same Gumbel noise for ``'sample'``, fresh
noise on the log-weights for the model-free sources (exact too: draws past the ``NUM_CANDIDATES``-th would
be independent of the first ones).

Aligned prompting (``aligned_targets``) retargets the positions holding a shown prompt to the feedback:
what the user really did next after the prefix that generated it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from recgpt_jax.parallel import topk

# Candidates per column kept by the scan (see pick_prompt_items); the exact fallback keeps it correct.
NUM_CANDIDATES = 32

SOURCES = ("top", "sample", "uniform", "popularity")
# Sources that choose items without the model (no generation forward pass).
MODEL_FREE_SOURCES = ("uniform", "popularity")


def _mask_padding(scores: jax.Array) -> jax.Array:
  """Column 0 (padding) gets the lowest score, so it is never a candidate."""
  return jnp.where(jnp.arange(scores.shape[-1]) == 0, jnp.finfo(scores.dtype).min, scores)


def top_candidates(scores_rlv: jax.Array, approx_recall: float = 0.0) -> jax.Array:
  """The ``NUM_CANDIDATES`` best items of every column in score order (column 0 excluded); ``approx_recall``: 0 =
  exact, else ``lax.approx_max_k``'s recall target (``topk.top_k``)."""
  k = min(NUM_CANDIDATES, scores_rlv.shape[-1] - 1)
  return topk.top_k(_mask_padding(scores_rlv), k, approx_recall)[1]


def column_noise(key: jax.Array, column: jax.Array | int, shape: tuple[int, ...]) -> jax.Array:
  """Standard Gumbel noise (float32) of one column: a function of ``key`` and the column index only."""
  return jax.random.gumbel(jax.random.fold_in(key, column), shape, jnp.float32)


def gumbel_noise(key: jax.Array, rows: int, length: int, vocab: int) -> jax.Array:
  """``[rows, length, vocab]`` Gumbel noise whose column ``t`` is ``column_noise(key, t, (rows, vocab))``."""
  return jax.vmap(lambda t: column_noise(key, t, (rows, vocab)), out_axes=1)(jnp.arange(length))


def item_weights(source: str, num_items: int, item_counts: jax.Array | None = None) -> jax.Array:
  """``[num_items + 1]`` int32 weights a model-free source draws items with; the padding id 0 gets 0.

  ``'uniform'``: 1 per item. ``'popularity'``: ``item_counts`` (training-set counts, ``[num_items + 1]``);
  an item with count 0 is never drawn.
  """
  ids = jnp.arange(num_items + 1)
  if source == "uniform":
    return (ids > 0).astype(jnp.int32)
  if source != "popularity":
    raise ValueError(f"source {source!r} draws no fixed item weights; expected one of {MODEL_FREE_SOURCES}")
  if item_counts is None:
    raise ValueError("prompt.source='popularity' needs item_counts (training-set count of every item id)")
  if item_counts.shape != (num_items + 1,):
    raise ValueError(f"item_counts has shape {item_counts.shape}, expected ({num_items + 1},) (index 0 = padding)")
  return jnp.where(ids > 0, jnp.asarray(item_counts), 0).astype(jnp.int32)


def drawn_candidates(key: jax.Array, weights_v: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """``[*shape, NUM_CANDIDATES]`` int32 independent draws of item ``v`` with probability ``weights[v] / sum``.

  Exact integer inverse-CDF sampling: ``u`` uniform in ``[0, sum)`` selects the first ``v`` whose
  cumulative weight exceeds it, so a zero-weight item is never drawn (the weights must sum below 2**31).
  No ``[.., items]`` array is formed, so the same code serves any mesh.
  """
  cumulative_v = jnp.cumsum(weights_v.astype(jnp.int32))
  u = jax.random.randint(key, (*shape, NUM_CANDIDATES), 0, cumulative_v[-1], dtype=jnp.int32)
  return jnp.searchsorted(cumulative_v, u, side="right").astype(jnp.int32)


def log_weights(weights_v: jax.Array) -> jax.Array:
  """``log(weights)`` as float32 scores, zero weights at the lowest float (the exact fallback's ranking)."""
  return jnp.where(weights_v > 0, jnp.log(jnp.maximum(weights_v, 1).astype(jnp.float32)), jnp.finfo(jnp.float32).min)


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
  return pick_from_candidates(candidates_rlc, batch, mode, width, scores_rlv, lambda column_rv, _: column_rv)


def pick_from_candidates(
  candidates_rlc: jax.Array,
  batch: dict[str, jax.Array],
  mode: str,
  width: int,
  columns_rl: Any,
  column_scores: Callable[[Any, jax.Array], jax.Array],
) -> jax.Array:
  """Chooses the generated items, column by column: the first candidates not in the user's used set.

  Args:
    candidates_rlc: ``[rows, len, c]`` ranked candidate items of each column (column 0 excluded), from
      ``top_candidates``, the two-stage top-k over a vocabulary-sharded table or ``drawn_candidates``
      (repeats allowed).
    batch: the prompt-tuning batch (``items``, ``positions``, ``seq_ids`` of the real view; ``gen_col``).
    mode: ``'last'`` (only one pick per column is used: it fills slot ``t + 1`` and then counts as the
      item at ``t + 1``) or ``'interleave'`` (``width`` picks after each real item, all added to the used
      set).
    width: prompt width ``w``.
    columns_rl: a pytree of ``[rows, len, ...]`` arrays (or ``None``), what ``column_scores`` needs for one
      column: the hidden states (the model scores a column only when its candidates run out) or the
      scores themselves.
    column_scores: ``(columns_r, t) -> [rows, items + 1]`` the ranking the candidates come from, over every
      item, for column ``t`` (a traced scalar) given ``columns_rl``'s slices at ``t``. Only called when some
      row's candidates at ``t`` are all used.

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
    t, item_r, pos_r, seq_r, slot_r, cand_rc, column_r = xs
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
        scores_rv = _mask_padding(column_scores(column_r, t))
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
    jnp.arange(length),
    batch["items"].T,
    batch["positions"].T,
    batch["seq_ids"].T,
    slot_rl.T,
    jnp.swapaxes(candidates_rlc, 0, 1),
    jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), columns_rl),
  )
  _, picks_lrk = jax.lax.scan(step, init, xs)
  return jnp.swapaxes(picks_lrk, 0, 1)


def fill_prompts(picks_rlk: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
  """The prompted view's items: real items, and each slot's pick (``gen_col``, ``gen_rank``)."""
  rows = jnp.arange(picks_rlk.shape[0])[:, None]
  gen_col = batch["gen_col"]
  filled = picks_rlk[rows, jnp.maximum(gen_col, 0), batch["gen_rank"]]
  return jnp.where(gen_col >= 0, filled, batch["p_items"])


def feedback(batch: dict[str, jax.Array]) -> jax.Array:
  """``[rows, len]`` at each prompt slot, what the user really did next after the prefix that generated it
  (the real view's target at ``gen_col``); 0 elsewhere."""
  rows = jnp.arange(batch["gen_col"].shape[0])[:, None]
  slot = batch["gen_col"] >= 0
  return jnp.where(slot, batch["targets"][rows, jnp.maximum(batch["gen_col"], 0)], 0)


def exclude_first_list(
  targets_rl: jax.Array, exclude_rle: jax.Array, candidates_rlc: jax.Array, batch: dict[str, jax.Array], top: int
) -> tuple[jax.Array, jax.Array]:
  """Aligned prompting against a whole first recall list: each slot also excludes the ``top`` best items of
  the column that generated it (``candidates_rlc``, the model's items in score order, history included), as
  the second step of the multi-interest recall excludes the first step's list. A slot whose feedback is in
  that list has no loss (the first step already recalls it).

  Returns:
    ``(targets, exclude)``: ``exclude`` grows by ``top`` ids per position (0 outside slots).
  """
  rows = jnp.arange(candidates_rlc.shape[0])[:, None]
  slot = batch["gen_col"] >= 0
  listed = jnp.where(slot[..., None], candidates_rlc[rows, jnp.maximum(batch["gen_col"], 0), :top], 0)
  found = jnp.any(listed == targets_rl[..., None], axis=-1) & slot
  targets = jnp.where(found, 0, targets_rl).astype(jnp.int32)
  return targets, jnp.concatenate([exclude_rle, listed.astype(jnp.int32)], axis=-1)


def aligned_targets(
  picks_rlk: jax.Array, batch: dict[str, jax.Array], feedback_rl: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Targets and softmax exclusions of aligned prompting.

  A slot filled with pick ``j`` of real-view column ``c`` shows the items of its prompt group so far (picks
  ``0..j`` of ``c``: its own item and, with ``'interleave'`` width > 1, those shown before it, truncated from
  the view or not); its target becomes the feedback (the real target at ``c``) and the group's items are
  excluded from its softmax. A slot whose group holds the feedback (the model guessed right) has no loss.
  Real positions keep their targets and exclude nothing.

  Args:
    picks_rlk: ``[rows, len, picks]`` the picks of every real-view column (``pick_from_candidates``).
    batch: the prompt-tuning batch (``gen_col``, ``gen_rank``, ``p_targets``).
    feedback_rl: ``feedback(batch)``.

  Returns:
    ``(targets [rows, len], exclude [rows, len, picks])``: int32, exclusions 0-padded (0 = none).
  """
  rows = jnp.arange(picks_rlk.shape[0])[:, None]
  gen_col = batch["gen_col"]
  slot = gen_col >= 0
  group_rlk = picks_rlk[rows, jnp.maximum(gen_col, 0)]
  shown_rlk = slot[..., None] & (jnp.arange(picks_rlk.shape[-1]) <= batch["gen_rank"][..., None])
  exclude = jnp.where(shown_rlk, group_rlk, 0).astype(jnp.int32)
  guessed = jnp.any(exclude == feedback_rl[..., None], axis=-1) & (feedback_rl > 0)
  targets = jnp.where(slot, jnp.where(guessed, 0, feedback_rl), batch["p_targets"])
  return targets.astype(jnp.int32), exclude
