"""Full-ranking evaluation: HR@K and NDCG@K with the user's history excluded, top-k on device.

One held-out answer per user, so HR@K equals Recall@K. An answer that is itself in the history (a repeat
interaction) is excluded with the history and therefore counts as a miss, as in the reference protocol.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recgpt_jax.parallel import mesh as mesh_lib
from recgpt_jax.parallel import topk

KS = (5, 10, 20)
METRIC_NAMES = tuple(f"{m}@{k}" for m in ("HR", "NDCG") for k in KS)


def exclude_items(scores_uv: jax.Array, exclude_uh: jax.Array) -> jax.Array:
  """Sets the scores of padding (column 0) and of each user's excluded items (0-padded) to the minimum."""
  low = jnp.finfo(scores_uv.dtype).min
  rows = jnp.arange(scores_uv.shape[0])[:, None]
  return scores_uv.at[rows, exclude_uh].set(low).at[:, 0].set(low)


def ranking_metrics(
  scores_uv: jax.Array,
  answer_u: jax.Array,
  exclude_uh: jax.Array,
  ks: Sequence[int] = KS,
  approx_recall: float = 0.0,
) -> dict[str, jax.Array]:
  """Per-user HR@k and NDCG@k.

  Args:
    scores_uv: ``[users, num_items + 1]`` scores; column = item id.
    answer_u: ``[users]`` held-out item of each user.
    exclude_uh: ``[users, H]`` item ids to exclude from the ranking (0 = none).
    ks: cut-offs.
    approx_recall: 0 = exact top-k, else ``lax.approx_max_k``'s recall target (``topk.top_k``).

  Returns:
    Dict ``'HR@k'`` / ``'NDCG@k'`` -> ``[users]`` float32 values.
  """
  scores_uv = exclude_items(scores_uv, exclude_uh)
  _, top_uk = topk.top_k(scores_uv, max(ks), approx_recall)
  return list_metrics(top_uk, answer_u, ks)


def list_metrics(items_uk: jax.Array, answer_u: jax.Array, ks: Sequence[int] = KS) -> dict[str, jax.Array]:
  """Per-user HR@k and NDCG@k of ranked recommendation lists ``[users, K]`` (``k <= K``)."""
  if max(ks) > items_uk.shape[-1]:
    raise ValueError(f"cut-off {max(ks)} is longer than the {items_uk.shape[-1]} recommended items")
  is_answer = items_uk == answer_u[:, None]
  found = jnp.any(is_answer, axis=-1)
  rank = jnp.argmax(is_answer, axis=-1)  # 0-based rank of the answer when found
  out = {}
  for k in ks:
    hit = found & (rank < k)
    out[f"HR@{k}"] = hit.astype(jnp.float32)
    out[f"NDCG@{k}"] = jnp.where(hit, 1.0 / jnp.log2(rank + 2.0), 0.0)
  return out


def make_eval_step(
  graphdef: nnx.GraphDef,
  ks: Sequence[int] = KS,
  head: str = "tied",
  recall_fn=None,
  mesh: jax.sharding.Mesh | None = None,
  param_shardings=None,
  *,
  per_user: bool = False,
  approx_recall: float = 0.0,
):
  """Returns a jitted ``(params, batch) -> sums`` of each metric over the batch's real users.

  With ``per_user``, the step returns every slot's metrics instead (``[users_per_batch]`` arrays, plus
  ``answer``: 0 marks an empty slot), for ``evaluate_per_user``.

  Without ``recall_fn`` the ranking is the full catalogue scored by the last hidden state; with it (a
  multi-interest recall function of ``recgpt_jax.recall.decoder``) the ranking is its merged list.
  With ``mesh`` (axes ``data``, ``model``) the batch is split over ``data`` and the top items come from
  the two-stage top-k over the vocabulary-sharded table (``recgpt_jax.parallel.topk``); ``param_shardings``
  then gives the parameters' shardings (the jit's explicit input shardings). ``approx_recall`` (0 = exact) makes
  the full-catalogue top-k approximate (``topk.top_k``; a ``recall_fn`` has its own setting).
  """

  def eval_step(params, batch):
    with mesh_lib.kernel_mesh(mesh, nnx.merge(graphdef, params).cfg.attention_impl):
      return _eval_step(params, batch)

  def _eval_step(params, batch):
    if recall_fn is not None:
      per_user_metrics = list_metrics(recall_fn(params, batch)["items"], batch["answer"], ks)
    else:
      model = nnx.merge(graphdef, params)
      hidden = model(batch["items"], batch["positions"], batch["segments"], batch["seq_ids"], batch["users"])
      user_hidden = hidden[batch["last_row"], batch["last_col"]]  # [users, hidden]
      if mesh is None:
        scores = model.logits(user_hidden, head)
        per_user_metrics = ranking_metrics(scores, batch["answer"], batch["history"], ks, approx_recall)
      else:
        table, bias = model.head_weights(head)
        _, top_uk = topk.sharded_top_k(
          user_hidden,
          table,
          max(ks),
          mesh=mesh,
          exclude_ue=batch["history"],
          bias_v=bias,
          num_valid=model.cfg.num_items + 1,
          approx_recall=approx_recall,
        )
        per_user_metrics = list_metrics(top_uk, batch["answer"], ks)
    if per_user:
      return per_user_metrics | {"answer": batch["answer"]}
    real = (batch["answer"] > 0).astype(jnp.float32)
    sums = {name: jnp.sum(v * real) for name, v in per_user_metrics.items()}
    sums["users"] = jnp.sum(real)
    return sums

  if mesh is None:
    return jax.jit(eval_step)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  return jax.jit(eval_step, in_shardings=(param_shardings, batch_sharding), out_shardings=replicated)


def evaluate(eval_step, params, batches: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
  """Averages each metric over all users of ``batches``; accumulates on device, one host sync."""
  total = None
  for batch in batches:
    sums = eval_step(params, batch)
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  if total is None:
    raise ValueError("no evaluation batches")
  total = jax.device_get(total)
  users = float(total.pop("users"))
  return {name: float(v) / users for name, v in total.items()} | {"users": int(users)}


def evaluate_per_user(eval_step, params, batches: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Every real user's metrics, in batch order, from a ``make_eval_step(..., per_user=True)`` step.

  Returns:
    ``answer`` (the held-out items) and one float32 ``[users]`` array per metric.
  """
  parts = [jax.device_get(eval_step(params, batch)) for batch in batches]
  if not parts:
    raise ValueError("no evaluation batches")
  out = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}
  real = out["answer"] > 0
  return {k: v[real] for k, v in out.items()}
