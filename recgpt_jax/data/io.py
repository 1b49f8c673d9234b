"""Reading user sequences: the RecGPT text format, raw interaction logs and the bundled datasets.

Two input formats are supported.

* **Text** (``.txt`` / ``.txt.gz``), the format of the RecGPT / S3-Rec data: one line per user,
  ``user_id item_1 ... item_n``, whitespace separated, items in time order. Ids are positive integers;
  0 is reserved for padding. Blank lines are skipped.
* **Interaction log** (``.csv`` / ``.tsv``, optionally gzipped, or ``.parquet``): a header row (Parquet: the
  schema) and one row per interaction with a user, an item and a timestamp column. Raw ids are arbitrary
  strings (Parquet integer ids are read as their decimal text) and are mapped to dense ids ``1..N``:

  - users get dense ids in sorted order of their raw id (numerically when every raw user id is an
    integer, as text otherwise), so the numbering does not depend on row order;
  - items get dense ids in order of first appearance in time (ties broken by file order), the
    convention of the S3-Rec preprocessing, so popular early items get small ids.

  Each user's interactions are sorted by timestamp; the sort is stable, so ties keep file order.
  Repeated ``(user, item)`` pairs are kept: they are repeat interactions.

  A log is read in vectorised batches with pyarrow and held as int32 codes and float64 timestamps, so
  logs of 10^8 rows fit in a few GB.

Every problem with the input raises :class:`~recgpt_jax.errors.DataError` with a one-line message
``{path}:{line}: {problem}`` (Parquet: ``{path}: row {n}: {problem}``), or ``{path}: {problem}`` when no line
applies.
"""

from __future__ import annotations

import codecs
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
  f, gzipped = _open_binary(str(path))
  with f:
    try:
      return f.read()
    except (OSError, EOFError, zlib.error) as e:
      if gzipped:
        raise DataError(_one_line(f"{path}: cannot decompress gzip data ({e})")) from None
      raise DataError(_one_line(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})")) from None


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


def _column_index(header: list[str], column: str, role: str, path: str, lineno: int) -> int:
  """Returns the position of ``column`` in the header, or raises a DataError listing the columns."""
  if column not in header:
    columns = ", ".join(repr(c) for c in header)
    raise DataError(_one_line(f"{path}:{lineno}: no {role} column {column!r} in the header (columns: {columns})"))
  return header.index(column)


# --- Interaction logs -------------------------------------------------------------------------------------------
#
# A log is read in batches by Arrow (CSV: a streaming reader over blocks of _CSV_BLOCK_BYTES; Parquet: batches of
# _PARQUET_BATCH_ROWS rows). Each batch keeps only int32 id codes and float64 timestamps, so memory is bounded by the
# data: 16 bytes a row plus the distinct raw ids. A CSV problem that Arrow detects (or a value it parses differently
# from Python) sends the file through the streaming validator, which re-reads it with the csv module line by line to
# name the line, exactly as the messages have always read.

_CSV_BLOCK_BYTES = 2 << 20
_PARQUET_BATCH_ROWS = 1 << 18
# Rows per step of the chunked numpy passes over whole columns: bounds their temporaries (numpy casts int32
# indices to int64) to a few tens of MB instead of 8 bytes a row.
_CHUNK_ROWS = 1 << 22
# Rows of raw ids read before they are coded (at least; see _IdCoder).
_MERGE_ROWS = 1 << 22
_INT_PATTERN = "^-?[0-9]+$"  # an integer raw id (ASCII digits); in RE2, '$' is the end of the text
_READ_CHUNK_BYTES = 1 << 20  # bytes a time read by the streaming validator


class _Fallback(Exception):
  """The vectorised CSV reader met something it does not report itself (the message is Arrow's or a summary)."""


def _chunks(n: int):
  """``(start, stop)`` of the ``_CHUNK_ROWS`` pieces of ``range(n)``."""
  for start in range(0, n, _CHUNK_ROWS):
    yield start, min(start + _CHUNK_ROWS, n)


