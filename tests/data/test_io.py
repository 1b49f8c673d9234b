"""Tests for recgpt_jax.data.io: text format, interaction logs, id maps and the bundled datasets."""

from __future__ import annotations

import gzip
import hashlib
import json
import pathlib
import time

import numpy as np
import pytest

from recgpt_jax.data import io as data_io
from recgpt_jax.errors import ConfigError, DataError

# name -> (users, max item id, interactions, sha256 of the uncompressed file)
BUNDLED_STATS = {
  "Beauty": (22363, 12101, 198502, "226cce9c3105299ca0db9615d7d3fb32b3175e90da43100ae352599f0f0107b8"),
  "Sports_and_Outdoors": (
    35598,
    18357,
    296337,
    "2a095e0648872beb9982408958290f5d655db5be2911c3756b5446de9f0b8de2",
  ),
  "Toys_and_Games": (
    19412,
    11924,
    167597,
    "176c680c688d497598c4a89a03b402c0fe78d795e5db335c2e78dd5f2d778a3f",
  ),
  "Yelp": (30431, 20033, 316354, "724b219106b81dd2349027da997334ddb6da9fe2f152ad6e0d97a93170f7caed"),
}


def _write(path: pathlib.Path, content: str | bytes) -> pathlib.Path:
  """Writes ``content`` (gzipped if the name ends in .gz) and returns the path."""
  raw = content.encode() if isinstance(content, str) else content
  path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
  return path


def _assert_sequences(data: data_io.SequenceData, expected: list[list[int]]) -> None:
  """Checks the sequences exactly, including dtype."""
  assert len(data.sequences) == len(expected)
  for got, want in zip(data.sequences, expected, strict=True):
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.array(want, dtype=np.int32))


# --- Bundled datasets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUNDLED_STATS))
def test_bundled_stats(name):
  users, max_item, interactions, _ = BUNDLED_STATS[name]
  data = data_io.load_dataset(name)
  assert len(data.users) == users
  assert data.num_users == users
  assert data.num_items == max_item
  assert data.num_interactions == interactions
  assert data.source == name
  assert data.users.dtype == np.int32
  assert data.user_map is None and data.item_map is None
  assert min(int(s.min()) for s in data.sequences) >= 1


def test_bundled_beauty_first_lines():
  data = data_io.load_dataset("beauty")
  np.testing.assert_array_equal(data.users[:3], [1, 2, 3])
  expected = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 4, 11], [4, 12, 13, 14, 15, 16, 17, 18, 19]]
  for got, want in zip(data.sequences[:3], expected, strict=True):
    np.testing.assert_array_equal(got, want)


def test_bundled_sha256():
  for name, (*_, sha) in BUNDLED_STATS.items():
    raw = gzip.decompress(data_io.bundled_path(name).read_bytes())
    assert hashlib.sha256(raw).hexdigest() == sha, name


def test_beauty_loads_fast():
  # Best of two runs so one slow run on a busy machine does not fail the test.
  best = float("inf")
  for _ in range(2):
    start = time.perf_counter()
    data_io.load_dataset("Beauty")
    best = min(best, time.perf_counter() - start)
  assert best < 1.0


def test_fast_and_careful_parsers_agree_on_beauty():
  raw = gzip.decompress(data_io.bundled_path("Beauty").read_bytes())
  fast_users, fast_seqs = data_io._parse_text_fast(raw)
  slow_users, slow_seqs = data_io._parse_text_careful(raw, "Beauty")
  np.testing.assert_array_equal(fast_users, slow_users)
  assert len(fast_seqs) == len(slow_seqs)
  assert all(np.array_equal(a, b) for a, b in zip(fast_seqs, slow_seqs, strict=True))


# --- Names and aliases --------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "alias, canonical",
  [
    ("Beauty", "Beauty"),
    ("beauty", "Beauty"),
    ("BEAUTY", "Beauty"),
    ("sports", "Sports_and_Outdoors"),
    ("Sports_and_Outdoors", "Sports_and_Outdoors"),
    ("sports_and_outdoors", "Sports_and_Outdoors"),
    ("toys", "Toys_and_Games"),
    ("Toys_And_Games", "Toys_and_Games"),
    ("toys_and_games", "Toys_and_Games"),
    ("yelp", "Yelp"),
    ("YELP", "Yelp"),
  ],
)
def test_alias_resolution(alias, canonical):
  path = data_io.bundled_path(alias)
  assert path.name == data_io.BUNDLED[canonical]
  assert path.is_file()


