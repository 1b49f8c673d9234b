"""Malformed inputs, generated: data files, flags and recommendation requests.

Every case must end as the command line promises (README, "Bad input"): exit code 2, exactly one line on stderr that
starts with ``error: `` and names the problem (a distinctive substring is asserted), no traceback anywhere, and
nothing written: a fresh ``--workdir`` is never created, and a finished workdir stays byte-identical (every file
hashed before and after).

Command lines run in the shared worker process (``cli_worker``, tests/cli_worker.py: the real flag parsing and
``main``, fd-level capture of stdout/stderr) rather than one interpreter each; the Python API is called in-process.
One small finished workdir is trained once for the module: an interaction log whose raw ids differ from the dense
ids (users ``u<n>``, items the numbers ``1000 + i``).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import pathlib

import numpy as np
import pytest

from recgpt_jax import recommend
from recgpt_jax.errors import UserError
from recgpt_jax.train import loop
from tests.helpers import tiny_config, write_cyclic_log

OVERRIDES = {"train.num_epochs": 1, "recall.quotas": (4, 2), "eval.metric": "NDCG@5"}


@dataclasses.dataclass(frozen=True)
class Finished:
  base: pathlib.Path
  log: pathlib.Path  # the interaction log the run trained on
  workdir: pathlib.Path
  config_file: pathlib.Path  # --config= file giving the run's config (any dataset can be set with --config.dataset)
  config: object


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Finished:
  base = tmp_path_factory.mktemp("fuzz")
  log = write_cyclic_log(base, "u")
  config = tiny_config(log, **OVERRIDES)
  loop.train_and_evaluate(config, str(base / "run"))
  config_file = base / "fuzz_config.py"
  config_file.write_text(
    "import pathlib\n\nfrom tests.helpers import tiny_config\n\n\ndef get_config():\n"
    f"  return tiny_config(pathlib.Path({str(log)!r}), **{OVERRIDES!r})\n"
  )
  return Finished(base, log, base / "run", config_file, config)


def snapshot(directory: pathlib.Path) -> dict[str, str]:
  return {
    str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(directory.rglob("*"))
    if p.is_file()
  }


def assert_one_line_error(proc, *fragments) -> None:
  output = proc.stdout + proc.stderr
  assert proc.returncode == 2, output
  assert "Traceback" not in output, output
  lines = proc.stderr.splitlines()
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith("error: "), lines[0]
  for f in fragments:
    assert f in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------------------------
# Malformed data files: a fresh run on each; the workdir must not be created.

TEXT_OK = "1 11 12 13 14 15\n2 12 13 14 15 16\n"  # two usable users (items 11..16)


def _bad_token_cases():
  """The token in the second user's third item, and what the message must say about it."""
  tokens = {
    "x": ["'x' is not an integer"],
    "1.5": ["'1.5' is not an integer"],
    "1e3": ["'1e3' is not an integer"],
    "0x1f": ["'0x1f' is not an integer"],
    "-3": ["item id -3 must be >= 1"],
    "0": ["item id 0 must be >= 1"],
    "-0": ["item id 0 must be >= 1"],
    "99999999999": ["item id 99999999999 is too large"],
    "99999999999999999999999": ["is too large"],
    "\u0663": ["is not an integer"],  # an Arabic-Indic digit: int() would take it
    "12,13": ["'12,13' is not an integer"],
    "NaN": ["'NaN' is not an integer"],
  }
  for token, fragments in tokens.items():
    content = f"1 11 12 13 14\n2 12 13 {token} 15 16\n".encode()
    yield pytest.param("bad.txt", content, ["bad.txt:2:", *fragments], id=f"text-item-{token.encode().hex()}")


def _random_garbage(seed: int, size: int = 600) -> bytes:
  return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


