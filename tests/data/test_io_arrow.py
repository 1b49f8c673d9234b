"""Tests for the vectorised (pyarrow) interaction-log reader of recgpt_jax.data.io.

The reader must give exactly what the plain-Python, sort-based reference below gives (the documented numbering:
users by sorted raw id, numerically when all are integers; items by first appearance in time, ties by file order;
stable time order within each user; repeats kept; k-core filtering), for CSV, TSV, gzip and Parquet alike, and
report every problem as a one-line DataError naming the file and the line (CSV) or row (Parquet).
"""

from __future__ import annotations

import collections
import csv
import gzip
import io as std_io
import pathlib
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recgpt_jax.data import io as data_io
from recgpt_jax.errors import DataError

HEADER = ("user", "item", "timestamp")


# --- The reference ------------------------------------------------------------------------------------------


def reference(rows, k_core: int = 0):
  """``(user_map, item_map, sequences)`` of ``rows`` (raw ``(user, item, time)`` strings in file order), computed
  the straightforward way with Python sorts."""
  table = [(u.strip(), i.strip(), float(t)) for u, i, t in rows]
  if k_core > 1:
    while True:
      users = collections.Counter(u for u, _, _ in table)
      items = collections.Counter(i for _, i, _ in table)
      kept = [r for r in table if users[r[0]] >= k_core and items[r[1]] >= k_core]
      if len(kept) == len(table):
        break
      table = kept
  raw_users = {u for u, _, _ in table}
  if all(re.fullmatch(r"-?[0-9]+", u, re.ASCII) for u in raw_users):
    ordered_users = sorted(raw_users, key=lambda u: (int(u), u))
  else:
    ordered_users = sorted(raw_users)
  user_map = {u: n for n, u in enumerate(ordered_users, start=1)}
  item_map: dict[str, int] = {}
  for _, item, _ in sorted(table, key=lambda r: r[2]):  # sorted() is stable: file order on ties
    item_map.setdefault(item, len(item_map) + 1)
  per_user = collections.defaultdict(list)
  for user, item, time in table:
    per_user[user].append((time, item_map[item]))
  sequences = [[item for _, item in sorted(per_user[u], key=lambda p: p[0])] for u in ordered_users]
  return user_map, item_map, sequences


def assert_matches(data: data_io.SequenceData, expected) -> None:
  """Checks ``data`` against ``reference()``'s result, map order included."""
  user_map, item_map, sequences = expected
  assert list(data.user_map.items()) == list(user_map.items())
  assert list(data.item_map.items()) == list(item_map.items())
  assert data.users.dtype == np.int32
  np.testing.assert_array_equal(data.users, np.arange(1, len(user_map) + 1))
  assert (data.num_users, data.num_items) == (len(user_map), len(item_map))
  assert len(data.sequences) == len(sequences)
  for got, want in zip(data.sequences, sequences, strict=True):
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.array(want, dtype=np.int32))


def assert_same(a: data_io.SequenceData, b: data_io.SequenceData) -> None:
  assert list(a.user_map.items()) == list(b.user_map.items())
  assert list(a.item_map.items()) == list(b.item_map.items())
  np.testing.assert_array_equal(a.users, b.users)
  assert (a.num_users, a.num_items) == (b.num_users, b.num_items)
  assert len(a.sequences) == len(b.sequences)
  assert all(np.array_equal(x, y) for x, y in zip(a.sequences, b.sequences, strict=True))


# --- Writing logs ---------------------------------------------------------------------------------------------


def write_csv(path: pathlib.Path, rows, *, header=HEADER, sep=",", prefix="", newline="\n") -> pathlib.Path:
  """Writes ``rows`` as CSV/TSV (quoted where needed; gzipped if the name ends in .gz) after ``prefix``."""
  out = std_io.StringIO()
  writer = csv.writer(out, delimiter=sep, lineterminator=newline)
  writer.writerow(header)
  writer.writerows(rows)
  raw = (prefix + out.getvalue()).encode()
  path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
  return path