def _open_binary(path: str) -> tuple[Any, bool]:
  """Opens ``path`` for reading bytes, through gzip when it is gzipped (by magic bytes or suffix).

  Returns:
    ``(file, gzipped)``; the caller closes the file.
  """
  try:
    f = open(path, "rb")  # noqa: SIM115 (returned to the caller, which closes it)
  except FileNotFoundError:
    raise DataError(f"{path}: no such file") from None
  except IsADirectoryError:
    raise DataError(f"{path}: is a directory, expected a file") from None
  except OSError as e:
    raise DataError(_one_line(f"{path}: cannot read ({e.strerror or e})")) from None
  try:
    magic = f.read(len(_GZIP_MAGIC))
    f.seek(0)
  except OSError as e:
    f.close()
    raise DataError(_one_line(f"{path}: cannot read ({e.strerror or e})")) from None
  if magic == _GZIP_MAGIC or path.endswith(".gz"):
    f.close()
    return gzip.GzipFile(path, "rb"), True
  return f, False


def _open_text(path: str, newline: str) -> io.TextIOWrapper:
  """Opens ``path`` (gzipped or not) as UTF-8 text, dropping a byte-order mark; ``newline`` as for ``open``."""
  f, _ = _open_binary(path)
  return io.TextIOWrapper(f, encoding="utf-8-sig", newline=newline)


def _check_decodable(path: str) -> None:
  """Reads the whole file once, a chunk at a time, for gzip and UTF-8 errors; raises the first as a DataError."""
  decoder = codecs.getincrementaldecoder("utf-8")()
  lines_before = 0
  f, gzipped = _open_binary(path)
  with f:
    while True:
      try:
        chunk = f.read(_READ_CHUNK_BYTES)
      except (OSError, EOFError, zlib.error) as e:
        if gzipped:
          raise DataError(_one_line(f"{path}: cannot decompress gzip data ({e})")) from None
        raise DataError(_one_line(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})")) from None
      held = len(decoder.getstate()[0])  # bytes of a character split over the previous chunk (never a newline)
      try:
        decoder.decode(chunk, final=not chunk)
      except UnicodeDecodeError as e:
        lineno = lines_before + chunk.count(b"\n", 0, max(e.start - held, 0)) + 1
        raise DataError(f"{path}:{lineno}: not valid UTF-8 text ({e.reason})") from None
      if not chunk:
        return
      lines_before += chunk.count(b"\n")


def _sniff_file(path: str) -> str | None:
  """The separator of a CSV/TSV log: ',' or tab, whichever its header line (the first line, split at '\\n', that is
  not blank) has more of, ',' when it has neither; None if every line is blank. Lines are read in bounded pieces."""
  with _open_text(path, newline="\n") as f:
    tabs = commas = 0
    content = False
    while True:
      piece = f.readline(_READ_CHUNK_BYTES)
      tabs += piece.count("\t")
      commas += piece.count(",")
      content = content or bool(piece.strip())
      if not piece or piece.endswith("\n"):  # the end of a line, or of the file
        if content:
          return "\t" if tabs > commas else ","
        if not piece:
          return None
        tabs = commas = 0


def _is_blank(row: list[str]) -> bool:
  """Whether a csv row is skipped as a blank line."""
  return not row or (len(row) == 1 and not row[0].strip())


def _validate_csv(path: str, sep: str | None, user_col: str, item_col: str, time_col: str | None) -> None:
  """Streaming check of a CSV/TSV log with the csv module: raises the first problem as a ``path:line:`` DataError.

  The reference semantics of the vectorised reader, used to name the line when it fails: the file is read
  incrementally and nothing is kept per row, so memory stays bounded whatever the file's size. Gzip and UTF-8
  errors anywhere come first, then the rows in file order.
  """
  _check_decodable(path)
  if sep is None:
    sep = _sniff_file(path)
  if sep is None:
    raise DataError(f"{path}: no header row (the file is empty)")
  header: list[str] | None = None
  columns: tuple[int, int, int | None] = (0, 0, None)
  rows = 0
  with _open_text(path, newline="") as f:
    reader = csv.reader(f, delimiter=sep)
    try:
      for row in reader:
        lineno = reader.line_num
        if _is_blank(row):
          continue
        if header is None:
          header = [name.strip() for name in row]
          columns = (
            _column_index(header, user_col, "user", path, lineno),
            _column_index(header, item_col, "item", path, lineno),
            None if time_col is None else _column_index(header, time_col, "time", path, lineno),
          )
          continue
        if len(row) != len(header):
          raise DataError(f"{path}:{lineno}: expected {len(header)} fields, got {len(row)}")
        if not row[columns[0]].strip():
          raise DataError(f"{path}:{lineno}: empty user id")
        if not row[columns[1]].strip():
          raise DataError(f"{path}:{lineno}: empty item id")
        if columns[2] is not None:
          time_raw = row[columns[2]].strip()
          try:
            time = float(time_raw)
          except ValueError:
            time = float("nan")
          if not np.isfinite(time):
            raise DataError(_one_line(f"{path}:{lineno}: timestamp {time_raw!r} is not a finite number"))
        rows += 1
    except csv.Error as e:
      raise DataError(_one_line(f"{path}:{reader.line_num}: malformed row ({e})")) from None
  if not rows:
    raise DataError(f"{path}: no interactions (only a header row)")