DATA_CASES = [
  *_bad_token_cases(),
  pytest.param("empty.txt", b"", ["empty.txt", "no users"], id="text-empty"),
  pytest.param("blank.txt", b"\n \n\t\r\n", ["blank.txt", "no users"], id="text-blank-lines"),
  pytest.param("u.txt", b"u1 11 12 13 14\n", ["u.txt:1:", "user id 'u1' is not an integer"], id="text-user-not-int"),
  pytest.param("neg.txt", b"-1 11 12 13 14\n", ["neg.txt:1:", "user id -1 must be >= 1"], id="text-user-negative"),
  pytest.param("lone.txt", TEXT_OK.encode() + b"3\n", ["lone.txt:3:", "user 3 has no items"], id="text-user-no-items"),
  pytest.param(
    "dup.txt", b"1 11 12 13 14\n1 15 16 17 18\n", ["dup.txt:2:", "duplicate user id 1"], id="text-duplicate-user"
  ),
  pytest.param(
    "short.txt", b"1 11\n2 12 13\n3 14 15 16\n", ["short.txt", "no user has the 4 items"], id="text-users-one-item"
  ),
  pytest.param(
    "crlf.txt", b"1 11 12 13 14\r\n2 12 13 14 15\r\n3 4 x 6\r\n", ["crlf.txt:3:", "'x'"], id="text-crlf-bad-line"
  ),
  pytest.param("few.txt", b"1 1 2 3 4 5\n2 2 3 4 5 1\n", ["the data has 5 items", "K = sum"], id="text-too-few-items"),
  pytest.param("zip.txt.gz", b"\x1f\x8bnot really gzip", ["zip.txt.gz", "cannot decompress"], id="text-bad-gzip"),
  pytest.param("trunc.txt.gz", gzip.compress(TEXT_OK.encode())[:-9], ["trunc.txt.gz", "gzip"], id="text-cut-gzip"),
  pytest.param("gzerr.txt.gz", gzip.compress(b"1 11 x\n"), ["gzerr.txt.gz:1:", "'x'"], id="text-gzip-bad-line"),
  *[pytest.param(f"garbage{s}.txt", _random_garbage(s), [f"garbage{s}.txt"], id=f"text-garbage-{s}") for s in range(4)],
  pytest.param("head.csv", b"user,item,timestamp\n", ["head.csv", "no interactions"], id="csv-header-only"),
  pytest.param("empty.csv", b"", ["empty.csv", "no header row"], id="csv-empty"),
  *[
    pytest.param(
      f"cols{n}.csv",
      ("user,item,timestamp\nu1,i1,1\n" + ",".join(["u1", *["x"] * (n - 1)]) + "\n").encode(),
      [f"cols{n}.csv:3:", f"expected 3 fields, got {n}"],
      id=f"csv-{n}-columns",
    )
    for n in (1, 2, 4, 7)
  ],
  pytest.param(
    "nouser.csv", b"u,item,timestamp\nu1,i1,1\n", ["nouser.csv:1:", "no user column 'user'"], id="csv-no-col"
  ),
  pytest.param("time.csv", b"user,item,timestamp\nu1,i1,abc\n", ["time.csv:2:", "'abc'"], id="csv-time-not-number"),
  pytest.param("inf.csv", b"user,item,timestamp\nu1,i1,inf\n", ["inf.csv:2:", "'inf'"], id="csv-time-inf"),
  pytest.param(
    "twice.csv",
    b"user,item,timestamp\nuser,item,timestamp\nu1,i1,1\n",
    ["twice.csv:2:", "timestamp 'timestamp' is not a finite number"],
    id="csv-duplicate-header",
  ),
  pytest.param("eu.csv", b"user,item,timestamp\n,i1,1\n", ["eu.csv:2:", "empty user id"], id="csv-empty-user"),
  pytest.param("ei.csv", b"user,item,timestamp\nu1, ,1\n", ["ei.csv:2:", "empty item id"], id="csv-empty-item"),
  pytest.param(
    "crlf.csv",
    b"user,item,timestamp\r\nu1,i1,1\r\nu1,i2\r\n",
    ["crlf.csv:3:", "expected 3 fields, got 2"],
    id="csv-crlf-bad-line",
  ),
  pytest.param(
    "utf.csv", b"user,item,timestamp\nu1,\xff\xfe,1\n", ["utf.csv:2:", "not valid UTF-8"], id="csv-not-utf8"
  ),
  pytest.param("quote.csv", b'user,item,timestamp\nu1,"i1,1\n', ["quote.csv"], id="csv-unclosed-quote"),
  pytest.param(
    "few.csv",
    b"user,item,timestamp\n" + b"".join(f"u1,i{t % 3},{t}\n".encode() for t in range(6)),
    ["the data has 3 items", "K = sum"],
    id="csv-too-few-items",
  ),
  *[pytest.param(f"garbage{s}.csv", _random_garbage(s), [f"garbage{s}.csv"], id=f"csv-garbage-{s}") for s in range(2)],
  pytest.param("data.json", b"{}", ["data.json", "--config.data_format=text"], id="unknown-suffix"),
  pytest.param("cut.parquet", b"PAR1\x00\x01", ["cut.parquet", "not a readable Parquet file"], id="parquet-truncated"),
]