def test_unknown_dataset_name():
  expected = (
    "unknown dataset 'foo'; bundled datasets: Beauty, Sports_and_Outdoors, Toys_and_Games, Yelp "
    "(or pass a path to a file)"
  )
  with pytest.raises(DataError) as e:
    data_io.bundled_path("foo")
  assert str(e.value) == expected
  with pytest.raises(DataError) as e:
    data_io.load_dataset("foo")
  assert str(e.value) == expected


# --- Text format ---------------------------------------------------------------------------------------

SEQUENCES = {3: [5, 1, 2], 1: [7], 10: [2, 2, 9, 4]}


@pytest.mark.parametrize("file_name", ["seqs.txt", "seqs.txt.gz"])
def test_text_round_trip(tmp_path, file_name):
  text = "".join(f"{u} {' '.join(map(str, items))}\n" for u, items in SEQUENCES.items())
  path = _write(tmp_path / file_name, text)
  data = data_io.read_sequences(path)
  assert data.users.dtype == np.int32
  np.testing.assert_array_equal(data.users, [3, 1, 10])
  _assert_sequences(data, list(SEQUENCES.values()))
  assert data.num_items == 9
  assert data.num_users == 10
  assert data.num_interactions == 8
  assert data.source == str(path)
  via_load = data_io.load_dataset(str(path))
  np.testing.assert_array_equal(via_load.users, data.users)
  _assert_sequences(via_load, list(SEQUENCES.values()))


def test_text_whitespace_variants(tmp_path):
  # Tabs, CRLF line ends, blank lines, trailing spaces, no final newline, and a '+' sign (which takes
  # the line-by-line path) all parse to the same data.
  path = _write(tmp_path / "odd.txt", "\r\n3\t5 1  2 \r\n\n   \n1 +7\r\n10 2 2 9 4")
  data = data_io.read_sequences(path)
  np.testing.assert_array_equal(data.users, [3, 1, 10])
  _assert_sequences(data, list(SEQUENCES.values()))


@pytest.mark.parametrize(
  "content, lineno, fragment",
  [
    ("1 2 3\n\n2 4 x5\n", 3, "'x5' is not an integer"),
    ("1 2 3\n2 4 1.5\n", 2, "'1.5' is not an integer"),
    ("1 2 3\n2 0 4\n", 2, "item id 0 must be >= 1"),
    ("1 2 3\n2 -4\n", 2, "item id -4 must be >= 1"),
    ("0 2 3\n", 1, "user id 0 must be >= 1"),
    ("1 2\n\n\n2\n", 4, "user 2 has no items"),
    ("1 2\n2 3\n1 4\n", 3, "duplicate user id 1 (first seen on line 1)"),
    ("1 2\n2 99999999999\n", 2, "item id 99999999999 is too large"),
    (b"1 2\n2 \xffab\n", 2, "is not an integer"),
  ],
)
def test_text_errors(tmp_path, content, lineno, fragment):
  path = _write(tmp_path / "bad.txt", content)
  with pytest.raises(DataError) as e:
    data_io.read_sequences(path)
  message = str(e.value)
  assert message.startswith(f"{path}:{lineno}: "), message
  assert fragment in message
  assert "\n" not in message


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_text_empty_file(tmp_path, content):
  path = _write(tmp_path / "empty.txt", content)
  with pytest.raises(DataError, match="no users") as e:
    data_io.read_sequences(path)
  assert str(path) in str(e.value)


def test_missing_file(tmp_path):
  path = tmp_path / "nope.txt"
  with pytest.raises(DataError) as e:
    data_io.read_sequences(path)
  assert str(e.value) == f"{path}: no such file"
  with pytest.raises(DataError) as e:
    data_io.load_dataset(str(path))
  assert str(e.value) == f"{path}: no such file"


@pytest.mark.parametrize(
  "raw",
  [b"\x1f\x8bnot really gzip", gzip.compress(b"1 2 3\n" * 100)[:-12], b"plain text, not gzip\n"],
  ids=["garbage", "truncated", "not-gzip"],
)
def test_unreadable_gzip(tmp_path, raw):
  path = tmp_path / "bad.txt.gz"
  path.write_bytes(raw)
  with pytest.raises(DataError) as e:
    data_io.read_sequences(path)
  assert str(e.value).startswith(f"{path}: ")
  assert "\n" not in str(e.value)


# --- Interaction logs -----------------------------------------------------------------------------------

CSV_LOG = """user,item,timestamp
u2,b,5
u1,a,3
u2,a,1
u10,c,2
u1,b,3
u2,c,5
"""


