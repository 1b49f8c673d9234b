"""Serving recommendations from a trained run: Python API and the CLI's ``recommend`` mode.

Recommendations come from the multi-interest recall decoder (``recgpt_jax.recall.decoder``) with the
run's ``config.recall.quotas``: ``K = sum(quotas)`` distinct items per user, none from the user's
history, each with its score and the interest step that recalled it. A known user is served from their
whole sequence; a raw item history is served as an unknown user (user id 0).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import pathlib
from collections.abc import Sequence

import ml_collections
import numpy as np

from recgpt_jax.data import packing, split
from recgpt_jax.errors import UserError
from recgpt_jax.recall import decoder
from recgpt_jax.train import loop


@dataclasses.dataclass(frozen=True)
class Recommendations:
  """Top-K lists of several users, aligned by row.

  Attributes:
    users: ``[N]`` user ids (dense; 0 for raw histories).
    items: ``[N, K]`` item ids (dense), best first within each interest step.
    scores: ``[N, K]`` scores.
    steps: ``[N, K]`` 1-based interest step that recalled each item.
  """

  users: np.ndarray
  items: np.ndarray
  scores: np.ndarray
  steps: np.ndarray


class Recommender:
  """Recommends with the best (else latest) model of a run directory."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, batch_users: int = 1024):
    self.run = loop.Run(config, workdir)
    ckpt = self.run.ckpt
    if ckpt.has_best():
      self.params, _ = ckpt.restore_best(self.run.state.params)
    elif ckpt.latest_step() is not None:
      self.params = ckpt.restore(self.run.state)[0].params
    else:
      raise UserError(f"no checkpoint in {self.run.workdir}; train a model there first")
    self.quotas = tuple(config.recall.quotas)
    self.fn = decoder.make_recall_fn(self.run.graphdef, self.quotas, self.run.head, self.run.mesh)
    self.batch_users = batch_users
    data = self.run.data
    self._sequences = dict(zip(data.users.tolist(), data.sequences, strict=True))
    self._raw_users = data.user_map
    self._raw_items = None if data.item_map is None else {v: k for k, v in data.item_map.items()}

  @property
  def num_items(self) -> int:
    return self.run.data.num_items

  def user_id(self, user: str | int) -> int:
    """The dense id of ``user`` (a raw id when the data came with an id map)."""
    if self._raw_users is not None:
      if str(user) not in self._raw_users:
        raise UserError(f"unknown user id {user!r}")
      return self._raw_users[str(user)]
    try:
      uid = int(user)
    except ValueError:
      raise UserError(f"user id {user!r} is not an integer") from None
    if uid not in self._sequences:
      raise UserError(f"unknown user id {user!r} (this dataset has {len(self._sequences)} users)")
    return uid

  def for_users(self, users: Sequence[str | int]) -> Recommendations:
    """Recommendations for known users, from their whole sequences."""
    return self._for_ids([self.user_id(u) for u in users])

  def _for_ids(self, ids: Sequence[int]) -> Recommendations:
    return self._recommend(np.asarray(ids, np.int32), [self._sequences[u] for u in ids])

  def for_histories(self, histories: Sequence[Sequence[int]]) -> Recommendations:
    """Recommendations for raw item histories (dense item ids, oldest first), as unknown users."""
    checked = []
    for i, h in enumerate(histories):
      h = np.asarray(h, dtype=np.int64)
      if h.size == 0:
        raise UserError(f"history {i + 1} is empty; give at least one item")
      bad = h[(h < 1) | (h > self.num_items)]
      if bad.size:
        raise UserError(f"history {i + 1}: item id {int(bad[0])} is out of range 1..{self.num_items}")
      checked.append(h.astype(np.int32))
    return self._recommend(np.zeros(len(checked), np.int32), checked)

  def _recommend(self, users: np.ndarray, histories: list[np.ndarray]) -> Recommendations:
    if not histories:
      raise UserError("no users to recommend for")
    max_len = self.run.config.max_len
    eval_set = split.EvalSet(
      users=users,
      windows=[h[-max_len:] for h in histories],
      answers=np.ones(len(histories), np.int32),  # marks real slots; no answer is scored here
      histories=histories,
    )
    batches = packing.pack_eval_batches(
      eval_set,
      row_len=self.run.config.train.row_len,
      rows_per_batch=self.run.config.eval.rows_per_batch,
      users_per_batch=min(self.batch_users, self.run.config.eval.users_per_batch),
    )
    out = decoder.recall_all(self.fn, self.params, batches)
    return Recommendations(users=users, items=out["items"], scores=out["scores"], steps=out["steps"] + 1)

  def raw_item(self, item: int) -> str:
    """The raw id of a dense item id (the id itself when the data has no id map)."""
    return str(item) if self._raw_items is None else self._raw_items[int(item)]

  def raw_user(self, user: int) -> str:
    if self._raw_users is None or user == 0:
      return str(user)
    if not hasattr(self, "_user_inverse"):
      self._user_inverse = {v: k for k, v in self._raw_users.items()}
    return self._user_inverse[int(user)]

  def export(self, path: str | os.PathLike) -> int:
    """Writes every user's recommendations to a CSV (``user,rank,item,score,step``, raw ids if any).

    Written to a temporary file and renamed, so an existing export is replaced only when complete.

    Returns:
      The number of users written.
    """
    path = pathlib.Path(path)
    users = sorted(self._sequences)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["user", "rank", "item", "score", "step"])
      for lo in range(0, len(users), 8192):
        rec = self._for_ids(users[lo : lo + 8192])
        for u, items, scores, steps in zip(rec.users, rec.items, rec.scores, rec.steps, strict=True):
          raw_u = self.raw_user(int(u))
          for rank, (item, score, step) in enumerate(zip(items, scores, steps, strict=True), start=1):
            writer.writerow([raw_u, rank, self.raw_item(item), f"{score:.6g}", int(step)])
    os.replace(tmp, path)
    return len(users)
