"""Reading user sequences: the RecGPT text format, raw interaction logs and the bundled datasets.

Two input formats are supported.

* **Text** (``.txt`` / ``.txt.gz``), the format of the RecGPT / S3-Rec data: one line per user,
  ``user_id item_1 ... item_n``, whitespace separated, items in time order. Ids are positive integers;
  0 is reserved for padding. Blank lines are skipped.
* **Interaction log** (``.csv`` / ``.tsv``, optionally gzipped): a header row and one row per
  interaction with a user, an item and a timestamp column. Raw ids are arbitrary strings and are mapped
  to dense ids ``1..N``:

  - users get dense ids in sorted order of their raw id (numerically when every raw user id is an
    integer, as text otherwise), so the numbering does not depend on row order;
  - items get dense ids in order of first appearance in time (ties broken by file order), the
    convention of the S3-Rec preprocessing, so popular early items get small ids.

  Each user's interactions are sorted by timestamp; the sort is stable, so ties keep file order.
  Repeated ``(user, item)`` pairs are kept: they are repeat interactions.

Every problem with the input raises :class:`~recgpt_jax.errors.DataError` with a one-line message
``{path}:{line}: {problem}`` (or ``{path}: {problem}`` when no line applies).
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import os
import pathlib
import re
import tempfile
import zlib
from collections.abc import Iterable
from typing import Any

import numpy as np

from recgpt_jax.errors import ConfigError, DataError

# Canonical name -> file name in the ``bundled`` directory next to this module.
BUNDLED: dict[str, str] = {
  "Beauty": "Beauty.txt.gz",
  "Sports_and_Outdoors": "Sports_and_Outdoors.txt.gz",
  "Toys_and_Games": "Toys_and_Games.txt.gz",
  "Yelp": "Yelp.txt.gz",
}

# Lower-case alias -> canonical name. Canonical names themselves match case-insensitively.
_ALIASES: dict[str, str] = {
  **{name.lower(): name for name in BUNDLED},
  "sports": "Sports_and_Outdoors",
  "toys": "Toys_and_Games",
}

_BUNDLED_DIR = pathlib.Path(__file__).resolve().parent / "bundled"

USER_MAP_FILE = "user_map.json"
ITEM_MAP_FILE = "item_map.json"

FORMATS = ("auto", "text", "interactions")

_INT32_MAX = int(np.iinfo(np.int32).max)
# A file made only of these bytes can take the vectorised path; anything else is checked line by line.
_NOT_FAST = re.compile(rb"[^0-9 \t\r\n]")
_INT_TOKEN = re.compile(rb"[+-]?[0-9]+")
_INT_TEXT = re.compile(r"-?[0-9]+", re.ASCII)
_GZIP_MAGIC = b"\x1f\x8b"


@dataclasses.dataclass(frozen=True, eq=False)
class SequenceData:
  """Users and their item sequences.

  Attributes:
    users: ``[U]`` int32 dense user ids (>= 1), in file order.
    sequences: one int32 array of item ids (>= 1) per user, in time order.
    num_items: the largest item id; the catalogue is ``1..num_items`` and 0 is padding.
    num_users: the largest user id.
    source: the path or bundled dataset name the data came from.
    user_map: raw user id -> dense id, when read from an interaction log.
    item_map: raw item id -> dense id, when read from an interaction log.
  """

  users: np.ndarray
  sequences: list[np.ndarray]
  num_items: int
  num_users: int
  source: str
  user_map: dict[str, int] | None = None
  item_map: dict[str, int] | None = None

  def __post_init__(self):
    if len(self.users) != len(self.sequences):
      raise ValueError(f"{len(self.users)} users but {len(self.sequences)} sequences")

  @property
  def num_interactions(self) -> int:
    """The total number of items over all sequences."""
    return int(sum(len(s) for s in self.sequences))

  def save_id_maps(self, directory: str | os.PathLike) -> None:
    """Writes ``user_map.json`` and ``item_map.json`` to ``directory``; a no-op without maps.

    Each file is written to a temporary file and renamed, so a reader never sees a partial map.

    Args:
      directory: where to write; created if missing.
    """
    if self.user_map is None and self.item_map is None:
      return
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for file_name, mapping in ((USER_MAP_FILE, self.user_map), (ITEM_MAP_FILE, self.item_map)):
      if mapping is not None:
        _atomic_write_text(directory / file_name, json.dumps(mapping, ensure_ascii=False))


def _atomic_write_text(path: pathlib.Path, text: str) -> None:
  """Writes ``text`` to ``path`` through a temporary file in the same directory and a rename."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def load_id_maps(directory: str | os.PathLike) -> tuple[dict[str, int], dict[str, int]]:
  """Reads the maps written by :meth:`SequenceData.save_id_maps`.

  Args:
    directory: the directory holding ``user_map.json`` and ``item_map.json``.

  Returns:
    ``(user_map, item_map)``, each raw id -> dense id.
  """
  directory = pathlib.Path(directory)
  return _read_id_map(directory / USER_MAP_FILE), _read_id_map(directory / ITEM_MAP_FILE)