def test_csv_log(tmp_path):
  data = data_io.read_interactions(_write(tmp_path / "log.csv", CSV_LOG))
  # Users by sorted raw id (text order, since the ids are not integers): u1, u10, u2.
  assert data.user_map == {"u1": 1, "u10": 2, "u2": 3}
  # Items by first appearance in time: a (t=1), c (t=2), b (t=3).
  assert data.item_map == {"a": 1, "c": 2, "b": 3}
  np.testing.assert_array_equal(data.users, [1, 2, 3])
  assert data.users.dtype == np.int32
  # u1: a@3, b@3 (tie: file order); u10: c; u2: a@1, b@5, c@5 (tie: file order).
  _assert_sequences(data, [[1, 3], [2], [1, 3, 2]])
  assert (data.num_users, data.num_items, data.num_interactions) == (3, 3, 6)


TSV_LOG = "rating\tuid\tts\tiid\n5\t10\t100\tx\n4\t9\t50\tx\n3\t10\t20\ty\n1\t2\t70\tz\n2\t9\t50\ty\n"


def test_tsv_log_sniffed_with_custom_columns(tmp_path):
  path = _write(tmp_path / "log.tsv", TSV_LOG)
  data = data_io.read_interactions(path, user_col="uid", item_col="iid", time_col="ts")
  # Integer raw user ids sort numerically: 2 < 9 < 10.
  assert data.user_map == {"2": 1, "9": 2, "10": 3}
  # Time order: y@20, x@50, y@50, z@70, x@100 -> y, x, z.
  assert data.item_map == {"y": 1, "x": 2, "z": 3}
  # 2: z; 9: x@50, y@50 (tie: file order); 10: y@20, x@100.
  _assert_sequences(data, [[3], [2, 1], [1, 2]])


def test_log_via_load_dataset_gzipped(tmp_path):
  path = _write(tmp_path / "log.tsv.gz", TSV_LOG)
  data = data_io.load_dataset(str(path), user_col="uid", item_col="iid", time_col="ts")
  _assert_sequences(data, [[3], [2, 1], [1, 2]])
  assert data.source == str(path)


def test_log_explicit_sep_and_no_time_column(tmp_path):
  path = _write(tmp_path / "log.dat", "u;i\nb;x\na;y\nb;y\nb;x\n")
  data = data_io.load_dataset(str(path), format="interactions", user_col="u", item_col="i", time_col=None, sep=";")
  assert data.user_map == {"a": 1, "b": 2}
  assert data.item_map == {"x": 1, "y": 2}
  # File order within each user; the repeated (b, x) pair is kept.
  _assert_sequences(data, [[2], [1, 2, 1]])


K_CORE_LOG = """user,item,timestamp
A,i3,1
D,i1,2
C,i4,3
B,i2,4
A,i2,5
C,i3,6
B,i1,7
A,i1,8
"""


def test_k_core(tmp_path):
  path = _write(tmp_path / "log.csv", K_CORE_LOG)
  # Round 1 drops user D (1 interaction) and item i4 (1); round 2 then drops user C (only i3 left);
  # round 3 drops item i3 (only A left). A and B keep i2, i1.
  data = data_io.read_interactions(path, k_core=2)
  assert data.user_map == {"A": 1, "B": 2}
  # Dense item ids are assigned after filtering: i2 (t=4) precedes i1 (t=7, its t=2 row was D's).
  assert data.item_map == {"i2": 1, "i1": 2}
  _assert_sequences(data, [[1, 2], [1, 2]])

  unfiltered = data_io.read_interactions(path)
  assert unfiltered.user_map == {"A": 1, "B": 2, "C": 3, "D": 4}
  assert unfiltered.item_map == {"i3": 1, "i1": 2, "i4": 3, "i2": 4}
  _assert_sequences(unfiltered, [[1, 4, 2], [4, 2], [3, 1], [2]])
  # k = 1 keeps everything.
  _assert_sequences(data_io.read_interactions(path, k_core=1), [[1, 4, 2], [4, 2], [3, 1], [2]])


def test_k_core_counts_repeats_and_can_empty_the_data(tmp_path):
  path = _write(tmp_path / "log.csv", "user,item,timestamp\nu,a,1\nu,a,2\nv,b,3\n")
  data = data_io.read_interactions(path, k_core=2)
  assert data.user_map == {"u": 1} and data.item_map == {"a": 1}
  _assert_sequences(data, [[1, 1]])
  with pytest.raises(DataError, match="no interactions left after 3-core filtering"):
    data_io.read_interactions(path, k_core=3)