def _skip_blank_row(row) -> str:
  """Arrow ``invalid_row_handler``: skips the lines the csv module reads as blank (whitespace, '""'), else fails."""
  text = row.text.strip()
  inner = text[1:-1]
  quoted_blank = len(text) >= 2 and text[0] == text[-1] == '"' and '"' not in inner and not inner.strip()
  return "skip" if row.actual_columns == 1 and (not text or quoted_blank) else "error"


def _read_csv_header(path: str, sep: str | None) -> tuple[str, list[str], int]:
  """``(sep, stripped column names, lines up to the header)`` of a CSV/TSV log; _Fallback if there is none."""
  try:
    if sep is None:
      sep = _sniff_file(path)
    if sep is None:
      raise _Fallback("no header row")
    with _open_text(path, newline="") as f:
      reader = csv.reader(f, delimiter=sep)
      for row in reader:
        if not _is_blank(row):
          return sep, [name.strip() for name in row], reader.line_num
  except (OSError, EOFError, zlib.error, UnicodeDecodeError, csv.Error) as e:
    raise _Fallback(str(e)) from None
  raise _Fallback("no header row")


def _parse_times(values) -> tuple[np.ndarray, int]:
  """float64 timestamps of an Arrow array (strings, numbers), and the index of the first that is not a finite number
  (-1 if all are; a null is not a number)."""
  import pyarrow as pa
  import pyarrow.compute as pc

  try:
    times = pc.cast(values, pa.float64())
  except pa.ArrowInvalid:
    try:  # Arrow's parser does not skip whitespace, which float() does
      times = pc.cast(pc.utf8_trim_whitespace(values), pa.float64())
    except pa.ArrowInvalid:
      times = None
  if times is not None:
    times = times.to_numpy(zero_copy_only=False)
  else:
    # float() takes a little more than Arrow ('1_000', non-ASCII digits): this batch is parsed in Python.
    times = np.empty(len(values), np.float64)
    for k, text in enumerate(values.to_pylist()):
      try:
        times[k] = float(text)
      except (TypeError, ValueError):
        times[k] = np.nan
  bad = np.flatnonzero(~np.isfinite(times))
  return times, int(bad[0]) if len(bad) else -1


class _IdCoder:
  """Codes raw ids, batch by batch, into int32 codes numbered by first appearance in the file.

  Batches wait until they hold as many rows as the dictionary of the ids seen so far (and at least
  ``_MERGE_ROWS``); then one hash pass (Arrow's ``dictionary_encode`` over the dictionary followed by the batches,
  which keeps the dictionary's codes) codes them and extends the dictionary. The work is linear in the rows, and
  memory is the dictionary, the int32 codes and the waiting batches. Ids are stripped at the end, once per distinct
  id.
  """

  def __init__(self):
    import pyarrow as pa

    self._dictionary = pa.array([], pa.string())
    self._codes = _Growing(np.int32)
    self._pending: list[Any] = []
    self._pending_rows = 0

  def add(self, ids) -> None:
    """Adds a batch of raw ids: an Arrow string array without nulls."""
    if len(ids):
      self._pending.append(ids)
      self._pending_rows += len(ids)
      if self._pending_rows >= max(_MERGE_ROWS, len(self._dictionary)):
        self._merge()

  def _merge(self) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    if not self._pending:
      return
    skip = len(self._dictionary)  # the dictionary codes itself as 0..skip-1
    parts = [self._dictionary, *self._pending] if skip else self._pending
    encoded = pc.dictionary_encode(pa.chunked_array(parts, type=pa.string()))
    self._pending, self._pending_rows = [], 0
    for chunk in encoded.chunks:
      codes = chunk.indices.to_numpy()
      if skip >= len(codes):
        skip -= len(codes)
        continue
      self._codes.append(codes[skip:])
      skip = 0
    self._dictionary = encoded.chunks[-1].dictionary  # the last chunk's dictionary holds every id

  def finish(self) -> tuple[np.ndarray, Any, int]:
    """``(int32 code of every row, the distinct stripped ids by code, the code of the empty id or -1)``."""
    import pyarrow.compute as pc

    self._merge()
    codes, self._codes = self._codes.finish(), None
    dictionary, self._dictionary = self._dictionary, None
    stripped = pc.utf8_trim_whitespace(dictionary)
    lengths = pc.binary_length(stripped)
    if len(dictionary) and pc.sum(lengths).as_py() != pc.sum(pc.binary_length(dictionary)).as_py():
      # Some ids had spaces around them: ids equal once stripped get one code.
      again = pc.dictionary_encode(stripped)
      _map_codes(codes, again.indices.to_numpy())
      stripped = again.dictionary
      lengths = pc.binary_length(stripped)
    empty = np.flatnonzero(lengths.to_numpy() == 0)
    return codes, stripped, int(empty[0]) if len(empty) else -1


