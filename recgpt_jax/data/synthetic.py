"""Synthetic interaction logs of realistic shape, at any size, in bounded memory.

A production log has a few very popular items and a long tail, a few very active users and many with a
handful of interactions, and sessions: bursts of related interactions minutes apart, days between bursts.
This generator reproduces those shapes so that ingestion, input pipelines, losses and recall can be measured
at 10^6-10^8 interactions and 10^5-10^7 items on data that stresses them the way real logs do:

* item popularity: Zipf, ``p(rank r) ~ r^-item_exponent`` (1.0 by default), ranks shuffled over the raw ids;
* user activity: discrete Pareto with tail exponent ``user_exponent`` (1.5), at least ``min_len`` (5) and at
  most ``max_len`` interactions (real logs are usually 5-core filtered), scaled to the requested total;
* sessions: a user's history is split into sessions of geometric length (mean ``session_mean``, 6); within a
  session each next item is, with probability ``coherence`` (0.5), one of the 8 items next to the previous one in
  a hidden item order (a "topic": the sequential signal a model can learn), else a fresh popularity draw;
* timestamps: each user starts at a uniform time in one year; items of a session are an exponential mean 2
  minutes apart, sessions an exponential mean 3 days apart (int64 seconds).

The log is written user chunk by user chunk (``chunk_rows`` rows at a time, rows shuffled within the chunk, so
files are not sorted by user or time), as Parquet row groups or CSV/TSV, with raw string ids (``u`` and ``i``
followed by a number) that say nothing about popularity or order. The whole log is never in
memory: peak memory is the catalogue's ``[items]`` tables plus one chunk.

Usage::

  python -m recgpt_jax.data.synthetic --interactions=100000000 --items=1000000 --out=/data/log.parquet
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time

import numpy as np
from absl import app, flags

from recgpt_jax import errors
from recgpt_jax.errors import UserError

FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv"}
COLUMNS = ("user", "item", "timestamp")  # read_interactions' default column names
_YEAR_S = 365 * 24 * 3600
_START_S = 1_600_000_000  # 2020-09-13


def parse_size(text: str) -> tuple[int, int]:
  """``'<interactions>x<items>'`` (e.g. ``'1e7x1e6'``) as two ints; UserError naming ``text`` otherwise."""
  try:
    rows, items = (int(float(x)) for x in text.lower().split("x"))
  except ValueError:
    raise UserError(f"size {text!r} is not <interactions>x<items> (e.g. 1e7x1e6)") from None
  return rows, items


@dataclasses.dataclass(frozen=True)
class LogShape:
  """The shape of a synthetic log (see the module docstring for each knob)."""

  interactions: int
  items: int
  item_exponent: float = 1.0
  user_exponent: float = 1.5
  min_len: int = 5
  max_len: int = 2000
  session_mean: float = 6.0
  coherence: float = 0.5
  seed: int = 0

  def __post_init__(self):
    if self.items < 2:
      raise UserError(f"a synthetic log needs at least 2 items, got {self.items}")
    if self.interactions < self.min_len:
      raise UserError(f"a synthetic log needs at least min_len={self.min_len} interactions, got {self.interactions}")
    if not 1 <= self.min_len <= self.max_len:
      raise UserError(f"need 1 <= min_len <= max_len, got {self.min_len} and {self.max_len}")
    if not 0 <= self.coherence <= 1 or self.session_mean < 1:
      raise UserError(f"need 0 <= coherence <= 1 and session_mean >= 1, got {self.coherence}, {self.session_mean}")


def user_lengths(shape: LogShape, rng: np.random.Generator) -> np.ndarray:
  """``[users]`` int64 history lengths in ``[min_len, max_len]`` summing exactly to ``shape.interactions``.

  Discrete Pareto draws (``min_len * (1 - u)^(-1 / user_exponent)``, capped), drawn in blocks until they cover
  the total; the last user is cut to fit (topped up to ``min_len`` from the users before it when needed).
  """
  lengths, total = [], 0
  mean = shape.min_len * shape.user_exponent / max(shape.user_exponent - 1, 0.1)
  while total < shape.interactions:
    block = max(1024, int((shape.interactions - total) / mean * 1.1))
    draws = np.floor(shape.min_len * (1.0 - rng.random(block)) ** (-1.0 / shape.user_exponent))
    draws = np.minimum(draws, shape.max_len).astype(np.int64)
    lengths.append(draws)
    total += int(draws.sum())
  out = np.concatenate(lengths)
  out = out[: int(np.searchsorted(np.cumsum(out), shape.interactions)) + 1]
  out[-1] -= int(out.sum()) - shape.interactions
  if out[-1] < shape.min_len and len(out) > 1:  # give the short last user the tail of the one before it
    out[-2] += out[-1]
    out = out[:-1]
  return out


class _Catalogue:
  """The item side: popularity draws, the hidden topic order, and raw ids."""

  def __init__(self, shape: LogShape, rng: np.random.Generator):
    n = shape.items
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** shape.item_exponent
    self.cdf = np.cumsum(weights / weights.sum())
    self.rank_to_item = rng.permutation(n).astype(np.int64)  # popularity rank -> item index
    self.order = rng.permutation(n).astype(np.int64)  # topic position -> item index
    self.position = np.empty(n, np.int64)
    self.position[self.order] = np.arange(n)
    self.raw = rng.permutation(np.arange(n, dtype=np.int64) * 7 + 0x100000)  # item index -> raw number
    self.n = n

  def popular(self, rng: np.random.Generator, size: int) -> np.ndarray:
    ranks = np.minimum(np.searchsorted(self.cdf, rng.random(size), side="right"), self.n - 1)
    return self.rank_to_item[ranks]

  def near(self, items: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An item within 4 places (not 0) of each item in the topic order."""
    step = rng.integers(1, 5, items.shape) * rng.choice(np.array([-1, 1]), items.shape)
    return self.order[(self.position[items] + step) % self.n]