def write_parquet(path: pathlib.Path, rows, *, times: str = "float", row_group_size: int | None = None):
  """Writes ``rows`` as Parquet: string ids, timestamps as float64, or as their strings (``times='string'``)."""
  users, items, stamps = zip(*rows, strict=True) if rows else ((), (), ())
  time_array = pa.array([float(t) for t in stamps]) if times == "float" else pa.array(list(stamps), pa.string())
  table = pa.table({"user": pa.array(list(users), pa.string()), "item": pa.array(list(items)), "timestamp": time_array})
  pq.write_table(table, path, row_group_size=row_group_size)
  return path


# --- Equivalence on small hand-written logs -------------------------------------------------------------------

LOGS = {
  # Text user ids (u1 < u10 < u2), ties in time, repeats.
  "text-ids": [
    ("u2", "b", "5"),
    ("u1", "a", "3"),
    ("u2", "a", "1"),
    ("u10", "c", "2"),
    ("u1", "b", "3"),
    ("u2", "c", "5"),
    ("u2", "b", "5"),
    ("u1", "a", "3"),
  ],
  # Integer user ids sort numerically; '01' vs '1' and '-0' vs '0' tie on value and are ordered by text; ids
  # beyond 64 bits; negative ids.
  "integer-ids": [
    ("10", "x", "7"),
    ("9", "y", "7"),
    ("01", "x", "1"),
    ("1", "z", "1"),
    ("-3", "x", "2"),
    ("-12", "y", "0"),
    ("0", "w", "9"),
    ("-0", "w", "9"),
    ("123456789012345678901234567890", "x", "3"),
    ("-99999999999999999999", "q", "4"),
    ("007", "x", "5"),
    ("2", "y", "6"),
  ],
  # One non-integer id makes the whole order textual.
  "mixed-ids": [("10", "a", "1"), ("9", "b", "2"), ("x", "a", "3"), ("-1", "c", "0")],
  # Spaces around ids (the same id once stripped), float, negative, exponent and -0.0 timestamps.
  "spaces-floats": [
    (" u1", "a ", "1.5"),
    ("u1 ", " b", "-2"),
    ("u2", "a", "1e1"),
    ("\tu2", "b\t", "0.0"),
    ("u3", " a ", "-0.0"),
    ("u3", "c", " 2.5 "),
    ("u1", "c", "-2"),
  ],
  # Non-ASCII ids: code point order ('Z' < 'a' < 'é' < '日本').
  "unicode": [("日本", "ß", "3"), ("é", "ü", "1"), ("a", "ß", "2"), ("Z", "日本", "2"), ("é", "ß", "1")],
  # Ids with separators, quotes and newlines (quoted in the file).
  "quoted": [("a,b", 'say "hi"', "2"), ("c\nd", "x", "1"), ("a,b", "x", "1"), ("e", "multi\nline", "0")],
}


def _all_ties(rows):
  return [(u, i, "1") for u, i, _ in rows]


@pytest.mark.parametrize("name", list(LOGS))
@pytest.mark.parametrize("file_name", ["log.csv", "log.tsv", "log.csv.gz"])
def test_equivalence_small_logs(tmp_path, name, file_name):
  rows = LOGS[name]
  sep = "\t" if ".tsv" in file_name else ","
  data = data_io.read_interactions(write_csv(tmp_path / file_name, rows, sep=sep))
  expected = reference(rows)
  assert_matches(data, expected)
  assert_same(data_io.read_interactions(write_parquet(tmp_path / "log.parquet", rows)), data)
  assert_same(data_io.read_interactions(write_parquet(tmp_path / "s.parquet", rows, times="string")), data)
  assert data_io.load_dataset(str(tmp_path / "log.parquet")).user_map == expected[0]


@pytest.mark.parametrize("k_core", [2, 3])
def test_equivalence_k_core(tmp_path, k_core):
  rows = [(f"u{n % 7}", f"i{(n * 5) % 11}", str(n % 4)) for n in range(60)] + [("lone", "i1", "0")]
  expected = reference(rows, k_core)
  assert_matches(data_io.read_interactions(write_csv(tmp_path / "log.csv", rows), k_core=k_core), expected)
  assert_matches(data_io.read_interactions(write_parquet(tmp_path / "log.parquet", rows), k_core=k_core), expected)


