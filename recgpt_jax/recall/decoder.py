"""Autoregressive multi-interest recall: S interest steps with static quotas ``m_1..m_S``, K = sum.

Step ``s`` scores the item table with the interest vector ``h_s``, excludes the user's full history and
everything recalled so far, and takes its quota ``m_s`` (top ``m_s`` in score order). Its first item (the
top-1 after exclusion) is the generated item: it is appended with segment 1 at the next position by one
incremental decode step (``model.decode``), and the hidden state there is ``h_{s+1}``. The last step
needs no decode. With ``S = 2`` and quotas ``(m, n)`` this is the reference's two-step recall; ``S = 1``
is the plain top-K.

The whole recall of one evaluation batch is one jitted function: a prefill, then a ``lax.scan`` over the
first ``S - 1`` steps (select + decode) and a final select, all on device.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recgpt_jax.eval.metrics import exclude_items
from recgpt_jax.model import decode
from recgpt_jax.parallel import mesh as mesh_lib
from recgpt_jax.parallel import topk

PREFILL_INPUTS = ("items", "positions", "segments", "seq_ids", "users", "last_row", "last_col")
OUTPUTS = ("items", "scores", "steps", "users")


def step_layout(quotas: Sequence[int]) -> np.ndarray:
  """``[K]`` 0-based interest step of each output column: ``m_1`` zeros, then ``m_2`` ones, ..."""
  return np.repeat(np.arange(len(quotas), dtype=np.int32), quotas)


def make_recall_fn(
  graphdef: nnx.GraphDef, quotas: Sequence[int], head: str = "tied", mesh=None, approx_recall: float = 0.0
):
  """Returns a jitted ``(params, batch) -> dict`` recalling ``K = sum(quotas)`` items per user slot.

  Args:
    graphdef: the model's graph definition; ``params`` is the matching plain parameter dict.
    quotas: ``m_1..m_S``, items taken at each interest step (static, each >= 1).
    head: which head scores items: ``'tied'`` (item table) or ``'untied'``.
    mesh: optional mesh (axes ``data``, ``model``): each step's top items then come from the two-stage
      top-k over the vocabulary-sharded table (``recgpt_jax.parallel.topk``), exclusions still exact.
    approx_recall: 0 = exact top-k at every step, else ``lax.approx_max_k``'s recall target (``topk.top_k``).

  Returns:
    ``fn(params, batch)`` over one evaluation batch (``packing.pack_eval_batches``) returning
    ``items`` ``[U, K]`` int32 (step 1's items first, each step's in score order), ``scores`` ``[U, K]``,
    ``steps`` ``[U, K]`` int32 (0-based interest step of each item) and ``users`` ``[U]`` (the user id of
    each slot). Empty slots (``answer == 0``) hold meaningless values. Every real user gets ``K`` distinct
    items, none from its history, provided the catalogue has ``K`` items outside that history.
  """
  quotas = tuple(int(m) for m in quotas)
  if not quotas or min(quotas) < 1:
    raise ValueError(f"recall quotas must be a non-empty list of positive ints, got {quotas}")
  num_steps = len(quotas)
  steps_k = step_layout(quotas)
  # The scanned steps (all but the last) share one top-k size; each keeps only its own quota.
  scan_quotas = quotas[:-1]
  scan_k = max(scan_quotas, default=1)

  @jax.jit
  def recall(params, batch):
    with mesh_lib.kernel_mesh(mesh, nnx.merge(graphdef, params).cfg.attention_impl):
      return _recall(params, batch)

  def _recall(params, batch):
    model = nnx.merge(graphdef, params)
    hidden_ud, state = decode.prefill(model, *(batch[k] for k in PREFILL_INPUTS), max_steps=num_steps - 1)
    history_uh = batch["history"]
    num_slots = hidden_ud.shape[0]

    def select(h_ud, recalled_ur, m):
      """Top ``m`` (scores, items) after excluding the history and the recalled items (0 = none)."""
      exclude_ue = jnp.concatenate([history_uh, recalled_ur], axis=1)
      if mesh is not None:
        table, bias = model.head_weights(head)
        top = topk.sharded_top_k(
          h_ud,
          table,
          m,
          mesh=mesh,
          exclude_ue=exclude_ue,
          bias_v=bias,
          num_valid=model.cfg.num_items + 1,
          approx_recall=approx_recall,
        )
        return jax.lax.optimization_barrier(top)
      scores_uv = exclude_items(model.logits(h_ud, head), exclude_ue)  # [U, vocab_size]
      # The barrier keeps XLA from folding later slices (e.g. the top-1) into the top-k: that breaks its
      # rewrite to a partial top-k, and the full sort of the scores made a 2-step recall 7x slower on CPU.
      return jax.lax.optimization_barrier(topk.top_k(scores_uv, m, approx_recall))

    def interest_step(carry, s):
      state, h_ud, recalled_usm = carry  # recalled_usm: [U, S - 1, scan_k], 0 past each step's quota
      top_scores, top_items = select(h_ud, recalled_usm.reshape(num_slots, (num_steps - 1) * scan_k), scan_k)
      kept = jnp.where(jnp.arange(scan_k) < jnp.asarray(scan_quotas)[s], top_items, 0)
      recalled_usm = recalled_usm.at[:, s].set(kept)
      generated_u = top_items[:, 0]
      h_ud, state = decode.decode_step(
        model, state, generated_u, jnp.ones_like(generated_u), state.position + 1, state.user
      )
      return (state, h_ud, recalled_usm), (top_items, top_scores)

    recalled_usm = jnp.zeros((num_slots, num_steps - 1, scan_k), jnp.int32)
    items, scores = [], []
    if num_steps > 1:
      carry = (state, hidden_ud, recalled_usm)
      (_, hidden_ud, recalled_usm), (items_sum, scores_sum) = jax.lax.scan(
        interest_step, carry, jnp.arange(num_steps - 1)
      )
      items = [items_sum[s, :, :m] for s, m in enumerate(scan_quotas)]
      scores = [scores_sum[s, :, :m] for s, m in enumerate(scan_quotas)]
    last_scores, last_items = select(hidden_ud, recalled_usm.reshape(num_slots, (num_steps - 1) * scan_k), quotas[-1])
    return {
      "items": jnp.concatenate([*items, last_items], axis=1),
      "scores": jnp.concatenate([*scores, last_scores], axis=1),
      "steps": jnp.broadcast_to(jnp.asarray(steps_k), (num_slots, len(steps_k))),
      "users": state.user,
    }

  return recall


def recall_all(fn, params, batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Runs ``fn`` (from ``make_recall_fn``) over all batches; keeps the real users (``answer > 0``).

  All batches are dispatched before the single transfer back to the host.

  Args:
    fn: the jitted recall function.
    params: model parameters.
    batches: evaluation batches.

  Returns:
    ``items``, ``scores``, ``steps`` ``[N, K]``, ``users`` and ``answer`` ``[N]``, real users in batch order.
  """
  outs, answers = [], []
  for batch in batches:
    outs.append(fn(params, batch))
    answers.append(np.asarray(batch["answer"]))
  if not outs:
    raise ValueError("no recall batches")
  outs = jax.device_get(outs)
  real = [a > 0 for a in answers]
  result = {name: np.concatenate([o[name][r] for o, r in zip(outs, real, strict=True)]) for name in OUTPUTS}
  result["answer"] = np.concatenate([a[r] for a, r in zip(answers, real, strict=True)])
  return result