def _chunk(shape: LogShape, cat: _Catalogue, lengths: np.ndarray, first_user: int, rng: np.random.Generator):
  """Rows ``(user numbers, item indices, timestamps)`` of the users ``first_user ..`` with ``lengths``."""
  rows = int(lengths.sum())
  user = np.repeat(np.arange(first_user, first_user + len(lengths), dtype=np.int64), lengths)
  starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
  pos = np.arange(rows, dtype=np.int64) - starts  # position within the user's history
  new_session = (pos == 0) | (rng.random(rows) < 1.0 / shape.session_mean)
  fresh = cat.popular(rng, rows)
  follow = ~new_session & (rng.random(rows) < shape.coherence)
  # Each following row takes an item near its predecessor's: resolve runs of followers left to right in as many
  # vectorised passes as the longest run (short: runs end at each new session or fresh draw, probability >= 1/2).
  items = fresh.copy()
  pending = np.flatnonzero(follow)
  while pending.size:
    prev_fixed = ~follow[pending - 1] | ~np.isin(pending - 1, pending)
    ready = pending[prev_fixed]
    items[ready] = cat.near(items[ready - 1], rng)
    follow[ready] = False
    pending = pending[~prev_fixed]
  gap = np.where(new_session, rng.exponential(3 * 24 * 3600.0, rows), rng.exponential(120.0, rows))
  gap[pos == 0] = 0.0
  t0 = np.repeat(_START_S + rng.integers(0, _YEAR_S, len(lengths)), lengths)
  cum = np.cumsum(gap)
  stamps = t0 + (cum - np.repeat(cum[np.cumsum(lengths) - lengths], lengths)).astype(np.int64)
  order = rng.permutation(rows)  # a log is not sorted by user
  return user[order], items[order], stamps[order]


def _raw_ids(prefix: str, numbers: np.ndarray):
  """``prefix`` followed by each number in decimal, as an Arrow string array (vectorised in Arrow's C++)."""
  import pyarrow as pa
  import pyarrow.compute as pc

  return pc.binary_join_element_wise(prefix, pc.cast(pa.array(numbers), pa.string()), "")


