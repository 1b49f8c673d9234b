"""Stores at production size: build time and memory, input-pipeline throughput per process, and multi-process training.

For each size (interactions x items) a synthetic log (``recgpt_jax.data.synthetic``, Parquet) and its store
(``recgpt_jax.data.store``) are made once under ``--data_dir`` and kept for reruns. Measured:

* build: wall seconds and peak RSS of ``python -m recgpt_jax.data.store`` (ingestion + TFDS ArrayRecord write +
  index), from ``/usr/bin/time -v``;
* pipeline: with 1, 2 and 4 local processes reading the same store at once, each assembling only its rows of the
  global batch (``pipeline.TrainInput(process_index=i, process_count=P)``): the epoch plan's setup seconds,
  batches/s and the process's peak RSS;
* train (``--train_size``): ``--train_steps`` steps of ``recgpt_jax.main`` on the store with 2 processes joined by
  ``jax.distributed`` (sampled softmax, 1024 in-batch + popularity negatives with logQ correction: full CE over 10^6
  items costs tens of seconds a step on this CPU; ``eval.max_users`` sampled users), each process's peak
  RSS and its steps/s from ``metrics.jsonl``; the pipeline's batches/s is then compared with the steps/s the train
  step needs.

  python -m experiments.bench_store --sizes=1e6x1e5,1e7x1e6,1e8x1e6 --train_size=1e8x1e6

Each phase's result is kept in ``<data_dir>/bench_store.partial.json`` as it arrives (a rerun skips finished
measurements; ``--fresh`` redoes them). Writes experiments/results/bench_store.{json,md} with command, date, machine.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import resource
import shutil
import socket
import subprocess
import sys
import time

from absl import app, flags

from recgpt_jax import errors, provenance
from recgpt_jax.data import synthetic

_SIZES = flags.DEFINE_list("sizes", ["1e6x1e5", "1e7x1e6"], "Stores to measure: <interactions>x<items>.")
_PROCESSES = flags.DEFINE_list("processes", ["1", "2", "4"], "Process counts of the pipeline measurement.")
_TRAIN_SIZE = flags.DEFINE_string("train_size", "", "Size to train on with 2 processes ('' = none).")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 200, "Training steps of the train measurement.")
_BATCHES = flags.DEFINE_integer("batches", 100, "Batches each pipeline process assembles.")
_ROWS = flags.DEFINE_integer("rows", 32, "Global rows per batch (pipeline and train).")
_ROW_LEN = flags.DEFINE_integer("row_len", 64, "Row length.")
_MAX_LEN = flags.DEFINE_integer("max_len", 50, "Model window.")
_DATA_DIR = flags.DEFINE_string("data_dir", "/work/bench_store", "Where logs, stores and workdirs go.")
_FRESH = flags.DEFINE_bool("fresh", False, "Redo measurements already in the partial results.")
_OUT = flags.DEFINE_string("out", "experiments/results", "Where the results go.")
# Internal: one pipeline process.
_ONE_PIPELINE = flags.DEFINE_string("one_pipeline", "", "Internal: measure the pipeline on this store.")
_PROCESS_INDEX = flags.DEFINE_integer("process_index", 0, "Internal.")
_PROCESS_COUNT = flags.DEFINE_integer("process_count", 1, "Internal.")

GIB = 2**30


def _timed(cmd: list[str], log: pathlib.Path, env: dict | None = None) -> subprocess.Popen:
  """Starts ``cmd`` under ``/usr/bin/time -v`` with its output in ``log``."""
  f = open(log, "w")  # noqa: SIM115 (closed with the process)
  return subprocess.Popen(["/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.STDOUT, env=env)


def _time_v(log: pathlib.Path) -> dict:
  text = log.read_text()
  rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
  wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", text)
  cpu = [float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", text)]
  out = {"peak_rss_bytes": int(rss.group(1)) * 1024 if rss else None, "cpu_s": sum(cpu)}
  if wall:
    h, m, s = wall.groups()
    out["wall_s"] = int(h or 0) * 3600 + int(m) * 60 + float(s)
  return out


def _ensure_log(path: pathlib.Path, rows: int, items: int) -> None:
  if path.exists():
    return
  print(f"generating {path}", flush=True)
  subprocess.run(
    [sys.executable, "-m", "recgpt_jax.data.synthetic", f"--interactions={rows}", f"--items={items}", f"--out={path}"],
    check=True,
  )


def _build(log: pathlib.Path, out: pathlib.Path) -> dict:
  print(f"building {out}", flush=True)
  shutil.rmtree(out, ignore_errors=True)
  tlog = out.parent / f"{out.name}.build.log"
  proc = _timed([sys.executable, "-m", "recgpt_jax.data.store", f"--log={log}", f"--out={out}"], tlog)
  if proc.wait():
    raise RuntimeError(f"store build failed, see {tlog}")
  meta = json.loads((out / "store.json").read_text())
  disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
  return {
    **_time_v(tlog),
    **_phases(tlog),
    **{k: meta[k] for k in ("num_users", "num_items", "num_interactions")},
    "disk_bytes": disk,
  }


def _phases(build_log: pathlib.Path) -> dict:
  """Seconds of the build's phases from its progress lines: reading the log, then writing the records + index."""
  stamps = {}
  for line in build_log.read_text(errors="replace").splitlines():
    m = re.match(r"\[(\d\d):(\d\d):(\d\d)\] (reading|read|writing|built) ", line)
    if m:
      h, mi, se, what = m.groups()
      stamps.setdefault(what, int(h) * 3600 + int(mi) * 60 + int(se))
  if len(stamps) < 4:
    return {}
  day = 24 * 3600  # a phase that crosses midnight
  return {
    "ingest_s": (stamps["read"] - stamps["reading"]) % day,
    "write_s": (stamps["built"] - stamps["writing"]) % day,
  }


