"""Leave-one-out split of user sequences (the protocol of S3-Rec / RecGPT).

For a user with items ``x_1 .. x_n`` (time order):

* train: inputs ``x[:-3]``, next-item targets ``x[1:-2]`` (one row per user, loss at every position);
* valid: history ``x[:-2]``, answer ``x[-2]``;
* test: history ``x[:-1]``, answer ``x[-1]``.

Model inputs are cut to the last ``max_len`` items; the exclusion set used at ranking time is the
*whole* history, not only the window the model sees.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

# A user needs at least this many items to have a train row (1 input), a valid and a test answer.
MIN_ITEMS = 4

STAGES = ("valid", "test")


def train_example(items: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Returns ``(inputs, targets)`` of one user's training row, cut to the last ``max_len``."""
  items = np.asarray(items, dtype=np.int32)
  return items[:-3][-max_len:], items[1:-2][-max_len:]


def eval_example(items: np.ndarray, stage: str, max_len: int) -> tuple[np.ndarray, int, np.ndarray]:
  """Returns ``(window, answer, history)`` of one user for ``stage`` in ``('valid', 'test')``.

  ``window`` is the model input (last ``max_len`` history items), ``history`` the full history that is
  excluded from the ranking.
  """
  items = np.asarray(items, dtype=np.int32)
  if stage == "valid":
    history, answer = items[:-2], int(items[-2])
  elif stage == "test":
    history, answer = items[:-1], int(items[-1])
  else:
    raise ValueError(f"unknown evaluation stage {stage!r}; expected one of {STAGES}")
  return history[-max_len:], answer, history


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """All users of one evaluation stage.

  Attributes:
    users: ``[U]`` user ids.
    windows: model inputs, one int32 array per user (length <= max_len).
    answers: ``[U]`` the held-out item of each user.
    histories: full histories (the exclusion sets), one int32 array per user.
  """

  users: np.ndarray
  windows: list[np.ndarray]
  answers: np.ndarray
  histories: list[np.ndarray]


@dataclasses.dataclass(frozen=True)
class TrainSet:
  """One training row per user: ``inputs[u]`` predicts ``targets[u]`` position by position."""

  users: np.ndarray
  inputs: list[np.ndarray]
  targets: list[np.ndarray]

  @property
  def num_tokens(self) -> int:
    return int(sum(len(t) for t in self.targets))


def usable(sequences: Sequence[np.ndarray]) -> np.ndarray:
  """Boolean mask of users with enough items for the leave-one-out split."""
  return np.array([len(s) >= MIN_ITEMS for s in sequences], dtype=bool)


def make_train_set(users: np.ndarray, sequences: Sequence[np.ndarray], max_len: int) -> TrainSet:
  """Builds the training rows of all users with at least ``MIN_ITEMS`` items."""
  keep = usable(sequences)
  inputs, targets = [], []
  for seq, ok in zip(sequences, keep, strict=False):
    if ok:
      x, y = train_example(seq, max_len)
      inputs.append(x)
      targets.append(y)
  return TrainSet(users=np.asarray(users)[keep].astype(np.int32), inputs=inputs, targets=targets)


def make_eval_set(users: np.ndarray, sequences: Sequence[np.ndarray], stage: str, max_len: int) -> EvalSet:
  """Builds the evaluation set of ``stage`` for all users with at least ``MIN_ITEMS`` items."""
  keep = usable(sequences)
  windows, answers, histories = [], [], []
  for seq, ok in zip(sequences, keep, strict=False):
    if ok:
      w, a, h = eval_example(seq, stage, max_len)
      windows.append(w)
      answers.append(a)
      histories.append(h)
  return EvalSet(
    users=np.asarray(users)[keep].astype(np.int32),
    windows=windows,
    answers=np.asarray(answers, dtype=np.int32),
    histories=histories,
  )
