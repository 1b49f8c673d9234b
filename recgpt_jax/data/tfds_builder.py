"""TFDS builder for the bundled sequence datasets, stored as ArrayRecord for random access.

One record per user: ``{'user': int64 scalar, 'items': int64 [n]}`` with the user's *full* item sequence
in time order, in one split ``full`` (TFDS reserves the name ``all``). The leave-one-out split is applied
later by the input pipeline, so a single build serves training and evaluation.

The builder is offline: it reads the bundled ``recgpt_jax/data/bundled/<name>.txt.gz`` files through
``recgpt_jax.data.io.load_dataset``. A build is cached under ``data_dir/rec_sequences/<config>/<version>``;
bump ``VERSION`` if the bundled files change. It is written with ``file_format='array_record'`` and read with
``as_data_source()``, which (unlike ``as_dataset``/``tfds.load``) works without TensorFlow installed.
User-supplied files do not go through TFDS; wrap their sequences in ``InMemorySource`` instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import io as io_lib
import logging
import os
import pathlib
import shutil
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from recgpt_jax import errors
from recgpt_jax.data import io, pipeline

# Canonical names of the bundled datasets.
BUNDLED = tuple(io.BUNDLED)

DEFAULT_DATA_DIR = os.path.join("~", ".cache", "recgpt_jax", "tfds")

# TFDS reserves the split name `all`, so the single split holding every user is called `full`.
SPLIT = "full"


def canonical_name(dataset_name: str) -> str:
  """Maps a bundled dataset name or alias (case-insensitive, as ``io.load_dataset``) to its canonical name.

  Args:
    dataset_name: e.g. ``'beauty'``, ``'toys'`` or ``'Toys_and_Games'``.

  Returns:
    The canonical name, e.g. ``'Toys_and_Games'``.

  Raises:
    errors.DataError: if the name is not one of the bundled datasets.
  """
  try:
    file_name = io.bundled_path(str(dataset_name)).name
  except errors.DataError:
    raise errors.DataError(
      f"TFDS build supports only the bundled datasets {', '.join(BUNDLED)}; got {dataset_name!r}"
      " (wrap user-supplied sequences in recgpt_jax.data.tfds_builder.InMemorySource)"
    ) from None
  return next(name for name, file in io.BUNDLED.items() if file == file_name)


def sequence_features() -> tfds.features.FeaturesDict:
  """One record per user: its id and its items in time order (the bundled datasets and the stores alike)."""
  return tfds.features.FeaturesDict(
    {
      "user": tfds.features.Scalar(dtype=np.int64),
      "items": tfds.features.Tensor(shape=(None,), dtype=np.int64),
    }
  )


class RecSequencesConfig(tfds.core.BuilderConfig):
  """One config per bundled dataset; ``dataset`` is the canonical bundled name."""

  def __init__(self, *, dataset: str, **kwargs: Any):
    super().__init__(name=dataset.lower(), description=f"Bundled {dataset} item sequences.", **kwargs)
    self.dataset = dataset


class RecSequences(tfds.core.GeneratorBasedBuilder):
  """Full per-user item sequences of the bundled datasets (single split ``full``)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [RecSequencesConfig(dataset=name) for name in BUNDLED]
  # TFDS 4.9.10 derives ``code_path`` through ``importlib_resources``, which it does not declare as a
  # dependency on Python >= 3.9 (tensorflow/datasets#11212); pinning it here avoids that import.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="Per-user item sequences (time order) for sequential recommendation.",
      features=sequence_features(),
      supervised_keys=None,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
    del dl_manager  # Offline: everything comes from the bundled files.
    return {SPLIT: self._generate_examples()}

  def _generate_examples(self) -> Iterator[tuple[int, dict[str, Any]]]:
    data = io.load_dataset(self.builder_config.dataset)
    for user, items in zip(data.users, data.sequences, strict=True):
      yield int(user), {"user": int(user), "items": np.asarray(items, dtype=np.int64)}


def data_source(
  dataset_name: str, data_dir: str | os.PathLike | None = None
) -> tuple[Sequence[dict[str, Any]], tfds.core.DatasetInfo]:
  """Builds a bundled dataset once into ``data_dir`` and returns its random-access source.

  Args:
    dataset_name: a bundled dataset name (case-insensitive), see ``BUNDLED``.
    data_dir: TFDS data directory; defaults to ``~/.cache/recgpt_jax/tfds``.

  Returns:
    ``(source, info)``: ``source[i]`` is ``{'user': int64, 'items': int64 [n]}`` for ``0 <= i < len(source)``
    (records in build order, not necessarily file order); ``info`` is the TFDS ``DatasetInfo``.

  Raises:
    errors.DataError: if ``dataset_name`` is not a bundled dataset.
  """
  name = canonical_name(dataset_name)
  data_dir = os.path.expanduser(os.fspath(data_dir if data_dir is not None else DEFAULT_DATA_DIR))
  # TFDS's progress bars, banner and "no dataset_info.json yet" warnings would clutter every first run.
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    builder = RecSequences(config=name.lower(), data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
      with _build_lock(pathlib.Path(os.fspath(builder.data_dir)).parent):
        builder = RecSequences(config=name.lower(), data_dir=data_dir, file_format="array_record")
        if not builder.is_prepared():  # another process may have built it while this one waited
          print(f"Building the TFDS dataset {name} into {data_dir} (once).", flush=True)
          tfds.disable_progress_bar()
          with contextlib.redirect_stdout(io_lib.StringIO()):
            builder.download_and_prepare(
              download_config=tfds.download.DownloadConfig(
                try_download_gcs=False,
                compute_stats=tfds.download.ComputeStatsMode.SKIP,
              )
            )
  finally:
    absl_logger.setLevel(level)
  return builder.as_data_source(split=SPLIT), builder.info


@contextlib.contextmanager
def _build_lock(config_dir: pathlib.Path):
  """One builder of a dataset at a time; under the lock, the leftovers of a build killed midway (TFDS's
  ``incomplete.*`` folders, which no other process can be writing now) are removed first."""
  config_dir.mkdir(parents=True, exist_ok=True)
  with open(config_dir / ".build.lock", "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)  # waits for a concurrent build (released when that process ends)
    for leftover in config_dir.glob("incomplete.*"):
      shutil.rmtree(leftover, ignore_errors=True)
    yield


class InMemorySource(pipeline.ArraySource):
  """Random-access source over in-memory sequences, with the same records as the TFDS source (see
  ``pipeline.ArraySource``)."""
