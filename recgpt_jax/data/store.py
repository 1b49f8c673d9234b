"""Prepared datasets of production size: an interaction log built once into ArrayRecord shards plus a lengths index.

``python -m recgpt_jax.data.store --log=LOG --out=DIR`` reads an interaction log (``io.read_interactions``:
CSV/TSV/Parquet, raw ids mapped to dense ids, time order, optional k-core) and writes ``DIR``:

* ``tfds/``: a TFDS dataset (builder ``RecLog``, split ``full``) of one record per user, ``{'user': int64,
  'items': int64 [n]}``, in ArrayRecord shards for random access. Records are in user order (record ``i`` holds
  user ``i + 1``: the dataset is built with shuffling disabled, so TFDS writes them in key order).
* ``index.npz``: ``lengths [U]`` (every user's sequence length) and ``item_counts [I + 1]`` (how often each item
  occurs in the training split): all a training process needs to plan every epoch's packing without reading a
  record (``pipeline.TrainInput``), so a process reads only the records of its own rows.
* ``user_map.json`` / ``item_map.json`` (raw <-> dense ids) and ``store.json`` (sizes, source, how it was built).

With ``--beam_runner`` (e.g. ``DirectRunner``; the same code runs on Dataflow, Flink or Spark) the records are
generated and written by an Apache Beam pipeline; Beam is an optional extra (``pip install apache-beam``, which
supports Python <= 3.11 here), not a core dependency.

A build is all or nothing: everything is written into ``.DIR.staging-<pid>`` beside ``DIR`` and renamed to
``DIR`` only when complete, under a lock. A build killed at any point leaves only a staging folder, which no
reader opens and the next build removes; an existing ``DIR`` is never overwritten.

Train on a store with ``--config.dataset=DIR``.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import fcntl
import functools
import json
import logging
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from recgpt_jax import errors
from recgpt_jax.data import io, split

STORE_FILE = "store.json"
INDEX_FILE = "index.npz"
FORMAT_VERSION = 1
SPLIT = "full"
# Users per Beam work item (one element of the Create) and per chunk of the vectorised passes.
CHUNK_USERS = 200_000


def is_store(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a store directory (holds ``store.json``)."""
  return os.path.isfile(os.path.join(os.fspath(path), STORE_FILE))


# ---- building -------------------------------------------------------------------------------------------------


def _tfds():
  import tensorflow_datasets as tfds

  return tfds


def _chunk_examples(bounds: tuple[int, int], input_dir: str) -> Iterator[tuple[int, dict[str, Any]]]:
  """The records of users ``bounds[0] + 1 .. bounds[1]`` from the staged flat arrays (memory-mapped, so a Beam
  worker touches only its chunk)."""
  flat = np.load(os.path.join(input_dir, "items.npy"), mmap_mode="r")
  offsets = np.load(os.path.join(input_dir, "offsets.npy"), mmap_mode="r")
  first, last = bounds
  for u in range(first, last):
    items = np.asarray(flat[offsets[u] : offsets[u + 1]], dtype=np.int64)
    yield u + 1, {"user": u + 1, "items": items}