def _read_id_map(path: pathlib.Path) -> dict[str, int]:
  """Reads and checks one id map file."""
  try:
    text = path.read_text(encoding="utf-8")
  except FileNotFoundError:
    raise DataError(f"{path}: no such file") from None
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(_one_line(f"{path}: cannot read ({e})")) from None
  try:
    mapping = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(_one_line(f"{path}:{e.lineno}: invalid JSON ({e.msg})")) from None
  if not isinstance(mapping, dict):
    raise DataError(f"{path}: expected a JSON object of raw id -> dense id")
  for key, value in mapping.items():
    # bool is an int subclass; true/false in the file is a corrupt map, not an id.
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise DataError(_one_line(f"{path}: id {key!r} maps to {value!r}, expected an integer >= 1"))
  return mapping


def bundled_path(name: str) -> pathlib.Path:
  """Returns the file of a bundled dataset.

  Args:
    name: a canonical name (``Beauty``, ``Sports_and_Outdoors``, ``Toys_and_Games``, ``Yelp``) or an
      alias (``sports``, ``toys``); case-insensitive.

  Returns:
    The path of the gzipped text file.
  """
  canonical = _ALIASES.get(name.lower())
  if canonical is None:
    raise DataError(f"unknown dataset {name!r}; bundled datasets: {', '.join(BUNDLED)} (or pass a path to a file)")
  return _BUNDLED_DIR / BUNDLED[canonical]


def _one_line(message: str) -> str:
  """Collapses a message onto one line (messages are printed as a single stderr line)."""
  return " ".join(message.split())


