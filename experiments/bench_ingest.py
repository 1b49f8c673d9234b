"""Ingestion of large interaction logs: time and peak RSS of ``io.read_interactions`` on synthetic logs.

For each size (interactions x items) a synthetic log (``recgpt_jax.data.synthetic``) is written once as Parquet and
as CSV under ``--data_dir`` (kept for reruns), then read in a fresh process per file: wall seconds, CPU seconds and
the process's peak RSS (``ru_maxrss``), with the read's users, items and interactions.

  python -m experiments.bench_ingest --sizes=1e6x1e5,1e7x1e6,1e8x1e6 [--formats=parquet,csv]

Writes experiments/results/bench_ingest.{json,md} with the command, date and machine.
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import subprocess
import sys
import time

from absl import app, flags

from recgpt_jax import errors, provenance

_SIZES = flags.DEFINE_list("sizes", ["1e6x1e5", "1e7x1e6"], "Logs to measure: <interactions>x<items>.")
_FORMATS = flags.DEFINE_list("formats", ["parquet", "csv"], "File formats to read.")
_DATA_DIR = flags.DEFINE_string("data_dir", "/tmp/recgpt_bench_ingest", "Where the synthetic logs are written.")
_ONE = flags.DEFINE_string("one", "", "Internal: read this file in this process and print its JSON.")
_OUT = flags.DEFINE_string("out", "experiments/results", "Where the results go.")


def _read_one(path: str) -> dict:
  from recgpt_jax.data import io

  wall, cpu = time.perf_counter(), time.process_time()
  data = io.read_interactions(path)
  return {
    "path": path,
    "read_s": time.perf_counter() - wall,
    "cpu_s": time.process_time() - cpu,
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "users": int(data.num_users),
    "items": int(data.num_items),
    "interactions": int(sum(len(s) for s in data.sequences)),
  }


def _markdown(r: dict) -> str:
  lines = [
    "# Interaction-log ingestion (`io.read_interactions`) on synthetic logs",
    "",
    f"Command: `{r['command']}`  ",
    f"Date: {r['date']}; machine: {r['cpu']} ({os.cpu_count()} cores, shared with other jobs); commit"
    f" {r['git_commit']}.",
    "",
    "Each file is read in a fresh process; peak RSS is that process's maximum resident set (Python, numpy and",
    "pyarrow included). Logs from `python -m recgpt_jax.data.synthetic` (seed 0).",
    "",
    "| interactions | items (catalogue) | format | file size | read s | CPU s | peak RSS | users | items read |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for x in r["results"]:
    if "error" in x:
      lines.append(
        f"| {x['interactions_requested']:,} | {x['items_requested']:,} | {x['format']} | | failed: {x['error']} |"
      )
      continue
    lines.append(
      f"| {x['interactions']:,} | {x['items_requested']:,} | {x['format']} | {x['file_bytes'] / 2**20:,.0f} MiB |"
      f" {x['read_s']:.1f} | {x['cpu_s']:.1f} | {x['peak_rss_bytes'] / 2**30:.2f} GiB | {x['users']:,} |"
      f" {x['items']:,} |"
    )
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
  del argv
  if _ONE.value:
    print(json.dumps(_read_one(_ONE.value)))
    return
  from recgpt_jax.data import synthetic

  try:
    sizes = [synthetic.parse_size(s) for s in _SIZES.value]
    bad = [f for f in _FORMATS.value if f not in ("parquet", "csv")]
    if bad:
      raise errors.UserError(f"--formats must be parquet and/or csv, got {bad}")
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  data_dir = pathlib.Path(_DATA_DIR.value)
  results = []
  for rows, items in sizes:
    for fmt in _FORMATS.value:
      path = data_dir / f"log_{rows:.0e}x{items:.0e}.{fmt}".replace("+", "")
      if not path.exists():
        print(f"writing {path} ...", file=sys.stderr, flush=True)
        synthetic.write_log(path, synthetic.LogShape(interactions=rows, items=items))
      print(f"reading {path} ...", file=sys.stderr, flush=True)
      proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench_ingest", f"--one={path}"], capture_output=True, text=True
      )
      entry = {"interactions_requested": rows, "items_requested": items, "format": fmt}
      if proc.returncode != 0:
        entry["error"] = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
      else:
        entry |= json.loads(proc.stdout.strip().splitlines()[-1]) | {"file_bytes": path.stat().st_size}
      results.append(entry)
      print(f"  {json.dumps(entry)}", file=sys.stderr, flush=True)
  record = {
    **provenance.record_header("experiments.bench_ingest"),
    "results": results,
  }
  provenance.write_record(_OUT.value, "bench_ingest", record, _markdown(record))


if __name__ == "__main__":
  app.run(main, flags_parser=errors.parse_flags_or_exit)