def _builder_class():
  """The TFDS builder, defined on first use (importing this module must not import TFDS)."""
  global _RecLog
  if _RecLog is not None:
    return _RecLog
  tfds = _tfds()
  from etils import epath

  from recgpt_jax.data import tfds_builder

  class RecLogConfig(tfds.core.BuilderConfig):
    def __init__(self, *, input_dir: str, num_users: int, beam: bool, **kwargs: Any):
      super().__init__(name="default", description="Per-user item sequences of an interaction log.", **kwargs)
      self.input_dir, self.num_users, self.beam = input_dir, num_users, beam

  class RecLog(tfds.core.GeneratorBasedBuilder):
    """Per-user item sequences (time order) of an ingested interaction log; single split ``full``."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    code_path = epath.Path(__file__)  # see tfds_builder.RecSequences.code_path

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        description="Per-user item sequences (time order) of an interaction log.",
        features=tfds_builder.sequence_features(),
        disable_shuffling=True,  # records in key (= user) order: record i is user i + 1
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      cfg = self.builder_config
      chunks = [(a, min(a + CHUNK_USERS, cfg.num_users)) for a in range(0, cfg.num_users, CHUNK_USERS)]
      if cfg.beam:
        beam = tfds.core.lazy_imports.apache_beam
        return {SPLIT: beam.Create(chunks) | beam.FlatMap(_chunk_examples, cfg.input_dir)}
      return {SPLIT: (ex for chunk in chunks for ex in _chunk_examples(chunk, cfg.input_dir))}

    def _generate_examples(self):  # pragma: no cover (the splits come from _split_generators)
      raise NotImplementedError

  RecLog.RecLogConfig = RecLogConfig
  _RecLog = RecLog
  return RecLog


_RecLog = None


@contextlib.contextmanager
def _parent_lock(out: pathlib.Path):
  """One build per output directory at a time; stale staging folders (of builds killed midway) are removed."""
  out.parent.mkdir(parents=True, exist_ok=True)
  with open(out.parent / f".{out.name}.lock", "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    for stale in out.parent.glob(f".{out.name}.staging-*"):
      shutil.rmtree(stale, ignore_errors=True)
    yield


def _train_item_counts(flat: np.ndarray, lengths: np.ndarray, num_items: int) -> np.ndarray:
  """``[num_items + 1]`` occurrences of every item in the training split (``items[:-2]`` of usable users)."""
  counts = np.zeros(num_items + 1, np.int64)
  ends = np.cumsum(lengths)
  for a in range(0, len(lengths), CHUNK_USERS):
    b = min(a + CHUNK_USERS, len(lengths))
    n = lengths[a:b].astype(np.int64)
    start = int(ends[a] - n[0]) if b > a else 0
    tokens = flat[start : int(ends[b - 1])]
    within = np.arange(len(tokens)) - np.repeat(np.cumsum(n) - n, n)
    keep = within < np.repeat(np.where(n >= split.MIN_ITEMS, n - 2, 0), n)
    counts += np.bincount(tokens[keep], minlength=num_items + 1)
  counts[0] = 0
  return counts


def _flat(data: io.SequenceData) -> tuple[np.ndarray, np.ndarray]:
  """``(items [T] int32, lengths [U] int32)``: the sequences concatenated in user order (users 1..U)."""
  if not np.array_equal(data.users, np.arange(1, len(data.users) + 1)):
    order = np.argsort(data.users, kind="stable")
    sequences = [data.sequences[i] for i in order]
  else:
    sequences = data.sequences
  lengths = np.fromiter((len(s) for s in sequences), np.int32, count=len(sequences))
  return (np.concatenate(sequences).astype(np.int32) if sequences else np.zeros(0, np.int32)), lengths


def build(
  log: str | os.PathLike,
  out: str | os.PathLike,
  *,
  beam_runner: str | None = None,
  progress: bool = True,
  **read_kwargs: Any,
) -> dict[str, Any]:
  """Builds the store ``out`` from the interaction log ``log`` (see the module docstring).

  Args:
    log: an interaction log (``io.read_interactions``) or a text sequence file (``io.read_sequences``).
    out: the store directory to create; must not exist.
    beam_runner: None for the in-process writer, else the name of an Apache Beam runner (``'DirectRunner'``).
    progress: print one line per phase to stderr.
    **read_kwargs: ``io.load_dataset`` options (``user_col``, ``item_col``, ``time_col``, ``sep``, ``k_core``).

  Returns:
    The contents of ``store.json``.

  Raises:
    errors.DataError: a bad log (file and row named), an existing ``out``, or a log with no users.
    errors.ConfigError: a Beam runner without Apache Beam installed.
  """
  out = pathlib.Path(os.fspath(out)).expanduser().absolute()
  if beam_runner:
    try:
      with _quiet_logs():
        import apache_beam  # noqa: F401
    except ImportError:
      raise errors.ConfigError(
        f"--beam_runner={beam_runner} needs Apache Beam (pip install apache-beam; Python <= 3.11 here)"
      ) from None

  def say(msg: str) -> None:
    if progress:
      print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

  with _parent_lock(out):
    if out.exists():
      raise errors.DataError(f"{out}: already exists; a store is never overwritten (remove it or pick another --out)")
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    staging.mkdir()
    try:
      begin = time.time()
      say(f"reading {log}")
      data = io.load_dataset(log, **read_kwargs)
      flat, lengths = _flat(data)
      if not len(lengths):
        raise errors.DataError(f"{log}: holds no interactions")
      say(f"read {len(flat):,} interactions of {len(lengths):,} users on {data.num_items:,} items")
      data.save_id_maps(staging)
      meta = {
        "format_version": FORMAT_VERSION,
        "source": str(log),
        "num_users": int(len(lengths)),
        "num_items": int(data.num_items),
        "num_interactions": int(len(flat)),
        "builder": f"beam:{beam_runner}" if beam_runner else "tfds",
        "read_options": {k: v for k, v in read_kwargs.items()},
      }
      del data  # the id maps and the Python views are the bulk of the ingestion's memory
      item_counts = _train_item_counts(flat, lengths, meta["num_items"])
      input_dir = staging / "input"
      input_dir.mkdir()
      np.save(input_dir / "items.npy", flat)
      np.save(input_dir / "offsets.npy", np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]))
      del flat
      say(f"writing the ArrayRecord shards ({'Apache Beam ' + beam_runner if beam_runner else 'TFDS writer'})")
      _write_tfds(staging / "tfds", str(input_dir), len(lengths), beam_runner, progress)
      shutil.rmtree(input_dir)
      np.savez(staging / INDEX_FILE, lengths=lengths, item_counts=item_counts)
      meta["build_seconds"] = round(time.time() - begin, 1)
      (staging / STORE_FILE).write_text(json.dumps(meta, indent=1))
      _fsync_tree(staging)
      os.rename(staging, out)  # the store appears complete or not at all
    except BaseException:
      shutil.rmtree(staging, ignore_errors=True)
      raise
  say(f"built {out} in {meta['build_seconds']} s")
  return meta


def _write_tfds(
  data_dir: pathlib.Path, input_dir: str, num_users: int, beam_runner: str | None, progress: bool = False
) -> None:
  tfds = _tfds()
  builder_cls = _builder_class()
  config = builder_cls.RecLogConfig(input_dir=input_dir, num_users=num_users, beam=bool(beam_runner))
  with _quiet_logs():
    if progress:  # TFDS's bars: examples generated, then shards written (to stderr)
      tfds.enable_progress_bar()
    else:
      tfds.disable_progress_bar()
    builder = builder_cls(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
    download_config = tfds.download.DownloadConfig(
      try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP
    )
    if beam_runner:
      import apache_beam as beam

      download_config.beam_runner = beam_runner
      # Options from the runner's defaults only: without flags=[] Beam would parse this program's command line.
      download_config.beam_options = beam.options.pipeline_options.PipelineOptions(flags=[])
    with contextlib.redirect_stdout(sys.stderr if sys.stderr else None):  # TFDS prints its banner to stdout
      builder.download_and_prepare(download_config=download_config)


@contextlib.contextmanager
def _quiet_logs():
  """TFDS and Beam log every phase at INFO (Beam also its optional Google Cloud clients, and DirectRunner its
  offline attempt to fetch the Prism runner): only errors are shown while they run."""
  loggers = [logging.getLogger(name) for name in ("absl", "apache_beam")]
  levels = [lg.level for lg in loggers]
  for lg in loggers:
    lg.setLevel(logging.ERROR)
  try:
    yield
  finally:
    for lg, level in zip(loggers, levels, strict=True):
      lg.setLevel(level)


def _fsync_tree(root: pathlib.Path) -> None:
  for path in sorted(root.rglob("*")):
    if path.is_file():
      with open(path, "rb") as f:
        os.fsync(f.fileno())


# ---- reading --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Store:
  """A built store, opened: its sizes and index in memory, its records on disk.

  Attributes:
    path: the store directory.
    meta: the contents of ``store.json``.
    lengths: ``[U]`` int32, the sequence length of users ``1..U``.
    item_counts: ``[num_items + 1]`` int64 training-split occurrences (0 = padding).
  """

  path: str
  meta: dict
  lengths: np.ndarray
  item_counts: np.ndarray

  @property
  def num_users(self) -> int:
    return int(self.meta["num_users"])

  @property
  def num_items(self) -> int:
    return int(self.meta["num_items"])

  @property
  def users(self) -> np.ndarray:
    """``[U]`` the dense user ids, ``1..U``."""
    return np.arange(1, self.num_users + 1, dtype=np.int32)

  @property
  def source(self) -> str:
    return self.path

  @functools.cached_property
  def user_map(self) -> dict[str, int] | None:
    """Raw user id -> dense id (read from ``user_map.json`` on first use)."""
    return self._id_map(io.USER_MAP_FILE)

  @functools.cached_property
  def item_map(self) -> dict[str, int] | None:
    """Raw item id -> dense id (read from ``item_map.json`` on first use)."""
    return self._id_map(io.ITEM_MAP_FILE)

  def _id_map(self, name: str) -> dict[str, int] | None:
    path = os.path.join(self.path, name)
    return json.loads(pathlib.Path(path).read_text(encoding="utf-8")) if os.path.exists(path) else None

  def sequence_map(self) -> StoreSequences:
    """Dense user id -> item sequence, read from the records on access (nothing is loaded up front)."""
    return StoreSequences(self.record_source())

  def record_source(self) -> StoreSource:
    """Random access to the records (opens the ArrayRecord shards)."""
    return StoreSource(self)

  def save_id_maps(self, directory: str | os.PathLike) -> None:
    """Copies ``user_map.json``/``item_map.json`` into ``directory`` (as ``io.SequenceData.save_id_maps``)."""
    os.makedirs(directory, exist_ok=True)
    for name in (io.USER_MAP_FILE, io.ITEM_MAP_FILE):
      src = os.path.join(self.path, name)
      if os.path.exists(src):
        tmp = os.path.join(directory, f".{name}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, os.path.join(directory, name))


def open_store(path: str | os.PathLike) -> Store:
  """Opens a store directory written by :func:`build`.

  Raises:
    errors.DataError: if ``path`` is not a complete store of this format version.
  """
  path = os.path.abspath(os.fspath(path))
  try:
    meta = json.loads(pathlib.Path(path, STORE_FILE).read_text())
    with np.load(os.path.join(path, INDEX_FILE)) as z:
      lengths, item_counts = z["lengths"], z["item_counts"]
  except (OSError, ValueError, KeyError) as e:
    raise errors.DataError(f"{path}: not a readable store ({type(e).__name__}: {e})") from None
  if meta.get("format_version") != FORMAT_VERSION:
    raise errors.DataError(f"{path}: store format {meta.get('format_version')}, this version reads {FORMAT_VERSION}")
  if len(lengths) != meta.get("num_users") or len(item_counts) != meta.get("num_items", -2) + 1:
    raise errors.DataError(f"{path}: index.npz does not match store.json")
  return Store(path=path, meta=meta, lengths=lengths.astype(np.int32), item_counts=item_counts.astype(np.int64))


class StoreSource:
  """Random-access records of a store (``pipeline.RecordSource``) with its lengths index.

  ``users`` and ``lengths`` come from the index, so a pipeline plans without reading records; ``gather`` reads
  only the records asked for, and checks that each holds the user the index says.
  """

  def __init__(self, store: Store):
    self.path = store.path
    self.users = store.users
    self.lengths = store.lengths
    self._source = None

  def _records(self):
    if self._source is None:
      tfds = _tfds()
      found = sorted(pathlib.Path(self.path, "tfds").glob("*/*/*/dataset_info.json"))
      if not found:
        raise errors.DataError(f"{self.path}: no TFDS dataset under tfds/")
      with _quiet_logs():
        self._source = tfds.builder_from_directory(os.fspath(found[0].parent)).as_data_source(split=SPLIT)
      if len(self._source) != len(self.users):
        raise errors.DataError(f"{self.path}: {len(self._source)} records but the index has {len(self.users)} users")
    return self._source

  def __getstate__(self):  # picklable for Grain workers: the reader is reopened there
    return {**self.__dict__, "_source": None}

  def __len__(self) -> int:
    return len(self.users)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.__getitems__([index])[0]

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    indices = [int(i) for i in indices]
    records = self._records().__getitems__(indices) if indices else []
    for i, r in zip(indices, records, strict=True):
      if int(r["user"]) != self.users[i] or len(r["items"]) != self.lengths[i]:
        raise errors.DataError(
          f"{self.path}: record {i} holds user {int(r['user'])} with {len(r['items'])} items; the index says user"
          f" {self.users[i]} with {self.lengths[i]} (the store is damaged: rebuild it)"
        )
    return records

  def gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(items [sum of lengths] int32, lengths [k])``: the sequences of records ``indices``, concatenated."""
    records = self.__getitems__(np.asarray(indices).tolist())
    lengths = self.lengths[np.asarray(indices, np.int64)]
    items = np.concatenate([r["items"] for r in records]).astype(np.int32) if records else np.zeros(0, np.int32)
    return items, lengths