def test_log_missing_column(tmp_path):
  path = _write(tmp_path / "log.csv", "user,product,time\nu,a,1\n")
  with pytest.raises(DataError) as e:
    data_io.read_interactions(path)
  message = str(e.value)
  assert message.startswith(f"{path}:1: ")
  assert "'item'" in message and "'user', 'product', 'time'" in message


@pytest.mark.parametrize(
  "content, lineno, fragment",
  [
    ("user,item,timestamp\nu,a,1\nu,b,yesterday\n", 3, "timestamp 'yesterday' is not a finite number"),
    ("user,item,timestamp\nu,a,1\n\nu,b,nan\n", 4, "timestamp 'nan' is not a finite number"),
    ("user,item,timestamp\nu,a,1\nu,b\n", 3, "expected 3 fields, got 2"),
    ("user,item,timestamp\nu,a,1,9\n", 2, "expected 3 fields, got 4"),
    ("user,item,timestamp\n,a,1\n", 2, "empty user id"),
    ("user,item,timestamp\nu, ,1\n", 2, "empty item id"),
  ],
)
def test_log_row_errors(tmp_path, content, lineno, fragment):
  path = _write(tmp_path / "log.csv", content)
  with pytest.raises(DataError) as e:
    data_io.read_interactions(path)
  message = str(e.value)
  assert message.startswith(f"{path}:{lineno}: "), message
  assert fragment in message
  assert "\n" not in message


@pytest.mark.parametrize("content, fragment", [("", "no header"), ("user,item,timestamp\n", "no interactions")])
def test_log_without_rows(tmp_path, content, fragment):
  path = _write(tmp_path / "log.csv", content)
  with pytest.raises(DataError, match=fragment):
    data_io.read_interactions(path)


# --- Id maps and format selection ----------------------------------------------------------------------


def test_id_maps_round_trip(tmp_path):
  data = data_io.read_interactions(_write(tmp_path / "log.csv", CSV_LOG))
  out = tmp_path / "run" / "maps"
  data.save_id_maps(out)
  assert sorted(p.name for p in out.iterdir()) == ["item_map.json", "user_map.json"]  # no temp files left
  user_map, item_map = data_io.load_id_maps(out)
  assert user_map == data.user_map
  assert item_map == data.item_map
  # Overwriting an existing map works too.
  data.save_id_maps(out)
  assert data_io.load_id_maps(out) == (data.user_map, data.item_map)


def test_save_id_maps_without_maps_is_a_no_op(tmp_path):
  data = data_io.read_sequences(_write(tmp_path / "seqs.txt", "1 2 3\n"))
  data.save_id_maps(tmp_path / "maps")
  assert not (tmp_path / "maps").exists()


def test_load_id_maps_errors(tmp_path):
  with pytest.raises(DataError, match="no such file"):
    data_io.load_id_maps(tmp_path)
  (tmp_path / "user_map.json").write_text('{"u": 1}')
  (tmp_path / "item_map.json").write_text('{"a": "one"}')
  with pytest.raises(DataError, match="expected an integer"):
    data_io.load_id_maps(tmp_path)
  (tmp_path / "item_map.json").write_text("{not json")
  with pytest.raises(DataError, match=r"item_map.json:1: invalid JSON"):
    data_io.load_id_maps(tmp_path)


def test_load_dataset_format_selection(tmp_path):
  text_path = _write(tmp_path / "seqs.dat", "1 2 3\n")
  _assert_sequences(data_io.load_dataset(str(text_path), format="text"), [[2, 3]])
  with pytest.raises(DataError, match="cannot tell the format") as e:
    data_io.load_dataset(str(text_path))
  assert "--config.data_format=text" in str(e.value) and "format='text'" not in str(e.value)  # names the flag
  with pytest.raises(ConfigError, match="unknown data format"):
    data_io.load_dataset(str(text_path), format="parquet")
  with pytest.raises(ConfigError, match="only apply to interaction logs"):
    data_io.load_dataset(str(text_path), format="text", k_core=5)
  with pytest.raises(ConfigError):
    data_io.load_dataset("beauty", k_core=5)


def test_sequence_data_saved_maps_are_json(tmp_path):
  data = data_io.read_interactions(_write(tmp_path / "log.csv", CSV_LOG))
  data.save_id_maps(tmp_path)
  assert json.loads((tmp_path / "user_map.json").read_text()) == {"u1": 1, "u10": 2, "u2": 3}
