"""Exact top-k of item scores over an item table sharded along the vocabulary.

The table ``[V, D]`` is split into ``S`` row blocks along the mesh's vocabulary axis (``V_loc = V / S`` rows per
shard); queries and exclusion lists are split along the batch axis. Two stages, under ``jax.shard_map``:

1. local: each shard scores its own rows (``[U_loc, V_loc]``), masks the padding id 0, the ids it holds from each
   user's exclusion list and the padded rows ``>= num_valid``, and keeps its top ``min(k, V_loc)`` (score, global
   id) pairs;
2. merge: the candidates are all-gathered over the vocabulary axis (``tiled``, shard-major) and a final
   ``lax.top_k`` over the ``min(k, V_loc) x S`` candidates of each user picks the result.

Per user, the devices therefore exchange ``min(k, V_loc) x S`` (score, id) pairs (``x (4 + 4)`` bytes for float32
scores and int32 ids), never the ``V`` scores of the whole table; :func:`recgpt_jax.parallel.hlo.collective_bytes`
reads this off the compiled HLO.

The result equals ``lax.top_k`` of the full masked score matrix exactly, ties included: ``lax.top_k`` prefers the
lower index, each shard's list is in (score desc, id asc) order and shards hold increasing id ranges, so on equal
scores the lower candidate index of the merge is also the lower global id.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from recgpt_jax.model import precision

AxisNames = str | Sequence[str] | None


def _axis_size(mesh: Mesh, axes: AxisNames) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def top_k(scores: jax.Array, k: int, approx_recall: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """``(values, indices)`` of the ``k`` best entries of the last axis, in descending order.

  ``approx_recall = 0`` is ``lax.top_k`` (exact, ties to the lower index). A value in ``(0, 1)`` is
  ``lax.approx_max_k`` with that recall target: on TPU a partial reduction (each of ``M`` lane windows keeps its
  maximum, then an exact top-k of the ``M`` maxima; expected recall ``~ exp(-(k - 1) / M)``) that skips the full
  sort; on CPU and GPU XLA falls back to the exact top-k. :func:`emulated_approx_max_k` reproduces the TPU
  reduction anywhere, to measure its recall.
  """
  if approx_recall:
    return jax.lax.approx_max_k(scores, k, recall_target=approx_recall)
  return jax.lax.top_k(scores, k)


def approx_windows(n: int, k: int, recall_target: float, tiling: int = 128) -> int:
  """The number of windows ``M`` TPU's ``approx_max_k`` reduces ``n`` entries to (``n`` = no reduction), as
  XLA's ``ApproxTopKReductionOutputSize`` computes it for operands of rank >= 2 (lane tiling 128): ``M`` solves
  ``exp((1 - k) / M) = recall_target``, at least one tile, the reduction a power of two."""
  if n <= tiling or k == 1 or recall_target >= 1.0:
    return n if k > 1 or n <= tiling else tiling
  m = min(max(int((1.0 - k) / math.log(recall_target)), tiling), n)
  log2_reduction = (n // m).bit_length() - 1
  if log2_reduction <= 0:
    return n
  log2_reduction = min(log2_reduction, max(0, (n // tiling - 1).bit_length()))
  tiles = -(-n // tiling)
  return -(-tiles // (1 << log2_reduction)) * tiling


def emulated_approx_max_k(scores: jax.Array, k: int, recall_target: float) -> tuple[jax.Array, jax.Array]:
  """TPU's approximate top-k in plain ``jnp``, for measuring its recall on machines that fall back to exact.

  Entry ``j`` of the last axis goes to window ``j mod M`` (``M = approx_windows``; strided windows, as TPU lanes
  hold them), each window keeps its maximum, and an exact top-k of the ``M`` maxima is the result: two of the
  true top ``k`` in one window lose the smaller. An estimate of the hardware's behaviour (the window layout of
  the TPU kernel is not documented; any assignment independent of the scores has the same expected recall).
  """
  n = scores.shape[-1]
  m = approx_windows(n, k, recall_target)
  if m >= n:
    return jax.lax.top_k(scores, k)
  reduction = -(-n // m)
  padded = jnp.pad(scores, [(0, 0)] * (scores.ndim - 1) + [(0, reduction * m - n)], constant_values=-jnp.inf)
  windows = padded.reshape(*scores.shape[:-1], reduction, m)  # [..., r, M]: entry j at (j // M, j % M)
  best_row = jnp.argmax(windows, axis=-2)  # [..., M]
  best = jnp.max(windows, axis=-2)
  values, pos = jax.lax.top_k(best, k)
  rows = jnp.take_along_axis(best_row, pos, axis=-1)
  return values, (rows * m + pos).astype(jnp.int32)


def pad_rows(table_vd: jax.Array, multiple: int) -> jax.Array:
  """Appends zero rows so that the number of rows is a multiple of ``multiple`` (mask them with ``num_valid``)."""
  pad = -table_vd.shape[0] % multiple
  return jnp.pad(table_vd, ((0, pad), (0, 0))) if pad else table_vd


def sharded_top_k(
  queries_ud: jax.Array,
  table_vd: jax.Array,
  k: int,
  *,
  mesh: Mesh,
  exclude_ue: jax.Array | None = None,
  bias_v: jax.Array | None = None,
  num_valid: int | None = None,
  noise_uv: jax.Array | None = None,
  vocab_axis: str = "model",
  batch_axis: AxisNames = "data",
  approx_recall: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
  """Top-``k`` items of ``queries_ud @ table_vd.T (+ bias_v)`` with the table sharded along the vocabulary.

  Equals, ids exactly (ties go to the lower id), ``lax.top_k`` of the full score matrix with column 0, each user's
  excluded ids and the ids ``>= num_valid`` set to ``finfo(dtype).min``. A user with fewer than ``k`` unmasked
  items gets masked ids (lowest first) with score ``finfo.min`` in the tail, as the unsharded version does.

  Can be called inside ``jax.jit``; ``k``, ``mesh``, ``num_valid`` and the axis names are static.

  Args:
    queries_ud: ``[U, D]`` user vectors, split along ``batch_axis`` (``U`` divisible by its size).
    table_vd: ``[V, D]`` item table, split along ``vocab_axis`` (``V`` divisible by its size: pad the table with
      :func:`pad_rows` and pass the real row count as ``num_valid``). Row = item id; id 0 is padding.
    k: number of items returned per user; at most the number of valid items ``num_valid - 1``.
    mesh: device mesh holding ``vocab_axis`` (and ``batch_axis``); the vocabulary axis may have size 1.
    exclude_ue: optional ``[U, E]`` integer ids in ``[0, V)`` to exclude per user, 0-padded (0 = none);
      duplicates are fine.
    bias_v: optional ``[V]`` per-item bias added to the scores.
    num_valid: rows ``>= num_valid`` are padding and never returned; default ``V``.
    noise_uv: optional ``[U, V]`` float32 added to the scores (before the masks), split like the score matrix
      (users along ``batch_axis``, items along ``vocab_axis``): e.g. scaled Gumbel noise, which makes the
      top-``k`` a draw without replacement (``recgpt_jax.train.prompts``).
    vocab_axis: mesh axis the table is split along.
    batch_axis: mesh axis (or tuple of axes, or ``None`` for no split) the users are split along.
    approx_recall: if > 0, each shard's local stage is ``top_k(..., approx_recall)`` (``lax.approx_max_k``; the
      merge stays exact), so the result is approximate where the hardware approximates.

  Returns:
    ``(scores_uk, ids_uk)``: scores (dtype of the scores) and int32 item ids, each row in descending score order.

  Raises:
    ValueError: if ``V`` is not divisible by the vocabulary-axis size, ``U`` not by the batch-axis size,
      ``num_valid`` is outside ``[1, V]`` or ``k`` is outside ``[1, num_valid - 1]``.
  """
  num_users, dim = queries_ud.shape
  vocab, table_dim = table_vd.shape
  if table_dim != dim:
    raise ValueError(f"queries have dimension {dim} but the table rows have {table_dim}")
  shards = mesh.shape[vocab_axis]
  if vocab % shards:
    raise ValueError(
      f"table of {vocab} rows is not divisible by the {shards} shards of mesh axis {vocab_axis!r}: pad it "
      f"(pad_rows(table_vd, {shards})) and pass num_valid={vocab}"
    )
  batch_shards = _axis_size(mesh, batch_axis)
  if num_users % batch_shards:
    raise ValueError(f"{num_users} users are not divisible by the {batch_shards} shards of batch axis {batch_axis!r}")
  num_valid = vocab if num_valid is None else int(num_valid)
  if not 1 <= num_valid <= vocab:
    raise ValueError(f"num_valid={num_valid} is outside [1, {vocab}]")
  if not 1 <= k <= num_valid - 1:
    raise ValueError(f"k={k} is outside [1, {num_valid - 1}]: there are {num_valid - 1} valid items (ids 1..)")
  if bias_v is not None and bias_v.shape != (vocab,):
    raise ValueError(f"bias has shape {bias_v.shape}, expected ({vocab},)")
  if exclude_ue is not None and (exclude_ue.ndim != 2 or exclude_ue.shape[0] != num_users):
    raise ValueError(f"exclusion list has shape {exclude_ue.shape}, expected ({num_users}, E)")
  if noise_uv is not None and noise_uv.shape != (num_users, vocab):
    raise ValueError(f"noise has shape {noise_uv.shape}, expected ({num_users}, {vocab})")

  vocab_loc = vocab // shards
  k_loc = min(k, vocab_loc)

  def local(q_ud, t_vd, b_v, ex_ue, noise_uv):
    scores_uv = precision.item_scores(q_ud, t_vd, b_v)  # float32 whatever the activation dtype
    if noise_uv is not None:
      scores_uv = scores_uv + noise_uv
    low = jnp.finfo(scores_uv.dtype).min
    offset = jax.lax.axis_index(vocab_axis) * vocab_loc if shards > 1 else 0
    ids_v = offset + jnp.arange(vocab_loc, dtype=jnp.int32)
    scores_uv = jnp.where((ids_v == 0) | (ids_v >= num_valid), low, scores_uv)
    if ex_ue is not None:
      local_ue = ex_ue.astype(jnp.int32) - offset
      # Ids of other shards point one past the end and are dropped.
      local_ue = jnp.where((local_ue >= 0) & (local_ue < vocab_loc), local_ue, vocab_loc)
      rows_u1 = jnp.arange(scores_uv.shape[0])[:, None]
      scores_uv = scores_uv.at[rows_u1, local_ue].set(low, mode="drop")
    top_uk, idx_uk = top_k(scores_uv, k_loc, approx_recall)
    if shards == 1:  # XLA would keep a trivial all-gather and a second top-k
      return top_uk, idx_uk
    cand_uc = jax.lax.all_gather(top_uk, vocab_axis, axis=1, tiled=True, to="invarying")
    cand_ids_uc = jax.lax.all_gather(idx_uk + offset, vocab_axis, axis=1, tiled=True, to="invarying")
    best_uk, pos_uk = jax.lax.top_k(cand_uc, k)
    return best_uk, jnp.take_along_axis(cand_ids_uc, pos_uk, axis=1)

  rows = P(batch_axis, None)
  # A vocabulary axis of size 1 is left out of the specs: split over it, the outputs would count as varying along
  # it and fail shard_map's replication check for out_specs.
  vocab_split = vocab_axis if shards > 1 else None
  fn = jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(
      rows,
      P(vocab_split, None),
      None if bias_v is None else P(vocab_split),
      None if exclude_ue is None else rows,
      None if noise_uv is None else P(batch_axis, vocab_split),
    ),
    out_specs=(rows, rows),
    check_vma=True,
  )
  return fn(queries_ud, table_vd, bias_v, exclude_ue, noise_uv)