def test_equivalence_without_time_column(tmp_path):
  rows = LOGS["text-ids"]
  expected = reference(_all_ties(rows))  # no time column: file order throughout
  csv_path = write_csv(tmp_path / "log.csv", [(u, i) for u, i, _ in rows], header=("user", "item"))
  assert_matches(data_io.read_interactions(csv_path, time_col=None), expected)
  assert_matches(data_io.read_interactions(write_parquet(tmp_path / "log.parquet", rows), time_col=None), expected)


def test_file_layout_variants(tmp_path):
  # A byte-order mark, blank and whitespace-only lines before the header and between rows, CRLF line ends, extra
  # and repeated columns, a quoted blank line, and timestamps only Python's float() reads ('1_000').
  rows = [("u2", "b", "1_000"), ("u1", "a", "3"), ("u2", "a", "1"), ("u1", "c", "٣")]
  text = "\ufeff\r\n  \r\nextra,user,item,timestamp,extra\r\n"
  text += "é,u2,b,1_000,x\r\n\r\n   \r\n"
  text += 'ü,u1,a,3,y\r\n""\r\nz,u2,a,1,z\r\nq,u1,c,٣,q\r\n'
  path = tmp_path / "log.csv"
  path.write_bytes(text.encode())
  assert_matches(data_io.read_interactions(path), reference(rows))


def test_explicit_separator_and_columns(tmp_path):
  rows = LOGS["text-ids"]
  path = write_csv(
    tmp_path / "log.dat", [(t, u, "x", i) for u, i, t in rows], header=("ts", "uid", "x", "iid"), sep=";"
  )
  data = data_io.load_dataset(str(path), format="interactions", user_col="uid", item_col="iid", time_col="ts", sep=";")
  assert_matches(data, reference(rows))


def test_concatenated_gzip_members(tmp_path):
  rows = LOGS["text-ids"]
  head, tail = write_csv(tmp_path / "a.csv", rows[:3]).read_bytes(), "".join(f"{u},{i},{t}\n" for u, i, t in rows[3:])
  path = tmp_path / "log.csv.gz"
  path.write_bytes(gzip.compress(head) + gzip.compress(tail.encode()))
  assert_matches(data_io.read_interactions(path), reference(rows))


def test_parquet_integer_ids_and_time_types(tmp_path):
  rows = LOGS["integer-ids"][:8] + [("2", "5", "6")]
  expected = reference(rows)
  table = pa.table(
    {
      "user": pa.array([int(u) for u, _, _ in rows], pa.int64()),
      "item": pa.array([i for _, i, _ in rows]).dictionary_encode(),
      "timestamp": pa.array([int(t) for _, _, t in rows], pa.int32()),
    }
  )
  pq.write_table(table, tmp_path / "ints.parquet")
  data = data_io.read_interactions(tmp_path / "ints.parquet")
  # Integer ids read as their decimal text: '01' and '-0' become '1' and '0' (so those rows merge).
  assert_matches(data, reference([(str(int(u)), i, t) for u, i, t in rows]))
  assert data.user_map["-12"] == 1
  seconds = pa.array([int(t) for _, _, t in rows], pa.int64()).cast(pa.timestamp("s"))
  pq.write_table(table.set_column(2, "timestamp", seconds), tmp_path / "stamps.parquet")
  assert_same(data_io.read_interactions(tmp_path / "stamps.parquet"), data)
  assert expected[1] == data.item_map  # the item order does not depend on how ids are typed


def test_reading_writes_nothing(tmp_path):
  write_csv(tmp_path / "log.csv.gz", LOGS["text-ids"])
  write_parquet(tmp_path / "log.parquet", LOGS["text-ids"])
  (tmp_path / "bad.csv").write_text("user,item,timestamp\nu,i,x\n")
  before = sorted(tmp_path.iterdir())
  data_io.read_interactions(tmp_path / "log.csv.gz")
  data_io.read_interactions(tmp_path / "log.parquet")
  with pytest.raises(DataError):
    data_io.read_interactions(tmp_path / "bad.csv")
  assert sorted(tmp_path.iterdir()) == before