@pytest.mark.parametrize(("name", "content", "fragments"), DATA_CASES)
def test_malformed_data_file(finished, cli_worker, tmp_path, name, content, fragments):
  path = tmp_path / name
  path.write_bytes(content)
  proc = cli_worker(f"--config={finished.config_file}", f"--workdir={tmp_path / 'run'}", f"--config.dataset={path}")
  assert_one_line_error(proc, *fragments)
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
  ("dataset", "extra", "fragments"),
  [
    ("{tmp}/no_such.txt", [], ["no_such.txt: no such file"]),
    ("{tmp}", [], ["is a directory"]),
    ("NoSuchSet", [], ["unknown dataset 'NoSuchSet'"]),
    ("{log}", ["--config.k_core=100"], ["no interactions left after 100-core filtering"]),
    ("{log}", ["--config.data_format=text"], ["'user,item,timestamp' is not an integer"]),
    ("{log}", ["--config.data_format=parquet"], ["data_format must be one of", "'parquet'"]),
    ("Beauty", ["--config.k_core=5"], ["bundled dataset Beauty", "interaction options do not apply"]),
  ],
)
def test_unusable_dataset_setting(finished, cli_worker, tmp_path, dataset, extra, fragments):
  dataset = dataset.format(tmp=tmp_path, log=finished.log)
  workdir = tmp_path / "run"
  proc = cli_worker(f"--config={finished.config_file}", f"--workdir={workdir}", f"--config.dataset={dataset}", *extra)
  assert_one_line_error(proc, *fragments)
  assert not workdir.exists()


# ---------------------------------------------------------------------------------------------------------------
# Bad flags and config values: a fresh run each; the workdir must not be created.


def _flag_ids(value) -> str | None:
  """Test ids: the flags of a case (None for its fragments: pytest numbers them)."""
  return " ".join(value) if value and value[0].startswith("-") else None


