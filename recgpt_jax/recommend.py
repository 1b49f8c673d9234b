"""Serving recommendations from a trained run: Python API and the CLI's ``recommend`` mode.

Recommendations come from the multi-interest recall decoder (``recgpt_jax.recall.decoder``) with the
run's ``config.recall.quotas``: ``K = sum(quotas)`` distinct items per user, none from the user's
history, each with its score and the interest step that recalled it. A known user is served from their
whole sequence; an item history is served as an unknown user (user id 0).

Ids: the API takes the ids of the data file. For an interaction log (``.csv``/``.tsv``) those are the *raw* ids,
strings, mapped to the dense ids the model uses through the id maps saved beside the run
(``io.SequenceData.save_id_maps``); an int is looked up as its decimal text. For the RecGPT text format the
raw ids are the dense ids, ints. Results (:class:`Recommendations`) hold dense ids; :meth:`Recommender.raw_user`
and :meth:`Recommender.raw_item` turn them back into raw ids, as the command line prints and exports them.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib
import re
from collections.abc import Sequence

import ml_collections
import numpy as np

from recgpt_jax import config as config_lib
from recgpt_jax.data import packing, split
from recgpt_jax.errors import RequestError, UserError
from recgpt_jax.recall import decoder
from recgpt_jax.train import loop
from recgpt_jax.train import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class Recommendations:
  """Top-K lists of several users, aligned by row.

  Attributes:
    users: ``[N]`` user ids (dense; 0 for item histories).
    items: ``[N, K]`` item ids (dense: ``Recommender.raw_item`` gives the raw id), best first within each
      interest step.
    scores: ``[N, K]`` scores.
    steps: ``[N, K]`` 1-based interest step that recalled each item.
  """

  users: np.ndarray
  items: np.ndarray
  scores: np.ndarray
  steps: np.ndarray


_INT_TEXT = re.compile(r"[+-]?[0-9]+", re.ASCII)


def _short(value) -> str:
  """``repr(value)``, shortened for a one-line message."""
  text = " ".join(repr(value).split())
  return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value) -> bool:
  """An int or numpy integer (not a bool)."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _id_list(values, what: str) -> list:
  """``values`` as a list, or RequestError if it is not a list/tuple/1-D array (a lone id, a string...)."""
  if isinstance(values, np.ndarray) and values.ndim == 1:
    return values.tolist() if values.dtype.kind in "iu" else list(values)
  if not isinstance(values, (list, tuple)):
    raise RequestError(f"{what} must be a list of ids, got {_short(values)}")
  return list(values)


def check_run_dir(workdir: str | os.PathLike) -> pathlib.Path:
  """Raises UserError unless ``workdir`` is a directory that holds a saved model; creates nothing."""
  wd = pathlib.Path(workdir)
  workdir_lib.check_readable(wd, "recommendations")
  return wd