def _one_pipeline() -> None:
  """One process of the pipeline measurement: prints its JSON line."""
  from recgpt_jax.data import pipeline, store

  begin = time.perf_counter()
  ti = pipeline.TrainInput(
    store.open_store(_ONE_PIPELINE.value).record_source(),
    max_len=_MAX_LEN.value,
    row_len=_ROW_LEN.value,
    rows_per_batch=_ROWS.value,
    seed=0,
    process_index=_PROCESS_INDEX.value,
    process_count=_PROCESS_COUNT.value,
  )
  steps = ti.steps_per_epoch(0)
  it = ti.epoch_iterator(0)
  setup = time.perf_counter() - begin
  n = min(_BATCHES.value, steps)
  next(it)  # opens the shards
  begin = time.perf_counter()
  tokens = 0
  for _ in range(n - 1):
    tokens += int((next(it)["targets"] > 0).sum())
  elapsed = time.perf_counter() - begin
  print(
    json.dumps(
      {
        "process_index": _PROCESS_INDEX.value,
        "setup_s": setup,
        "steps_per_epoch": steps,
        "batches": n - 1,
        "batches_per_s": (n - 1) / elapsed,
        "local_tokens_per_s": tokens / elapsed,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      }
    ),
    flush=True,
  )


def _pipeline(store_dir: pathlib.Path, count: int) -> dict:
  print(f"pipeline {store_dir.name} x {count} processes", flush=True)
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "experiments.bench_store",
        f"--one_pipeline={store_dir}",
        f"--process_index={i}",
        f"--process_count={count}",
        f"--batches={_BATCHES.value}",
        f"--rows={_ROWS.value}",
        f"--row_len={_ROW_LEN.value}",
        f"--max_len={_MAX_LEN.value}",
      ],
      stdout=subprocess.PIPE,
      text=True,
    )
    for i in range(count)
  ]
  results = []
  for p in procs:
    out, _ = p.communicate()
    if p.returncode:
      raise RuntimeError(f"pipeline process failed ({p.returncode})")
    results.append(json.loads(out.strip().splitlines()[-1]))
  return {
    "processes": count,
    "per_process": results,
    "max_peak_rss_bytes": max(r["peak_rss_bytes"] for r in results),
    "min_batches_per_s": min(r["batches_per_s"] for r in results),
  }