FLAG_CASES = [
  (["--mode=serve"], ["--mode=serve", "pretrain|finetune"]),
  (["--mode="], ["--mode"]),
  (["--allocator=jemalloc"], ["--allocator=jemalloc"]),
  (["--distributed=yes"], ["--distributed=yes"]),
  (["--num_processes=two"], ["--num_processes=two"]),
  (["--no_such_flag=1"], ["no_such_flag"]),
  (["stray"], ["unexpected arguments: stray"]),
  (["--config.no_such_field=1"], ["no_such_field"]),
  (["--config.model.hiden=32"], ["hiden"]),
  (["--config.model.hidden=abc"], ["--config.model.hidden=abc"]),
  (["--config.model.hidden=1e3"], ["--config.model.hidden=1e3"]),
  (["--config.model.hidden=-16"], ["model.hidden must be >= 1, got -16"]),
  (["--config.model.num_heads=0"], ["model.num_heads must be >= 1, got 0"]),
  (["--config.model.num_heads=3"], ["divisible by model.num_heads (3)"]),
  (["--config.model.attention=linear"], ["model.attention", "'linear'"]),
  (["--config.model.norm=mid"], ["model.norm", "'mid'"]),
  (["--config.model.dtype=int8"], ["model.dtype", "int8"]),
  (["--config.model.hidden_dropout=1.0"], ["model.hidden_dropout must be in [0, 1), got 1.0"]),
  (["--config.model.attn_dropout=-0.1"], ["model.attn_dropout must be in [0, 1), got -0.1"]),
  (["--config.model.vocab_multiple=0"], ["model.vocab_multiple must be >= 1, got 0"]),
  (["--config.max_len=0"], ["max_len must be >= 1, got 0"]),
  (["--config.seed=-1"], ["seed must be >= 0, got -1"]),
  (["--config.k_core=-2"], ["k_core must be >= 0 (0 = off), got -2"]),
  (["--config.train.row_len=4"], ["train.row_len (4) must be >= max_len (12)"]),
  (["--config.train.rows_per_batch=0"], ["train.rows_per_batch must be >= 1, got 0"]),
  (["--config.train.rows_per_batch=abc"], ["--config.train.rows_per_batch=abc"]),
  (["--config.train.num_epochs=-1"], ["train.num_epochs must be >= 1, got -1"]),
  (["--config.train.max_steps=-5"], ["train.max_steps must be >= 0 (0 = no limit), got -5"]),
  (["--config.train.log_every_steps=0"], ["train.log_every_steps must be >= 1, got 0"]),
  (["--config.train.keep_checkpoints=0"], ["train.keep_checkpoints must be >= 1, got 0"]),
  (["--config.train.checkpoint_every_steps=0"], ["train.checkpoint_every_steps must be >= 1, got 0"]),
  (["--config.train.patience=-1"], ["train.patience must be >= 0"]),
  (["--config.train.loss=hinge"], ["train.loss", "'hinge'"]),
  (["--config.train.num_negatives=0"], ["train.num_negatives must be >= 1, got 0"]),
  (["--config.train.negatives=hard"], ["train.negatives must be one of", "'hard'"]),
  (["--config.train.ce_block=-1"], ["train.ce_block must be >= 0"]),
  (["--config.eval.approx_recall=1.5"], ["eval.approx_recall must be in [0, 1)"]),
  (["--config.train.head=untied"], ["train.head='untied' needs model.untied_head=True"]),
  (["--config.train.user_l2=-1"], ["train.user_l2 must be >= 0"]),
  (["--config.train.cl_weight=-0.1"], ["train.cl_weight must be >= 0"]),
  (["--config.train.cl_temperature=0"], ["train.cl_temperature must be > 0"]),
  (["--config.optimizer.learning_rate=0"], ["optimizer.learning_rate must be > 0"]),
  (["--config.optimizer.schedule=exponential"], ["optimizer.schedule must be one of", "'exponential'"]),
  (["--config.optimizer.warmup_steps=-1"], ["optimizer.warmup_steps must be >= 0, got -1"]),
  (["--config.optimizer.b2=1.0"], ["optimizer.b2 must be in [0, 1), got 1.0"]),
  (["--config.optimizer.eps=0"], ["optimizer.eps must be > 0"]),
  (["--config.optimizer.clip_norm=-1"], ["optimizer.clip_norm must be >= 0"]),
  (["--config.eval.users_per_batch=0"], ["eval batch sizes must be >= 1"]),
  (["--config.eval.metric=HR@50"], ["eval.metric", "'HR@50'"]),
  (["--config.eval.head=both"], ["eval.head", "'both'"]),
  (["--config.recall.quotas=(0,)"], ["recall.quotas must be positive ints"]),
  (["--config.recall.quotas=(3,-1)"], ["recall.quotas must be positive ints"]),
  (["--config.recall.quotas=abc"], ["recall.quotas must be positive ints"]),
  (["--config.recall.quotas=(2,)"], ["recall.quotas must recall at least 5 items, got K=2"]),
  (["--config.recall.quotas=(40,)", "--config.eval.metric=NDCG@10"], ["the data has 30 items", "K = sum"]),
  (["--config.prompt.width=0"], ["prompt.width must be >= 1, got 0"]),
  (["--config.prompt.mode=random"], ["prompt.mode", "'random'"]),
  (["--config.prompt.source=oracle"], ["prompt.source", "'oracle'"]),
  (["--config.prompt.temperature=0"], ["prompt.temperature must be > 0"]),
  (["--config.mesh.data=0"], ["mesh.data must be -1 or >= 1, got 0"]),
  (["--config.mesh.data=-1", "--config.mesh.model=-1"], ["at most one of mesh.data and mesh.model may be -1"]),
  (["--config.mesh.model=3"], ["model.vocab_multiple (8) must be a multiple of the model axis size (3)"]),
  (["--config.mesh.data=3"], ["must be divisible by the mesh's data axis"]),
  (["--mode=finetune"], ["--mode=finetune", "init_from"]),
]