def check_model_compatible(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
  """Raises ConfigError unless the run in ``workdir`` has the data and architecture of ``config``; reads only."""
  workdir_lib.check_model_compatible(pathlib.Path(workdir), json.loads(config.to_json()))


def check_export_path(path: str | os.PathLike) -> pathlib.Path:
  """Raises RequestError when recommendations cannot be written to ``path`` (checked before computing them).

  Missing parent directories are fine (``export`` creates them); a directory at ``path``, a regular file where
  a parent directory should be, or a directory this process may not write to are not.
  """
  path = pathlib.Path(path)
  try:
    if path.is_dir():
      raise RequestError(f"cannot export to {path}: it is a directory; give a file name")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
      parent = parent.parent
    if not parent.is_dir():
      raise RequestError(f"cannot export to {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
      raise RequestError(f"cannot export to {path}: directory {parent} is not writable")
  except OSError as e:
    raise RequestError(f"cannot export to {path}: {e.strerror or e}") from None
  return path


class Recommender:
  """Recommends with the best (else latest) model of a run directory.

  Raises UserError, before anything is written, when ``workdir`` is not a run directory holding a model.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, batch_users: int = 1024):
    # Both before loop.Run: its checkpoint managers create best/ and checkpoints/, and restoring a model of
    # another architecture must be refused, never attempted.
    check_run_dir(workdir)
    config_lib.validate(config)
    check_model_compatible(config, workdir)
    self.run = loop.Run(config, workdir, writer=False)
    ckpt = self.run.ckpt
    try:
      if ckpt.has_best():
        self.params, _ = ckpt.restore_best(self.run.state.params)
      elif ckpt.latest_step() is not None:
        self.params = ckpt.restore(self.run.state)[0].params
      else:
        raise UserError(f"no checkpoint in {self.run.workdir}; train a model there first")
    finally:
      ckpt.close()  # only the parameters are needed: release the checkpoint managers (and their threads)
    self.quotas = tuple(config.recall.quotas)
    approx = config.eval.get("approx_recall", 0.0)
    self.fn = decoder.make_recall_fn(self.run.graphdef, self.quotas, self.run.head, self.run.mesh, approx)
    self.batch_users = batch_users
    data = self.run.data
    # A store's sequences stay on disk: a mapping that reads a user's record when asked.
    sequence_map = getattr(data, "sequence_map", None)
    self._sequences = sequence_map() if sequence_map else dict(zip(data.users.tolist(), data.sequences, strict=True))
    self._raw_users = data.user_map
    self._item_map = data.item_map
    self._raw_items = None if data.item_map is None else {v: k for k, v in data.item_map.items()}

  @property
  def num_items(self) -> int:
    return self.run.data.num_items

  @property
  def raw_ids(self) -> bool:
    """Whether the data has id maps (an interaction log): raw ids are then strings, not the dense ids."""
    return self._raw_users is not None

  def parse_user(self, text: str) -> str | int:
    """A user id typed on the command line, as :meth:`user_id` takes it (an int unless raw ids are strings)."""
    return self._parse(text, "user", self._raw_users is not None)

  def parse_item(self, text: str) -> str | int:
    """An item id typed on the command line, as :meth:`item_id` takes it (an int unless raw ids are strings)."""
    return self._parse(text, "item", self._item_map is not None)

  @staticmethod
  def _parse(text: str, what: str, raw: bool) -> str | int:
    text = text.strip()
    if raw:
      return text
    if not _INT_TEXT.fullmatch(text):
      raise RequestError(f"{what} id {_short(text)} is not an integer")
    return int(text)

  def user_id(self, user: str | int) -> int:
    """The dense id of user ``user``: a raw id (str, or an int looked up as its text) when the data has an id
    map, else an int (or numpy integer) dense id."""
    if self._raw_users is not None:
      if not (isinstance(user, str) or _is_int(user)):
        raise RequestError(f"user id {_short(user)} must be a string or an integer")
      key = user if isinstance(user, str) else str(int(user))
      if key not in self._raw_users:
        raise RequestError(f"unknown user id {_short(key)}")
      return self._raw_users[key]
    if not _is_int(user):
      raise RequestError(f"user id {_short(user)} is not an integer")
    uid = int(user)
    if uid not in self._sequences:
      raise RequestError(f"unknown user id {uid} (this dataset has {len(self._sequences)} users)")
    return uid

  def item_id(self, item: str | int) -> int:
    """The dense id of item ``item``: a raw id (str, or an int looked up as its text) when the data has an id
    map, else an int (or numpy integer) in ``1..num_items``."""
    if self._item_map is not None:
      if not (isinstance(item, str) or _is_int(item)):
        raise RequestError(f"item id {_short(item)} must be a string or an integer")
      key = item if isinstance(item, str) else str(int(item))
      if key not in self._item_map:
        raise RequestError(f"unknown item id {_short(key)}")
      return self._item_map[key]
    return self._dense_item(item)

  def _dense_item(self, item) -> int:
    if not _is_int(item):
      raise RequestError(f"item id {_short(item)} is not an integer")
    if not 1 <= int(item) <= self.num_items:
      raise RequestError(f"item id {int(item)} is out of range 1..{self.num_items}")
    return int(item)

  def for_users(self, users: Sequence[str | int]) -> Recommendations:
    """Recommendations for known users (ids as :meth:`user_id` takes them), from their whole sequences."""
    return self._for_ids([self.user_id(u) for u in _id_list(users, "users")])

  def _for_ids(self, ids: Sequence[int]) -> Recommendations:
    return self._recommend(np.asarray(ids, np.int32), [self._sequences[u] for u in ids])

  def for_histories(self, histories: Sequence[Sequence[str | int]], *, dense: bool = False) -> Recommendations:
    """Recommendations for item histories (oldest first) of unknown users.

    Args:
      histories: one list of item ids per history: raw ids as :meth:`item_id` takes them (the ids of the data
        file, as printed and exported), or dense ids (as in :class:`Recommendations`) with ``dense=True``.
      dense: the ids are dense ids ``1..num_items``.
    """
    if isinstance(histories, np.ndarray) and histories.ndim == 2:
      histories = list(histories)
    if not isinstance(histories, (list, tuple)):
      raise RequestError(f"histories must be a list of item-id lists, got {_short(histories)}")
    checked = []
    for i, h in enumerate(histories, start=1):
      if isinstance(h, np.ndarray) and h.ndim == 1:
        h = h.tolist() if h.dtype.kind in "iu" else list(h)
      if not isinstance(h, (list, tuple)):
        raise RequestError(f"history {i} must be a list of item ids, got {_short(h)}")
      if not h:
        raise RequestError(f"history {i} is empty; give at least one item")
      try:
        ids = [self._dense_item(x) if dense else self.item_id(x) for x in h]
      except RequestError as e:
        raise RequestError(f"history {i}: {e}") from None
      checked.append(np.asarray(ids, np.int32))
    return self._recommend(np.zeros(len(checked), np.int32), checked)

  def _recommend(self, users: np.ndarray, histories: list[np.ndarray]) -> Recommendations:
    if not histories:
      raise RequestError("no users to recommend for")
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
    """The raw id of a dense user id (the id itself when the data has no id map; 0 = an item history)."""
    if self._raw_users is None or user == 0:
      return str(user)
    if not hasattr(self, "_user_inverse"):
      self._user_inverse = {v: k for k, v in self._raw_users.items()}
    return self._user_inverse[int(user)]

  def export(self, path: str | os.PathLike) -> int:
    """Writes every user's recommendations to a CSV (``user,rank,item,score,step``, raw ids if any).

    The destination is checked (:func:`check_export_path`) and a temporary file beside it created before
    anything is computed; the file is renamed to ``path`` when complete, so an existing export is replaced only
    by a complete one, and the temporary file is removed on any failure.

    Returns:
      The number of users written.
    """
    path = check_export_path(path)
    users = sorted(self._sequences)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      f = open(tmp, "w", newline="")  # noqa: SIM115 (closed by the with below)
    except OSError as e:
      raise RequestError(f"cannot export to {path}: {e.strerror or e}") from None
    try:
      with f:
        writer = csv.writer(f)
        writer.writerow(["user", "rank", "item", "score", "step"])
        for lo in range(0, len(users), 8192):
          rec = self._for_ids(users[lo : lo + 8192])
          for u, items, scores, steps in zip(rec.users, rec.items, rec.scores, rec.steps, strict=True):
            raw_u = self.raw_user(int(u))
            for rank, (item, score, step) in enumerate(zip(items, scores, steps, strict=True), start=1):
              writer.writerow([raw_u, rank, self.raw_item(item), f"{score:.6g}", int(step)])
      os.replace(tmp, path)
    except OSError as e:
      tmp.unlink(missing_ok=True)
      raise RequestError(f"cannot export to {path}: {e.strerror or e}") from None
    except BaseException:
      tmp.unlink(missing_ok=True)
      raise
    return len(users)