def _map_codes(codes: np.ndarray, table: np.ndarray) -> None:
  """``codes[:] = table[codes]``, in place and a chunk at a time."""
  for start, stop in _chunks(len(codes)):
    codes[start:stop] = table[codes[start:stop]]


class _Growing:
  """A numpy array appended to in pieces, grown in place (``realloc``: no second copy of a large array)."""

  def __init__(self, dtype):
    self._array = np.empty(1 << 16, dtype)
    self._size = 0

  def append(self, values: np.ndarray) -> None:
    end = self._size + len(values)
    if end > len(self._array):
      self._array.resize(max(end, len(self._array) * 3 // 2), refcheck=False)
    self._array[self._size : end] = values
    self._size = end

  def finish(self) -> np.ndarray:
    """The array of everything appended (this object is spent)."""
    self._array.resize(self._size, refcheck=False)
    array, self._array = self._array, None
    return array


class _LogColumns:
  """The rows of a log as they are read: user and item codes, timestamps (None without a time column)."""

  def __init__(self, with_time: bool):
    self.users = _IdCoder()
    self.items = _IdCoder()
    self._times = _Growing(np.float64) if with_time else None

  def add(self, users, items, times: np.ndarray | None) -> None:
    self.users.add(users)
    self.items.add(items)
    if self._times is not None:
      self._times.append(times)

  def finish_times(self) -> np.ndarray | None:
    """``[N]`` float64 timestamps, or None without a time column."""
    if self._times is None:
      return None
    times, self._times = self._times.finish(), None
    times += 0.0  # -0.0 becomes 0.0: they are equal times, and sorts must not tell them apart
    return times


def _read_csv_log(path: str, sep: str | None, user_col: str, item_col: str, time_col: str | None) -> tuple:
  """Reads a CSV/TSV log (plain or gzipped) with Arrow's streaming reader.

  Returns:
    ``(users, user_ids, items, item_ids, times)``: int32 codes, the raw ids by code, float64 times or None.

  Raises:
    _Fallback: on any problem (the caller runs the streaming validator to name the line).
  """
  import pyarrow as pa
  import pyarrow.compute as pc
  import pyarrow.csv as pacsv

  sep, header, header_lines = _read_csv_header(path, sep)
  if any(column not in header for column in (user_col, item_col, time_col) if column is not None):
    raise _Fallback("missing column")
  names = [f"f{k}" for k in range(len(header))]  # the header's own names may repeat or be blank
  user_name, item_name = names[header.index(user_col)], names[header.index(item_col)]
  time_name = None if time_col is None else names[header.index(time_col)]
  used = {user_name, item_name, time_name} - {None}
  # The other columns are read as bytes, only to check that they are UTF-8 text (as decoding the file did).
  types = {name: pa.string() if name in used else pa.binary() for name in names}

  f, gzipped = _open_binary(path)
  f.close()
  log = _LogColumns(time_col is not None)
  streams = []
  errors = (pa.ArrowException, OSError, ValueError, EOFError, zlib.error)
  try:
    try:
      streams.append(pa.OSFile(path))
      if gzipped:
        streams.append(pa.CompressedInputStream(streams[0], "gzip"))
      reader = pacsv.open_csv(
        streams[-1],
        read_options=pacsv.ReadOptions(
          column_names=names, skip_rows=header_lines, block_size=_CSV_BLOCK_BYTES, use_threads=False
        ),
        parse_options=pacsv.ParseOptions(delimiter=sep, newlines_in_values=True, invalid_row_handler=_skip_blank_row),
        convert_options=pacsv.ConvertOptions(column_types=types),
      )
    except errors as e:
      raise _Fallback(str(e)) from None
    while True:
      try:
        batch = reader.read_next_batch()
        for name in names:
          if name not in used:
            pc.cast(batch.column(name), pa.string())  # raises on bytes that are not UTF-8
      except StopIteration:
        break
      except errors as e:
        raise _Fallback(str(e)) from None
      users, items = batch.column(user_name), batch.column(item_name)
      if _has_empty(users) or _has_empty(items):
        raise _Fallback("empty id")
      times = None
      if time_name is not None:
        times, bad = _parse_times(batch.column(time_name))
        if bad >= 0:
          raise _Fallback("timestamp")
      log.add(users, items, times)
  finally:
    for stream in reversed(streams):
      stream.close()
  users, user_ids, user_empty = log.users.finish()
  items, item_ids, item_empty = log.items.finish()
  if user_empty >= 0 or item_empty >= 0:
    raise _Fallback("empty id")
  return users, user_ids, items, item_ids, log.finish_times()


def _has_empty(ids) -> bool:
  """Whether an Arrow string array holds an empty string."""
  import pyarrow.compute as pc

  return len(ids) > 0 and pc.min(pc.binary_length(ids)).as_py() == 0


def _is_text_type(kind) -> bool:
  """Whether an Arrow type holds strings or bytes (read as UTF-8 text)."""
  import pyarrow as pa

  checks = ("is_string", "is_large_string", "is_string_view", "is_binary", "is_large_binary", "is_binary_view")
  return any(getattr(pa.types, check, lambda _: False)(kind) for check in checks)


def _parquet_ids(values, role: str, column: str, path: str, first_row: int):
  """A batch of a Parquet id column as an Arrow string array; a DataError naming the row of a missing id."""
  import pyarrow as pa
  import pyarrow.compute as pc

  kind = values.type
  if pa.types.is_dictionary(kind):
    values, kind = values.dictionary_decode(), kind.value_type
  if pa.types.is_integer(kind):
    values = pc.cast(values, pa.string())  # decimal text, so the ids behave as the same log's CSV ids
  elif _is_text_type(kind):
    try:
      values = values.cast(pa.string())
    except pa.ArrowInvalid:
      raise DataError(f"{path}: {role} column {column!r} is not valid UTF-8 text") from None
  else:
    raise DataError(f"{path}: {role} column {column!r} has type {kind}, expected strings or integers")
  if values.null_count or _has_empty(values):
    missing = pc.fill_null(pc.equal(pc.binary_length(values), 0), True).to_numpy(zero_copy_only=False)
    raise DataError(f"{path}: row {first_row + int(np.flatnonzero(missing)[0]) + 1}: empty {role} id")
  return values


def _parquet_times(values, column: str, path: str, first_row: int) -> np.ndarray:
  """A batch of a Parquet timestamp column as finite float64; a DataError naming the row otherwise."""
  import pyarrow as pa

  kind = values.type
  if pa.types.is_dictionary(kind):
    values, kind = values.dictionary_decode(), kind.value_type
  if pa.types.is_temporal(kind):  # timestamp, date, time, duration: their integer count orders them
    values = values.cast(pa.int32() if kind.bit_width == 32 else pa.int64())
  elif not (
    _is_text_type(kind) or pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)
  ):
    raise DataError(f"{path}: time column {column!r} has type {kind}, expected numbers or strings")
  times, bad = _parse_times(values)
  if bad >= 0:
    value = values[bad].as_py()
    if isinstance(value, str):
      value = value.strip()
    problem = "missing timestamp" if value is None else f"timestamp {value!r} is not a finite number"
    raise DataError(_one_line(f"{path}: row {first_row + bad + 1}: {problem}"))
  return times


def _read_parquet_log(path: str, user_col: str, item_col: str, time_col: str | None) -> tuple:
  """Reads a Parquet log batch by batch; every problem is a one-line DataError (see :func:`_read_csv_log`)."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  f, _ = _open_binary(path)  # the same messages as the other formats for a missing or unreadable file
  f.close()
  try:
    parquet = pq.ParquetFile(path, pre_buffer=False)
    names = parquet.schema_arrow.names
  except (pa.ArrowException, OSError) as e:
    raise DataError(_one_line(f"{path}: not a readable Parquet file ({e})")) from None
  log = _LogColumns(time_col is not None)
  try:
    for role, column in (("user", user_col), ("item", item_col), ("time", time_col)):
      if column is not None and column not in names:
        columns = ", ".join(repr(c) for c in names)
        raise DataError(_one_line(f"{path}: no {role} column {column!r} (columns: {columns})"))
    wanted = list(dict.fromkeys(c for c in (user_col, item_col, time_col) if c is not None))
    batches = parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=wanted, use_threads=False)
    rows = 0
    while True:
      try:
        batch = next(batches)
      except StopIteration:
        break
      except (pa.ArrowException, OSError) as e:
        raise DataError(_one_line(f"{path}: not a readable Parquet file ({e})")) from None
      users = _parquet_ids(batch.column(user_col), "user", user_col, path, rows)
      items = _parquet_ids(batch.column(item_col), "item", item_col, path, rows)
      times = None if time_col is None else _parquet_times(batch.column(time_col), time_col, path, rows)
      log.add(users, items, times)
      rows += batch.num_rows
  finally:
    parquet.close()
  users, user_ids, user_empty = log.users.finish()
  items, item_ids, item_empty = log.items.finish()
  # Ids made only of spaces are found once stripped, at the end: name the first row holding one.
  bad = [
    (_first_row(codes, empty), role)
    for codes, empty, role in ((users, user_empty, "user"), (items, item_empty, "item"))
    if empty >= 0
  ]
  if bad:
    row, role = min(bad)
    raise DataError(f"{path}: row {row + 1}: empty {role} id")
  return users, user_ids, items, item_ids, log.finish_times()


def _first_row(codes: np.ndarray, code: int) -> int:
  """The first position of ``code`` in ``codes`` (which holds it), a chunk at a time."""
  for start, stop in _chunks(len(codes)):
    found = np.flatnonzero(codes[start:stop] == code)
    if len(found):
      return start + int(found[0])
  raise ValueError(f"code {code} not found")


def _is_parquet(path: str) -> bool:
  return path.lower().endswith(".parquet")


def read_interactions(
  path: str | os.PathLike,
  *,
  user_col: str = "user",
  item_col: str = "item",
  time_col: str | None = "timestamp",
  sep: str | None = None,
  k_core: int = 0,
) -> SequenceData:
  """Reads an interaction log (CSV/TSV, plain or gzipped, or Parquet) into dense-id user sequences.

  The log is read in batches with Arrow and held as int32 codes and float64 timestamps (16 bytes a row, plus the
  distinct raw ids), so logs of 10^8 rows fit in a few GB.

  Args:
    path: the file; a header row, then one row per interaction (CSV/TSV), or a ``.parquet`` file whose id columns
      are strings or integers and whose timestamp column is numbers, strings or an Arrow temporal type.
    user_col: the name of the user id column.
    item_col: the name of the item id column.
    time_col: the name of the timestamp column (parsed as a float); None keeps file order.
    sep: the field separator of a CSV/TSV log; None picks ',' or tab from the header.
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
  if _is_parquet(path_str):
    users, user_ids, items, item_ids, times = _read_parquet_log(path_str, user_col, item_col, time_col)
  else:
    try:
      users, user_ids, items, item_ids, times = _read_csv_log(path_str, sep, user_col, item_col, time_col)
    except _Fallback as e:
      _validate_csv(path_str, sep, user_col, item_col, time_col)  # raises the problem with its line
      raise DataError(_one_line(f"{path_str}: cannot parse the log ({e})")) from None
  if not len(users):
    what = "the file has no rows" if _is_parquet(path_str) else "only a header row"
    raise DataError(f"{path_str}: no interactions ({what})")

  _release_arrow_memory()
  keep = _k_core_mask(users, items, len(user_ids), len(item_ids), k_core)
  if not keep.all():
    if not keep.any():
      raise DataError(f"{path_str}: no interactions left after {k_core}-core filtering")
    users = users[keep]  # one column at a time: one extra copy alive at most
    items = items[keep]
    times = None if times is None else times[keep]
  del keep
  columns = [users, items, times]
  del users, items, times  # _build_dense frees them once the sequences are built
  return _build_dense(columns, user_ids, item_ids, path_str)


def _release_arrow_memory() -> None:
  """Returns the memory Arrow's allocator keeps cached after the read to the system, for numpy to use."""
  import pyarrow as pa

  pa.default_memory_pool().release_unused()


def _bincount(codes: np.ndarray, size: int, keep: np.ndarray | None = None) -> np.ndarray:
  """``np.bincount(codes[keep], minlength=size)``, a chunk at a time (no 8-byte-a-row temporaries)."""
  counts = np.zeros(size, np.int64)
  for start, stop in _chunks(len(codes)):
    chunk = codes[start:stop]
    if keep is not None:
      chunk = chunk[keep[start:stop]]
    counts += np.bincount(chunk, minlength=size)
  return counts


def _k_core_mask(users: np.ndarray, items: np.ndarray, num_users: int, num_items: int, k: int) -> np.ndarray:
  """Boolean mask of the interactions that survive iterative k-core filtering (all of them if k <= 1)."""
  keep = np.ones(len(users), dtype=bool)
  if k <= 1:
    return keep
  kept = len(users)
  while True:
    user_ok = _bincount(users, num_users, keep) >= k
    item_ok = _bincount(items, num_items, keep) >= k
    for start, stop in _chunks(len(users)):
      keep[start:stop] &= user_ok[users[start:stop]] & item_ok[items[start:stop]]
    now = int(np.count_nonzero(keep))
    if now == kept:  # dropping only ever shrinks the mask, so an equal count = stable
      return keep
    kept = now


def _raw_user_order(raw) -> np.ndarray:
  """Positions of the raw user ids (an Arrow string array) in sorted order: numerically when all are integers
  (the text breaks ties such as '01' vs '1', as ``(int(r), r)`` would), by text otherwise."""
  import pyarrow as pa
  import pyarrow.compute as pc

  if len(raw) == 0:
    return np.zeros(0, np.int64)
  # Arrow compares strings bytewise, and UTF-8 byte order is code point order, Python's order of str.
  if not pc.all(pc.match_substring_regex(raw, _INT_PATTERN)).as_py():
    return pc.sort_indices(raw).to_numpy().astype(np.int64)
  # Integers of any length: by sign, then digit count and digits without leading zeros (then the text).
  magnitude = pc.utf8_ltrim(pc.utf8_ltrim(raw, "-"), "0")
  digits = pc.binary_length(magnitude)
  table = pa.table({"digits": digits, "magnitude": magnitude, "raw": raw})
  negative = pc.and_(pc.starts_with(raw, "-"), pc.greater(digits, 0)).to_numpy(zero_copy_only=False)
  order = []
  for mask, direction in ((negative, "descending"), (~negative, "ascending")):
    where = np.flatnonzero(mask)
    keys = [("digits", direction), ("magnitude", direction), ("raw", "ascending")]
    order.append(where[pc.sort_indices(table.take(pa.array(where)), sort_keys=keys).to_numpy().astype(np.int64)])
  return np.concatenate(order)


def _build_dense(columns: list, user_raw, item_raw, source: str) -> SequenceData:
  """Assigns dense ids to the kept interactions and builds the sequences.

  Args:
    columns: ``[users, items, times]``: ``[N]`` int32 user codes (positions in ``user_raw``), ``[N]`` int32 item
      codes (positions in ``item_raw``), ``[N]`` float64 timestamps or None for file order. The list is emptied
      and the arrays are overwritten and freed as soon as they are no longer needed.
    user_raw: Arrow string array, the raw user id of each code (codes without rows get no dense id).
    item_raw: Arrow string array, the raw item id of each code.
    source: the ``source`` of the result.
  """
  import pyarrow as pa
  import pyarrow.compute as pc

  users, items, times = columns
  columns.clear()

  # Users: sorted raw id order.
  user_count = _bincount(users, len(user_raw))
  present_users = np.flatnonzero(user_count)
  ordered_users = present_users[_raw_user_order(user_raw.take(pa.array(present_users)))]
  del present_users
  num_users = len(ordered_users)
  lengths = user_count[ordered_users]
  del user_count
  user_dense = np.zeros(len(user_raw), np.int32)
  user_dense[ordered_users] = np.arange(1, num_users + 1, dtype=np.int32)

  # Items: order of first appearance in time, ties by file order. An item's first appearance is its earliest time
  # and, among its rows at that time, the first in the file: unique() of the rows at their item's earliest time, in
  # file order, lists the items by that first row; a stable sort by earliest time then gives the order.
  first_time = np.zeros(len(item_raw))
  if times is not None:
    first_time[:] = np.inf
    for start, stop in _chunks(len(items)):
      np.minimum.at(first_time, items[start:stop], times[start:stop])
  at_first = []
  for start, stop in _chunks(len(items)):
    chunk = items[start:stop]
    if times is not None:
      chunk = chunk[times[start:stop] == first_time[chunk]]
    at_first.append(pc.unique(pa.array(chunk)))
  by_first_row = pc.unique(pa.concat_arrays(at_first)).to_numpy().astype(np.int64)
  del at_first
  ordered_items = by_first_row[np.argsort(first_time[by_first_row], kind="stable")]
  del by_first_row, first_time
  num_items = len(ordered_items)
  item_dense = np.zeros(len(item_raw), np.int32)
  item_dense[ordered_items] = np.arange(1, num_items + 1, dtype=np.int32)

  _map_codes(users, user_dense)
  _map_codes(items, item_dense)
  del user_dense, item_dense

  # Sequences: grouped by dense user, time order within each user, file order on ties (Arrow's sort is stable).
  if times is None:
    order = pc.sort_indices(pa.array(users))
  else:
    order = pc.sort_indices(pa.table({"u": users, "t": times}), sort_keys=[("u", "ascending"), ("t", "ascending")])
  del users, times
  order = order.to_numpy()
  sorted_items = np.empty(len(items), np.int32)
  for start, stop in _chunks(len(items)):
    sorted_items[start:stop] = items[order[start:stop]]
  del order, items
  _release_arrow_memory()
  ends = np.cumsum(lengths).tolist()
  sequences = [sorted_items[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]
  del ends

  user_ids = user_raw.take(pa.array(ordered_users)).to_pylist()
  item_ids = item_raw.take(pa.array(ordered_items)).to_pylist()
  return SequenceData(
    users=np.arange(1, num_users + 1, dtype=np.int32),
    sequences=sequences,
    num_items=num_items,
    num_users=num_users,
    source=source,
    user_map=dict(zip(user_ids, range(1, num_users + 1), strict=True)),
    item_map=dict(zip(item_ids, range(1, num_items + 1), strict=True)),
  )


def is_interaction_log(name_or_path: str | os.PathLike) -> bool:
  """Whether ``load_dataset(name_or_path)`` would read an interaction log (not a bundled name or a text file).

  Raises:
    errors.DataError: if the path's format cannot be told from its name.
  """
  name = os.fspath(name_or_path)
  return name.lower() not in _ALIASES and _guess_format(name) == "interactions"


def _guess_format(path: str) -> str:
  """'text' or 'interactions' from the file name, or a DataError if the suffix says neither."""
  name = path.lower()
  if name.endswith(".parquet"):
    return "interactions"
  if name.endswith(".gz"):
    name = name[: -len(".gz")]
  if name.endswith(".txt"):
    return "text"
  if name.endswith((".csv", ".tsv")):
    return "interactions"
  raise DataError(
    f"{path}: cannot tell the format from the file name (expected .txt, .csv or .tsv, optionally .gz, or .parquet); "
    "pass --config.data_format=text or --config.data_format=interactions (format= in load_dataset)"
  )


def load_dataset(name_or_path: str | os.PathLike, *, format: str = "auto", **interaction_kwargs) -> SequenceData:
  """Loads a bundled dataset by name or a file by path.

  Args:
    name_or_path: a bundled dataset name or alias (see :func:`bundled_path`), or a path. A string that
      names a bundled dataset is never treated as a path.
    format: ``'auto'`` (from the suffix: ``.txt[.gz]`` -> text, ``.csv``/``.tsv[.gz]`` or ``.parquet`` ->
      interaction log), ``'text'`` or ``'interactions'``.
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