@pytest.mark.parametrize(("args", "fragments"), FLAG_CASES, ids=_flag_ids)
def test_bad_flag_or_config_value(finished, cli_worker, tmp_path, args, fragments):
  args = [a.format(tmp=tmp_path) for a in args]
  proc = cli_worker(f"--config={finished.config_file}", f"--workdir={tmp_path / 'run'}", *args)
  assert_one_line_error(proc, *fragments)
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
  ("args", "fragments"),
  [
    ([], ["--config"]),  # neither --config nor --workdir
    (["--config={cfg}"], ["--workdir"]),
    (["--config={tmp}/no_config.py", "--workdir={tmp}/run"], ["no_config.py"]),
    (["--config={tmp}", "--workdir={tmp}/run"], ["--config"]),  # a directory
    (["--config={tmp}/syntax.py", "--workdir={tmp}/run"], ["syntax.py"]),
    (["--config={tmp}/no_get_config.py", "--workdir={tmp}/run"], ["get_config"]),
  ],
)
def test_bad_config_file(finished, cli_worker, tmp_path, args, fragments):
  (tmp_path / "syntax.py").write_text("def get_config(:\n")
  (tmp_path / "no_get_config.py").write_text("x = 1\n")
  args = [a.format(tmp=tmp_path, cfg=finished.config_file) for a in args]
  assert_one_line_error(cli_worker(*args), *fragments)
  assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------------
# Bad requests against the finished workdir: the command line, then the Python API. The workdir stays byte-identical.

RECOMMEND_CASES = [
  ([], ["needs --users, --history or --export"]),
  (["--users="], ["needs --users, --history or --export"]),
  (["--users=nobody"], ["unknown user id 'nobody'"]),
  (["--users=u1,u999"], ["unknown user id 'u999'"]),
  (["--users=1"], ["unknown user id '1'"]),  # dense id 1 is user 'u1': raw ids only
  (["--history=5"], ["--history='5'", "unknown item id '5'"]),  # a dense id: raw ids only
  (["--history=1005,abc"], ["unknown item id 'abc'"]),
  (["--history=99999999999999999999"], ["unknown item id '99999999999999999999'"]),
  (["--history=1005;1006"], ["unknown item id '1005;1006'"]),
  (["--history=,"], ["--history=','", "no item ids"]),
  (["--history=1005", "--history="], ["--history=''", "no item ids"]),
  (["--export={tmp}"], ["is a directory"]),
  (["--export={tmp}/a_file/recs.csv"], ["a_file is not a directory"]),
  (["--export=/sys/recs.csv"], ["cannot export to /sys/recs.csv"]),
  (["--users=u1", "--config.model.hidden=32"], ["different model", "hidden: 16 != 32"]),
  (["--users=u1", "--config.max_len=20", "--config.train.row_len=20"], ["different max_len"]),
  (["--users=u1", "--config.recall.quotas=(31,)", "--config.eval.metric=NDCG@10"], ["the data has 30 items"]),
  (["--users=u1", "--config.train.log_every_steps=0"], ["train.log_every_steps must be >= 1"]),
]


@pytest.mark.parametrize(
  ("args", "fragments"), RECOMMEND_CASES, ids=lambda v: " ".join(v) if v and v[0][0] == "-" else None
)
def test_bad_recommend_request(finished, cli_worker, tmp_path, args, fragments):
  (tmp_path / "a_file").write_text("x")
  before = snapshot(finished.workdir)
  args = [a.format(tmp=tmp_path) for a in args]
  proc = cli_worker(f"--config={finished.config_file}", f"--workdir={finished.workdir}", "--mode=recommend", *args)
  assert_one_line_error(proc, *fragments)
  assert snapshot(finished.workdir) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # no export, no temporary file


@pytest.mark.parametrize(
  ("args", "fragments"),
  [
    (["--mode=evaluate", "--config.model.hidden=32"], ["hidden"]),
    (["--mode=evaluate", "--config.model.ffn=64"], ["ffn"]),
    (["--mode=pretrain", "--config.model.num_layers=2"], ["num_layers"]),
    (["--mode=pretrain", "--config.train.loss=hinge"], ["train.loss"]),
    (["--mode=pretrain", "--config.dataset={corrupt}"], ["log.csv"]),  # another dataset (and a bad row)
    (["--mode=evaluate", "--config.dataset={corrupt}"], ["log.csv"]),
  ],
)
def test_bad_command_on_a_finished_workdir(finished, cli_worker, tmp_path, args, fragments):
  corrupt = tmp_path / "log.csv"
  corrupt.write_text(finished.log.read_text() + "u1,1001\n")
  before = snapshot(finished.workdir)
  args = [a.format(corrupt=corrupt) for a in args]
  proc = cli_worker(f"--config={finished.config_file}", f"--workdir={finished.workdir}", *args)
  assert_one_line_error(proc, *fragments)
  assert snapshot(finished.workdir) == before