def _read_bytes(path: str | os.PathLike) -> bytes:
  """Returns the contents of ``path``, decompressed if it is gzipped (by magic bytes or suffix)."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except FileNotFoundError:
    raise DataError(f"{path}: no such file") from None
  except IsADirectoryError:
    raise DataError(f"{path}: is a directory, expected a file") from None
  except OSError as e:
    raise DataError(_one_line(f"{path}: cannot read ({e.strerror or e})")) from None
  if raw.startswith(_GZIP_MAGIC) or str(path).endswith(".gz"):
    try:
      return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
      raise DataError(_one_line(f"{path}: cannot decompress gzip data ({e})")) from None
  return raw


def _quote_token(token: bytes) -> str:
  """Quotes a token for an error message, shortened so the message stays readable."""
  text = token.decode("utf-8", "backslashreplace")
  if len(text) > 40:
    text = text[:37] + "..."
  return repr(text)


def read_sequences(path: str | os.PathLike) -> SequenceData:
  """Reads a file in the RecGPT text format (plain or gzipped).

  Args:
    path: the file; one line per user, ``user_id item_1 ... item_n`` with items in time order.

  Returns:
    The users in file order and their sequences.
  """
  data = _read_bytes(path)
  parsed = _parse_text_fast(data)
  if parsed is None:
    # Something is off (or merely unusual, e.g. '+5'): the careful parser finds the first bad line.
    parsed = _parse_text_careful(data, str(path))
  users, sequences = parsed
  if not sequences:
    raise DataError(f"{path}: no users (the file is empty)")
  return SequenceData(
    users=users,
    sequences=sequences,
    num_items=int(max(int(s.max()) for s in sequences)),
    num_users=int(users.max()),
    source=str(path),
  )


def _parse_text_fast(data: bytes) -> tuple[np.ndarray, list[np.ndarray]] | None:
  """Vectorised parse of a well-formed file; returns None if any check fails (no error reporting)."""
  if _NOT_FAST.search(data) is not None:
    return None
  tokens = data.split()
  if not tokens:
    return np.zeros(0, np.int32), []
  if max(map(len, tokens)) > 10:  # int32 ids have at most 10 digits; longer could overflow int64.
    return None
  values = np.fromiter(map(int, tokens), dtype=np.int64, count=len(tokens))
  if values.min() < 1 or values.max() > _INT32_MAX:
    return None
  lengths = np.array([len(line.split()) for line in data.split(b"\n")], dtype=np.int64)
  lengths = lengths[lengths > 0]
  if lengths.min() < 2:  # a user without items
    return None
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
  users = values[starts].astype(np.int32)
  if len(np.unique(users)) != len(users):
    return None
  is_item = np.ones(len(values), dtype=bool)
  is_item[starts] = False
  items = values[is_item].astype(np.int32)
  sequences = np.split(items, np.cumsum(lengths - 1)[:-1])
  return users, sequences


def _parse_text_careful(data: bytes, path: str) -> tuple[np.ndarray, list[np.ndarray]]:
  """Line-by-line parse that raises a DataError at the first problem."""
  users: list[int] = []
  sequences: list[np.ndarray] = []
  first_line: dict[int, int] = {}
  for lineno, line in enumerate(data.split(b"\n"), start=1):
    tokens = line.split()
    if not tokens:
      continue
    ids = []
    for position, token in enumerate(tokens):
      what = "user" if position == 0 else "item"
      if not _INT_TOKEN.fullmatch(token):
        raise DataError(f"{path}:{lineno}: {what} id {_quote_token(token)} is not an integer")
      value = int(token)
      if value < 1:
        raise DataError(f"{path}:{lineno}: {what} id {value} must be >= 1 (0 is reserved for padding)")
      if value > _INT32_MAX:
        raise DataError(f"{path}:{lineno}: {what} id {value} is too large (max {_INT32_MAX})")
      ids.append(value)
    user = ids[0]
    if len(ids) == 1:
      raise DataError(f"{path}:{lineno}: user {user} has no items")
    if user in first_line:
      raise DataError(f"{path}:{lineno}: duplicate user id {user} (first seen on line {first_line[user]})")
    first_line[user] = lineno
    users.append(user)
    sequences.append(np.array(ids[1:], dtype=np.int32))
  return np.array(users, dtype=np.int32), sequences


def _sniff_sep(header: str) -> str:
  """Picks ',' or tab, whichever the header line has more of (',' when it has neither)."""
  return "\t" if header.count("\t") > header.count(",") else ","


def _decode_text(data: bytes, path: str) -> str:
  """Decodes UTF-8 (dropping a byte-order mark) with a DataError on bad bytes."""
  try:
    return data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    lineno = data.count(b"\n", 0, e.start) + 1
    raise DataError(f"{path}:{lineno}: not valid UTF-8 text ({e.reason})") from None


def _column_index(header: list[str], column: str, role: str, path: str, lineno: int) -> int:
  """Returns the position of ``column`` in the header, or raises a DataError listing the columns."""
  if column not in header:
    columns = ", ".join(repr(c) for c in header)
    raise DataError(_one_line(f"{path}:{lineno}: no {role} column {column!r} in the header (columns: {columns})"))
  return header.index(column)


def _user_sort_key(raw_ids: Iterable[str]) -> Any:
  """Key ordering raw user ids numerically if all are integers, else as text."""
  if all(_INT_TEXT.fullmatch(r) for r in raw_ids):
    return lambda r: (int(r), r)  # the text breaks ties such as '01' vs '1'
  return lambda r: r


def read_interactions(
  path: str | os.PathLike,
  *,
  user_col: str = "user",
  item_col: str = "item",
  time_col: str | None = "timestamp",
  sep: str | None = None,
  k_core: int = 0,
) -> SequenceData:
  """Reads a CSV/TSV interaction log (plain or gzipped) into dense-id user sequences.

  Args:
    path: the file; a header row, then one row per interaction.
    user_col: the name of the user id column.
    item_col: the name of the item id column.
    time_col: the name of the timestamp column (parsed as a float); None keeps file order.
    sep: the field separator; None picks ',' or tab from the header.
    k_core: if > 0, repeatedly drop users and items with fewer than ``k_core`` interactions (repeats
      count) until every remaining user and item has at least ``k_core``.

  Returns:
    Users ``1..U`` and their time-ordered sequences, with ``user_map`` and ``item_map`` set (see the
    module docstring for how dense ids are assigned).
  """
  if sep is not None and len(sep) != 1:
    raise ConfigError(f"sep must be a single character, got {sep!r}")
  if k_core < 0:
    raise ConfigError(f"k_core must be >= 0, got {k_core}")
  path_str = str(path)
  text = _decode_text(_read_bytes(path), path_str)

  header_line = next((line for line in io.StringIO(text) if line.strip()), None)
  if header_line is None:
    raise DataError(f"{path_str}: no header row (the file is empty)")
  if sep is None:
    sep = _sniff_sep(header_line)

  reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
  header: list[str] | None = None
  columns: tuple[int, int, int | None] = (0, 0, None)
  user_codes: dict[str, int] = {}
  item_codes: dict[str, int] = {}
  users: list[int] = []
  items: list[int] = []
  times: list[float] = []
  try:
    for row in reader:
      lineno = reader.line_num
      if not row or (len(row) == 1 and not row[0].strip()):
        continue
      if header is None:
        header = [name.strip() for name in row]
        columns = (
          _column_index(header, user_col, "user", path_str, lineno),
          _column_index(header, item_col, "item", path_str, lineno),
          None if time_col is None else _column_index(header, time_col, "time", path_str, lineno),
        )
        continue
      if len(row) != len(header):
        raise DataError(f"{path_str}:{lineno}: expected {len(header)} fields, got {len(row)}")
      user_raw, item_raw = row[columns[0]].strip(), row[columns[1]].strip()
      if not user_raw:
        raise DataError(f"{path_str}:{lineno}: empty user id")
      if not item_raw:
        raise DataError(f"{path_str}:{lineno}: empty item id")
      if columns[2] is not None:
        time_raw = row[columns[2]].strip()
        try:
          time = float(time_raw)
        except ValueError:
          time = float("nan")
        if not np.isfinite(time):
          raise DataError(_one_line(f"{path_str}:{lineno}: timestamp {time_raw!r} is not a finite number"))
        times.append(time)
      users.append(user_codes.setdefault(user_raw, len(user_codes)))
      items.append(item_codes.setdefault(item_raw, len(item_codes)))
  except csv.Error as e:
    raise DataError(_one_line(f"{path_str}:{reader.line_num}: malformed row ({e})")) from None

  if not users:
    raise DataError(f"{path_str}: no interactions (only a header row)")
  user_arr = np.array(users, dtype=np.int64)
  item_arr = np.array(items, dtype=np.int64)
  time_arr = np.array(times, dtype=np.float64) if time_col is not None else np.zeros(len(users))

  keep = _k_core_mask(user_arr, item_arr, len(user_codes), len(item_codes), k_core)
  if not keep.any():
    raise DataError(f"{path_str}: no interactions left after {k_core}-core filtering")
  user_arr, item_arr, time_arr = user_arr[keep], item_arr[keep], time_arr[keep]
  return _build_dense(user_arr, item_arr, time_arr, list(user_codes), list(item_codes), path_str)


def _k_core_mask(users: np.ndarray, items: np.ndarray, num_users: int, num_items: int, k: int) -> np.ndarray:
  """Boolean mask of the interactions that survive iterative k-core filtering (all of them if k <= 1)."""
  keep = np.ones(len(users), dtype=bool)
  if k <= 1:
    return keep
  while True:
    user_count = np.bincount(users[keep], minlength=num_users)
    item_count = np.bincount(items[keep], minlength=num_items)
    new_keep = keep & (user_count[users] >= k) & (item_count[items] >= k)
    if new_keep.sum() == keep.sum():  # dropping only ever shrinks the mask, so equal sums = stable
      return keep
    keep = new_keep


def _build_dense(
  users: np.ndarray,
  items: np.ndarray,
  times: np.ndarray,
  user_raw: list[str],
  item_raw: list[str],
  source: str,
) -> SequenceData:
  """Assigns dense ids to the kept interactions (coded by first appearance) and builds the sequences."""
  # Users: sorted raw id order.
  present_users = np.unique(users)
  key = _user_sort_key(user_raw[c] for c in present_users)
  ordered_users = sorted(present_users.tolist(), key=lambda c: key(user_raw[c]))
  user_dense = np.zeros(len(user_raw), dtype=np.int64)
  user_dense[ordered_users] = np.arange(1, len(ordered_users) + 1)

  # Items: order of first appearance in time, ties by file order (a stable sort keeps file order).
  by_time = np.argsort(times, kind="stable")
  present_items, first = np.unique(items[by_time], return_index=True)
  ordered_items = present_items[np.argsort(first)]
  item_dense = np.zeros(len(item_raw), dtype=np.int64)
  item_dense[ordered_items] = np.arange(1, len(ordered_items) + 1)

  # Sequences: group by dense user, time order within each user, file order on ties.
  dense_u = user_dense[users][by_time]
  order = by_time[np.argsort(dense_u, kind="stable")]
  sorted_items = item_dense[items[order]].astype(np.int32)
  counts = np.bincount(user_dense[users], minlength=len(ordered_users) + 1)[1:]
  sequences = np.split(sorted_items, np.cumsum(counts)[:-1])

  return SequenceData(
    users=np.arange(1, len(ordered_users) + 1, dtype=np.int32),
    sequences=sequences,
    num_items=len(ordered_items),
    num_users=len(ordered_users),
    source=source,
    user_map={user_raw[c]: i + 1 for i, c in enumerate(ordered_users)},
    item_map={item_raw[c]: i + 1 for i, c in enumerate(ordered_items.tolist())},
  )


def _guess_format(path: str) -> str:
  """'text' or 'interactions' from the file name, or a DataError if the suffix says neither."""
  name = path.lower()
  if name.endswith(".gz"):
    name = name[: -len(".gz")]
  if name.endswith(".txt"):
    return "text"
  if name.endswith((".csv", ".tsv")):
    return "interactions"
  raise DataError(
    f"{path}: cannot tell the format from the file name (expected .txt, .csv or .tsv, optionally .gz); "
    "pass --config.data_format=text or --config.data_format=interactions (format= in load_dataset)"
  )


def load_dataset(name_or_path: str | os.PathLike, *, format: str = "auto", **interaction_kwargs) -> SequenceData:
  """Loads a bundled dataset by name or a file by path.

  Args:
    name_or_path: a bundled dataset name or alias (see :func:`bundled_path`), or a path. A string that
      names a bundled dataset is never treated as a path.
    format: ``'auto'`` (from the suffix: ``.txt[.gz]`` -> text, ``.csv``/``.tsv[.gz]`` -> interaction
      log), ``'text'`` or ``'interactions'``.
    **interaction_kwargs: passed to :func:`read_interactions` (``user_col``, ``time_col``, ``k_core``...).

  Returns:
    The loaded data; ``source`` is the canonical name for a bundled dataset, else the path.
  """
  if format not in FORMATS:
    raise ConfigError(f"unknown data format {format!r}; expected one of {', '.join(FORMATS)}")
  name = os.fspath(name_or_path)
  canonical = _ALIASES.get(name.lower())
  if canonical is not None:
    if format == "interactions" or interaction_kwargs:
      raise ConfigError(f"bundled dataset {canonical} is in the text format; interaction options do not apply")
    data = read_sequences(bundled_path(canonical))
    return dataclasses.replace(data, source=canonical)
  if not os.path.exists(name) and os.sep not in name and "." not in name:
    bundled_path(name)  # looks like a dataset name, not a path: raises the unknown-dataset error
  if not os.path.exists(name):
    raise DataError(f"{name}: no such file")
  if os.path.isdir(name):
    raise DataError(f"{name}: is a directory, expected a file")
  if format == "auto":
    format = _guess_format(name)
  if format == "text":
    if interaction_kwargs:
      raise ConfigError(
        f"options {', '.join(sorted(interaction_kwargs))} only apply to interaction logs, not the text format"
      )
    return read_sequences(name)
  return read_interactions(name, **interaction_kwargs)