def _train(store_dir: pathlib.Path) -> dict:
  print(f"training {_TRAIN_STEPS.value} steps on {store_dir.name} with 2 processes", flush=True)
  wd = store_dir.parent / f"train_{store_dir.name}"
  shutil.rmtree(wd, ignore_errors=True)
  wd.mkdir()
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  overrides = [
    f"--config.dataset={store_dir}",
    f"--config.max_len={_MAX_LEN.value}",
    f"--config.train.row_len={_ROW_LEN.value}",
    f"--config.train.rows_per_batch={_ROWS.value}",
    f"--config.train.max_steps={_TRAIN_STEPS.value}",
    "--config.train.loss=sampled_softmax",
    "--config.train.negatives=mixed",
    "--config.train.num_negatives=1024",
    "--config.train.log_every_steps=10",
    f"--config.train.checkpoint_every_steps={_TRAIN_STEPS.value}",
    "--config.eval.max_users=1024",
    "--config.eval.users_per_batch=128",
    "--config.eval.rows_per_batch=32",
    "--config.mesh.data=2",
  ]
  procs = [
    _timed(
      [
        sys.executable,
        "-m",
        "recgpt_jax.main",
        "--config=experiments/configs/default.py",
        f"--workdir={wd / 'run'}",
        f"--coordinator_address=localhost:{port}",
        "--num_processes=2",
        f"--process_id={i}",
        *overrides,
      ],
      wd / f"process_{i}.log",
      env,
    )
    for i in range(2)
  ]
  codes = [p.wait() for p in procs]
  if any(codes):
    raise RuntimeError(f"training failed ({codes}), see {wd}/process_*.log")
  rows = [json.loads(line) for line in (wd / "run" / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in rows if "train/loss" in r]
  timed = train[1:]  # the first interval includes compilation
  steps_per_s = (timed[-1]["step"] - timed[0]["step"]) / (timed[-1]["time"] - timed[0]["time"])
  results = json.loads((wd / "run" / "results.json").read_text())
  return {
    "processes": 2,
    "steps": _TRAIN_STEPS.value,
    "overrides": overrides,
    "per_process": [_time_v(wd / f"process_{i}.log") for i in range(2)],
    "steps_per_s": steps_per_s,
    "first_loss": train[0]["train/loss"],
    "last_loss": train[-1]["train/loss"],
    "valid": results.get("valid"),
  }


def _markdown(r: dict) -> str:
  lines = [
    "# Stores at production size: build, input pipeline per process, 2-process training",
    "",
    f"Command: `{r['command']}`  ",
    f"Date: {r['date']}; machine: {r['cpu']} ({os.cpu_count()} cores, shared with other jobs); commit"
    f" {r['git_commit']}.",
    "",
    "Synthetic logs from `python -m recgpt_jax.data.synthetic` (seed 0, Parquet). Peak RSS is each process's",
    "maximum resident set (`/usr/bin/time -v` or `ru_maxrss`). Pipeline: global batch of"
    f" {r['rows']} rows x {r['row_len']} (max_len {r['max_len']}), each of P processes assembling its"
    f" {r['rows']}/P rows; batches/s over {r['batches']} batches after the first. A rerun reuses finished"
    " measurements; each keeps its own command, date and commit in the JSON (`measured`).",
    "",
    "## Build (`python -m recgpt_jax.data.store`)",
    "",
    "| interactions | items | users | build s | of which: read log s | write records s | CPU s | peak RSS |"
    " store on disk |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for x in r["sizes"].values():
    b = x.get("build")
    if b:
      lines.append(
        f"| {b['num_interactions']:,} | {b['num_items']:,} | {b['num_users']:,} | {b['wall_s']:.0f} |"
        f" {b.get('ingest_s', '')} | {b.get('write_s', '')} | {b['cpu_s']:.0f} |"
        f" {b['peak_rss_bytes'] / GIB:.2f} GiB | {b['disk_bytes'] / GIB:.2f} GiB |"
      )
  lines += [
    "",
    "## Input pipeline",
    "",
    "| store | processes | setup s (plan) | batches/s (slowest process) | peak RSS (largest process) |",
    "|---|---|---|---|---|",
  ]
  for size, x in r["sizes"].items():
    for p in x.get("pipeline", {}).values():
      setup = max(q["setup_s"] for q in p["per_process"])
      lines.append(
        f"| {size} | {p['processes']} | {setup:.1f} | {p['min_batches_per_s']:.1f} |"
        f" {p['max_peak_rss_bytes'] / GIB:.2f} GiB |"
      )
  t = r.get("train")
  if t:
    rss = ", ".join(f"{q['peak_rss_bytes'] / GIB:.2f} GiB" for q in t["per_process"])
    lines += [
      "",
      f"## Training: {t['steps']} steps on {t['size']} with 2 processes (`jax.distributed`, one CPU device each)",
      "",
      f"- Peak RSS per process: {rss}.",
      f"- Steps/s: {t['steps_per_s']:.2f} (after the first logging interval); loss {t['first_loss']:.3f} ->"
      f" {t['last_loss']:.3f}.",
      f"- Overrides of experiments/configs/default.py: `{' '.join(t['overrides'])}`.",
    ]
    pipe = r["sizes"].get(t["size"], {}).get("pipeline", {}).get("2")
    if pipe:
      lines.append(
        f"- The pipeline with 2 processes delivers {pipe['min_batches_per_s']:.1f} batches/s,"
        f" {pipe['min_batches_per_s'] / t['steps_per_s']:.0f}x what the train step consumes."
      )
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _ONE_PIPELINE.value:
    _one_pipeline()
    return
  try:
    sizes = {s: synthetic.parse_size(s) for s in _SIZES.value}
    if _TRAIN_SIZE.value:
      sizes.setdefault(_TRAIN_SIZE.value, synthetic.parse_size(_TRAIN_SIZE.value))
    counts = [int(c) for c in _PROCESSES.value]
  except (errors.UserError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  root = pathlib.Path(_DATA_DIR.value)
  root.mkdir(parents=True, exist_ok=True)
  partial_path = root / "bench_store.partial.json"
  partial = {} if _FRESH.value or not partial_path.exists() else json.loads(partial_path.read_text())
  partial.setdefault("sizes", {})

  def save():
    partial_path.write_text(json.dumps(partial, indent=1))

  def stamped(result: dict) -> dict:  # each measurement keeps its own date and commit (a rerun reuses it)
    header = provenance.record_header("experiments.bench_store")
    return {**result, "measured": {k: header[k] for k in ("command", "date", "git_commit")}}

  for size, (rows, items) in sizes.items():
    entry = partial["sizes"].setdefault(size, {})
    log = root / f"log_{size}.parquet"
    out = root / f"store_{size}"
    _ensure_log(log, rows, items)
    if "build" not in entry or not out.exists():
      entry["build"] = stamped(_build(log, out))
      entry.pop("pipeline", None)
      save()
    if size in _SIZES.value:
      pipe = entry.setdefault("pipeline", {})
      for count in counts:
        if str(count) not in pipe:
          pipe[str(count)] = stamped(_pipeline(out, count))
          save()
  if _TRAIN_SIZE.value and (partial.get("train", {}).get("size") != _TRAIN_SIZE.value or _FRESH.value):
    partial["train"] = stamped({"size": _TRAIN_SIZE.value, **_train(root / f"store_{_TRAIN_SIZE.value}")})
    save()
  record = {
    **provenance.record_header("experiments.bench_store"),
    "rows": _ROWS.value,
    "row_len": _ROW_LEN.value,
    "max_len": _MAX_LEN.value,
    "batches": _BATCHES.value,
    "sizes": {s: partial["sizes"][s] for s in sizes},
    "train": partial.get("train"),
  }
  provenance.write_record(pathlib.Path(_OUT.value), "bench_store", record, _markdown(record))


if __name__ == "__main__":
  app.run(main, flags_parser=errors.parse_flags_or_exit)