@pytest.fixture(scope="module")
def recommender(finished):
  before = snapshot(finished.workdir)
  rec = recommend.Recommender(finished.config, finished.workdir)
  yield rec
  assert snapshot(finished.workdir) == before


def test_valid_requests_of_every_id_type(recommender):
  """The control: raw ids as strings, ints or numpy integers, lists, tuples or arrays, give the same lists."""
  want = recommender.for_histories([["1005", "1006"]])
  for same in ([[1005, 1006]], [(np.int64(1005), "1006")], [np.array([1005, 1006])], np.array([[1005, 1006]])):
    np.testing.assert_array_equal(recommender.for_histories(same).items, want.items)
  np.testing.assert_array_equal(recommender.for_users(np.array(["u1"])).items, recommender.for_users(["u1"]).items)


API_CASES = [
  ("for_histories", [1005, 1006], "history 1 must be a list of item ids, got 1005"),
  ("for_histories", [[1005], 1006], "history 2 must be a list of item ids, got 1006"),
  ("for_histories", [[[1005]]], "history 1: item id [1005] must be a string or an integer"),
  ("for_histories", [[1005.0]], "history 1: item id 1005.0 must be a string or an integer"),
  ("for_histories", [[np.float64(1005)]], "must be a string or an integer"),
  ("for_histories", [[None]], "history 1: item id None must be a string or an integer"),
  ("for_histories", [[True]], "history 1: item id True must be a string or an integer"),
  ("for_histories", [[b"1005"]], "history 1: item id b'1005' must be a string or an integer"),
  ("for_histories", [["1005", "sku"]], "history 1: unknown item id 'sku'"),
  ("for_histories", [[5]], "history 1: unknown item id '5'"),
  ("for_histories", [[-1005]], "history 1: unknown item id '-1005'"),
  ("for_histories", [[10**30]], "history 1: unknown item id '1000000000000000000000000000000'"),
  ("for_histories", [[]], "history 1 is empty"),
  ("for_histories", [], "no users to recommend for"),
  ("for_histories", "1005,1006", "histories must be a list of item-id lists, got '1005,1006'"),
  ("for_histories", {"a": [1005]}, "histories must be a list of item-id lists"),
  ("for_histories", None, "histories must be a list of item-id lists, got None"),
  ("for_histories", [{1005, 1006}], "history 1 must be a list of item ids"),
  ("for_histories", [np.array([[1005]])], "history 1 must be a list of item ids"),
  ("for_users", ["u999"], "unknown user id 'u999'"),
  ("for_users", [None], "user id None must be a string or an integer"),
  ("for_users", [1.7], "user id 1.7 must be a string or an integer"),
  ("for_users", [1], "unknown user id '1'"),
  ("for_users", "u1", "users must be a list of ids, got 'u1'"),
  ("for_users", 7, "users must be a list of ids, got 7"),
  ("for_users", [], "no users to recommend for"),
]


@pytest.mark.parametrize(("method", "request_", "fragment"), API_CASES, ids=lambda v: repr(v)[:40])
def test_bad_api_request(recommender, method, request_, fragment):
  """As the command line would report it: a UserError (exit code 2) whose message is one line naming the value."""
  with pytest.raises(UserError) as e:
    getattr(recommender, method)(request_)
  assert isinstance(e.value, ValueError) and e.value.exit_code == 2
  line = f"error: {e.value}"
  assert len(line.splitlines()) == 1 and fragment in line, line


@pytest.mark.parametrize(
  ("item", "fragment"),
  [
    ("sku", "unknown item id 'sku'"),
    (1.5, "item id 1.5 must be a string or an integer"),
    (None, "item id None must be a string or an integer"),
  ],
)
def test_bad_item_id(recommender, item, fragment):
  with pytest.raises(UserError, match=fragment.replace(".", r"\.")):
    recommender.item_id(item)