def write_log(
  path: str | pathlib.Path, shape: LogShape, *, chunk_rows: int = 2_000_000, progress: bool = False
) -> dict:
  """Writes the log of ``shape`` to ``path`` (``.parquet``, ``.csv`` or ``.tsv``) and returns its summary.

  Written to ``<path>.partial`` and renamed at the end: an interrupted run leaves no file at ``path``.
  """
  import pyarrow as pa

  path = pathlib.Path(path)
  fmt = FORMATS.get(path.suffix)
  if fmt is None:
    raise UserError(f"{path}: the synthetic log's extension must be one of {sorted(FORMATS)}")
  rng = np.random.default_rng(shape.seed)
  lengths = user_lengths(shape, rng)
  cat = _Catalogue(shape, rng)
  user_raw = rng.permutation(np.arange(len(lengths), dtype=np.int64) * 13 + 0x1000000)
  tmp = path.with_name(path.name + ".partial")
  schema = pa.schema([(COLUMNS[0], pa.string()), (COLUMNS[1], pa.string()), (COLUMNS[2], pa.int64())])
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = _writer(tmp, fmt, schema)
  except OSError as e:
    raise UserError(f"{path}: cannot write the log: {e.strerror or e}") from None
  begin, done, first = time.time(), 0, 0
  try:
    while first < len(lengths):
      last = int(np.searchsorted(np.cumsum(lengths[first:]), chunk_rows)) + first + 1
      last = min(max(last, first + 1), len(lengths))
      users, items, stamps = _chunk(shape, cat, lengths[first:last], first, rng)
      table = pa.table(
        [_raw_ids("u", user_raw[users]), _raw_ids("i", cat.raw[items]), pa.array(stamps)],
        schema=schema,
      )
      writer.write_table(table)
      done, first = done + len(users), last
      if progress:
        rate = done / max(time.time() - begin, 1e-9)
        print(f"  {done:,} / {shape.interactions:,} interactions ({rate:,.0f}/s)", file=sys.stderr, flush=True)
  except BaseException:
    writer.close()
    tmp.unlink(missing_ok=True)
    raise
  writer.close()
  tmp.replace(path)
  return {"path": str(path), "interactions": int(lengths.sum()), "users": len(lengths), "items": shape.items}


def _writer(tmp: pathlib.Path, fmt: str, schema):
  import pyarrow.csv as pacsv
  import pyarrow.parquet as pq

  if fmt == "parquet":
    return pq.ParquetWriter(tmp, schema, compression="zstd")
  return pacsv.CSVWriter(tmp, schema, write_options=pacsv.WriteOptions(delimiter="\t" if fmt == "tsv" else ","))


def _define_flags() -> dict:
  """The command line's flags, defined only when the module runs as a program (importing it defines none)."""
  return {
    "interactions": flags.DEFINE_float("interactions", None, "Rows of the log (e.g. 1e8)."),
    "items": flags.DEFINE_float("items", None, "Catalogue size (e.g. 1e6)."),
    "out": flags.DEFINE_string("out", None, "Output file: .parquet, .csv or .tsv."),
    "seed": flags.DEFINE_integer("seed", 0, "Random seed."),
    "item_exponent": flags.DEFINE_float("item_exponent", 1.0, "Zipf exponent of item popularity."),
    "user_exponent": flags.DEFINE_float("user_exponent", 1.5, "Pareto tail exponent of user activity."),
    "coherence": flags.DEFINE_float("coherence", 0.5, "Probability that a session's next item is near the last."),
    "chunk_rows": flags.DEFINE_integer("chunk_rows", 2_000_000, "Rows generated and written at a time."),
  }


_FLAGS: dict = {}


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = {name: holder.value for name, holder in _FLAGS.items()}
  missing = [f"--{name}" for name in ("interactions", "items", "out") if f[name] is None]
  try:
    if missing:
      raise UserError(f"{' and '.join(missing)} must be given")
    shape = LogShape(
      interactions=int(f["interactions"]),
      items=int(f["items"]),
      item_exponent=f["item_exponent"],
      user_exponent=f["user_exponent"],
      coherence=f["coherence"],
      seed=f["seed"],
    )
    summary = write_log(f["out"], shape, chunk_rows=f["chunk_rows"], progress=True)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
  print(
    f"wrote {summary['interactions']:,} interactions of {summary['users']:,} users on {summary['items']:,} items"
    f" to {summary['path']}"
  )


if __name__ == "__main__":
  _FLAGS.update(_define_flags())
  app.run(main, flags_parser=errors.parse_flags_or_exit)