# --- A larger randomized log ----------------------------------------------------------------------------------


def _random_rows(seed: int, n: int, integer_users: bool):
  rng = np.random.default_rng(seed)
  users = rng.integers(0, n // 10, n) * 7 + 3
  items = np.minimum(rng.zipf(1.3, n), 5000)
  times = rng.integers(0, 2000, n)  # many ties
  user_ids = [str(u) if integer_users else f"user{u}" for u in users.tolist()]
  return list(zip(user_ids, [f"i{i}" for i in items.tolist()], [str(t) for t in times.tolist()], strict=True))


@pytest.mark.parametrize("integer_users", [False, True])
@pytest.mark.parametrize("sizes", ["default", "small"])
def test_randomized_log_csv_parquet_reference(tmp_path, monkeypatch, integer_users, sizes):
  if sizes == "small":  # many blocks, batches and dictionary merges
    monkeypatch.setattr(data_io, "_CSV_BLOCK_BYTES", 1 << 16)
    monkeypatch.setattr(data_io, "_PARQUET_BATCH_ROWS", 3000)
    monkeypatch.setattr(data_io, "_MERGE_ROWS", 5000)
    monkeypatch.setattr(data_io, "_CHUNK_ROWS", 7001)
  rows = _random_rows(0, 200_000, integer_users)
  csv_path = write_csv(tmp_path / "log.csv", rows)
  parquet_path = write_parquet(tmp_path / "log.parquet", rows, row_group_size=50_000)
  from_csv = data_io.read_interactions(csv_path)
  from_parquet = data_io.read_interactions(parquet_path)
  assert_same(from_csv, from_parquet)
  assert_matches(from_csv, reference(rows))
  if integer_users:  # the same log with an integer user column
    table = pq.read_table(parquet_path)
    table = table.set_column(0, "user", table.column("user").cast(pa.int64()))
    pq.write_table(table, tmp_path / "int.parquet")
    assert_same(data_io.read_interactions(tmp_path / "int.parquet"), from_csv)


def test_randomized_log_k_core(tmp_path):
  rows = _random_rows(1, 50_000, False)
  data = data_io.read_interactions(write_csv(tmp_path / "log.csv.gz", rows), k_core=5)
  assert_matches(data, reference(rows, 5))
  assert_same(data_io.read_interactions(write_parquet(tmp_path / "log.parquet", rows), k_core=5), data)


# --- Errors ---------------------------------------------------------------------------------------------------


def _one_line_error(path, call=data_io.read_interactions, **kwargs) -> str:
  with pytest.raises(DataError) as e:
    call(path, **kwargs)
  message = str(e.value)
  assert message.startswith(f"{path}:"), message
  assert "\n" not in message
  return message


def test_parquet_missing_column(tmp_path):
  path = tmp_path / "log.parquet"
  pq.write_table(pa.table({"user": ["u"], "product": ["a"], "timestamp": [1.0]}), path)
  message = _one_line_error(path)
  assert message == f"{path}: no item column 'item' (columns: 'user', 'product', 'timestamp')"
  message = _one_line_error(path, item_col="product", time_col="time")
  assert message == f"{path}: no time column 'time' (columns: 'user', 'product', 'timestamp')"


@pytest.mark.parametrize(
  "column, values, fragment",
  [
    ("user", ["u1", "u2", "", "u4"], "row 3: empty user id"),
    ("user", ["u1", "u2", "u3", None], "row 4: empty user id"),
    ("item", ["a", "  ", "c", "d"], "row 2: empty item id"),
    ("timestamp", ["1", "2", "yesterday", "4"], "row 3: timestamp 'yesterday' is not a finite number"),
    ("timestamp", ["1", " inf ", "3", "4"], "row 2: timestamp 'inf' is not a finite number"),
    ("timestamp", [1.0, 2.0, 3.0, float("nan")], "row 4: timestamp nan is not a finite number"),
    ("timestamp", [1.0, None, 3.0, 4.0], "row 2: missing timestamp"),
    ("user", [True, False, True, True], "user column 'user' has type bool, expected strings or integers"),
  ],
)
def test_parquet_row_errors(tmp_path, column, values, fragment):
  columns = {"user": ["u1", "u2", "u3", "u4"], "item": ["a", "b", "c", "d"], "timestamp": [1.0, 2.0, 3.0, 4.0]}
  columns[column] = values
  path = tmp_path / "log.parquet"
  pq.write_table(pa.table(columns), path)
  message = _one_line_error(path)
  assert message == f"{path}: {fragment}"


def test_parquet_row_numbers_span_batches(tmp_path, monkeypatch):
  monkeypatch.setattr(data_io, "_PARQUET_BATCH_ROWS", 1000)
  stamps = [str(n) for n in range(5000)]
  stamps[4321] = "soon"
  table = pa.table({"user": ["u"] * 5000, "item": ["a"] * 5000, "timestamp": stamps})
  path = tmp_path / "log.parquet"
  pq.write_table(table, path, row_group_size=1500)
  assert _one_line_error(path) == f"{path}: row 4322: timestamp 'soon' is not a finite number"


@pytest.mark.parametrize("cut", ["truncated", "magic-only", "garbage"])
def test_parquet_unreadable_file(tmp_path, cut):
  path = tmp_path / "log.parquet"
  write_parquet(path, _random_rows(2, 2000, False))
  raw = path.read_bytes()
  path.write_bytes({"truncated": raw[: len(raw) // 2], "magic-only": b"PAR1", "garbage": b"PAR1" + raw[100:]}[cut])
  message = _one_line_error(path)
  assert message.startswith(f"{path}: not a readable Parquet file (")
  assert _one_line_error(path, call=data_io.load_dataset) == message


def test_parquet_without_rows(tmp_path):
  path = write_parquet(tmp_path / "log.parquet", [])
  assert _one_line_error(path) == f"{path}: no interactions (the file has no rows)"


def test_streaming_validator_names_a_late_line(tmp_path):
  rows = [(f"u{n % 97}", f"i{n % 13}", str(n)) for n in range(60_000)]
  rows[50_000] = ("u1", "i1", "later")
  for name in ("log.csv", "log.csv.gz"):
    path = write_csv(tmp_path / name, rows)
    message = _one_line_error(path)
    assert message == f"{path}:50002: timestamp 'later' is not a finite number"


def test_streaming_validator_on_valid_file_and_utf8_in_unused_column(tmp_path):
  rows = LOGS["unicode"]
  path = write_csv(tmp_path / "log.csv", rows)
  data_io._validate_csv(str(path), None, "user", "item", "timestamp")  # finds nothing
  # Bytes that are not UTF-8 in a column the reader does not use are still an error, with their line.
  path.write_bytes(b"user,item,timestamp,note\nu,a,1,fine\nu,b,2,\xff\xfe\n")
  assert _one_line_error(path) == f"{path}:3: not valid UTF-8 text (invalid start byte)"


def test_whitespace_only_id_found_after_reading(tmp_path, monkeypatch):
  # A whitespace-only id is found once the distinct ids are stripped, after the whole file was read.
  monkeypatch.setattr(data_io, "_CSV_BLOCK_BYTES", 1 << 16)
  rows = [(f"u{n}", "a", str(n)) for n in range(20_000)]
  rows[15_000] = ("   ", "a", "1")
  path = write_csv(tmp_path / "log.csv", rows)
  assert _one_line_error(path) == f"{path}:15002: empty user id"


def test_guess_format_lists_parquet(tmp_path):
  path = tmp_path / "log.json"
  path.write_text("{}")
  message = _one_line_error(path, call=data_io.load_dataset)
  assert "expected .txt, .csv or .tsv, optionally .gz, or .parquet" in message