class StoreSequences(collections.abc.Mapping):
  """Read-only mapping dense user id (``1..U``) -> int32 item sequence over a store's records."""

  def __init__(self, source: StoreSource):
    self._source = source

  def __getitem__(self, user: int) -> np.ndarray:
    if user not in self:
      raise KeyError(user)
    return np.asarray(self._source[int(user) - 1]["items"], np.int32)

  def __contains__(self, user: object) -> bool:
    return isinstance(user, (int, np.integer)) and 1 <= int(user) <= len(self._source)

  def __iter__(self) -> Iterator[int]:
    return iter(range(1, len(self._source) + 1))

  def __len__(self) -> int:
    return len(self._source)


# ---- command line ---------------------------------------------------------------------------------------------


def _define_flags() -> dict:
  from absl import flags

  return {
    "log": flags.DEFINE_string("log", None, "Interaction log (CSV/TSV[.gz], Parquet) or text sequence file."),
    "out": flags.DEFINE_string("out", None, "Store directory to create (must not exist)."),
    "beam_runner": flags.DEFINE_string("beam_runner", None, "Apache Beam runner (e.g. DirectRunner); default: none."),
    "user_col": flags.DEFINE_string("user_col", "user", "User id column of the log."),
    "item_col": flags.DEFINE_string("item_col", "item", "Item id column of the log."),
    "time_col": flags.DEFINE_string("time_col", "timestamp", "Timestamp column of the log ('' = file order)."),
    "k_core": flags.DEFINE_integer("k_core", 0, "Drop users and items with fewer interactions, repeatedly."),
  }


_FLAGS: dict = {}


def main(argv: list[str]) -> None:
  from absl import app

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = {name: holder.value for name, holder in _FLAGS.items()}
  try:
    missing = [f"--{name}" for name in ("log", "out") if not f[name]]
    if missing:
      raise errors.UserError(f"{' and '.join(missing)} must be given")
    kwargs: dict[str, Any] = {}
    if io.is_interaction_log(f["log"]):
      kwargs = {"user_col": f["user_col"], "item_col": f["item_col"], "time_col": f["time_col"] or None}
      if f["k_core"]:
        kwargs["k_core"] = f["k_core"]
    meta = build(f["log"], f["out"], beam_runner=f["beam_runner"], **kwargs)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
  except OSError as e:  # an unwritable --out, a full disk: nothing was left behind (see build)
    print(f"error: cannot build {f['out']}: {e.strerror or e} ({e.filename or f['out']})", file=sys.stderr)
    sys.exit(2)
  print(
    f"built {f['out']}: {meta['num_interactions']:,} interactions of {meta['num_users']:,} users"
    f" on {meta['num_items']:,} items"
  )


if __name__ == "__main__":
  from absl import app

  _FLAGS.update(_define_flags())
  app.run(main, flags_parser=errors.parse_flags_or_exit)
