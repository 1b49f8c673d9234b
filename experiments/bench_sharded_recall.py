"""Benchmark: exact top-k recall over an item table sharded along the vocabulary, 8 simulated CPU devices.

For each mesh (data x model) and table size (``items`` real items + the padding row 0, padded to a multiple of the
model axis; float32, random normal, each device building its own rows of ``P('model', None)``, row r drawn from
``fold_in(key, r)`` so that every layout holds the same table), a batch of ``users`` random queries with 50 random
excluded ids each:

- sharded: ``jax.jit`` of :func:`recgpt_jax.parallel.topk.sharded_top_k` (local top-k per shard, all-gather of
  the k x shards candidates, final top-k). Compilation excluded, one warm-up call, then ``rounds`` timed calls
  (``block_until_ready``): median / min / max;
- naive, one device: the unsharded reference (scores of the whole table, then ``lax.top_k``) on a copy of the
  table on device 0, once per table size, when it fits in memory (else skipped with the reason). Its ids are
  compared with the sharded ones;
- naive, auto-partitioned: the same reference jitted on the sharded inputs, left to XLA's partitioner (it
  all-gathers the ``[users, V]`` scores and every device runs the full top-k). Always compiled, for its HLO;
  timed only when 8 x its per-device memory fits.

Memory per device: the table shard (``addressable_shards``) and the compiled program's ``memory_analysis()``.
Data gathered across devices per user: every all-gather / all-reduce / reduce-scatter / all-to-all /
collective-permute of the compiled (per-device) HLO, result bytes divided by the users of one device, against the
expected ``min(k, V / model) x model x (4 + 4)`` bytes (float32 score + int32 id per candidate).

The machine is shared: the load average is recorded at start and end, figures are never adjusted.

  python experiments/bench_sharded_recall.py [--items=1000000,4000000 --mesh=1x8,2x4 --rounds=5]

Writes experiments/results/bench_sharded_recall.json and bench_sharded_recall.md.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import datetime  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from recgpt_jax import provenance  # noqa: E402
from recgpt_jax.parallel import hlo  # noqa: E402
from recgpt_jax.parallel.topk import sharded_top_k  # noqa: E402

EXCLUDED_PER_USER = 50
CANDIDATE_BYTES = 4 + 4  # float32 score + int32 id
MEMORY_FRACTION = 0.7  # of MemAvailable that a naive run may claim
INIT_BLOCK_ROWS = 8192

_ITEMS = flags.DEFINE_list("items", ["1000000", "4000000"], "Real items of the table (row 0 = padding is added).")
_DIM = flags.DEFINE_integer("dim", 256, "Embedding dimension.")
_K = flags.DEFINE_integer("k", 100, "Items recalled per user.")
_USERS = flags.DEFINE_integer("users", 256, "Users in the batch.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed calls per variant (after one warm-up call).")
_MESH = flags.DEFINE_list("mesh", ["1x8"], "Meshes data x model to compare, e.g. 1x8,2x4.")
_NAIVE = flags.DEFINE_bool("naive", True, "Also time the unsharded reference where it fits in memory.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed of table, queries and exclusions.")
_OUT = flags.DEFINE_string("out", "experiments/results", "Where to write bench_sharded_recall.{json,md}.")


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stats(times: list[float]) -> dict[str, float]:
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def time_calls(fn: Callable[[], object], rounds: int) -> dict[str, float]:
  jax.block_until_ready(fn())  # warm-up
  times = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return stats(times)


def naive_skip_reason(need: int, what: str) -> str | None:
  """Why a naive run needing ``need`` bytes (made of ``what``) is skipped, or None to run it."""
  if not _NAIVE.value:
    return "--nonaive"
  avail = mem_available()
  if need > MEMORY_FRACTION * avail:
    return (
      f"needs ~{need / 2**30:.1f} GiB ({what}), more than {MEMORY_FRACTION:.0%} of the {avail / 2**30:.1f} GiB"
      " available"
    )
  return None


def mem_available() -> int:
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  raise RuntimeError("no MemAvailable in /proc/meminfo")


def machine() -> dict:
  return {
    "cpu": provenance.cpu_name(),
    "cores": os.cpu_count(),
    "memory_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
    "devices": f"{jax.devices()[0].platform} x{jax.device_count()}",
    "jax_version": jax.__version__,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def memory(compiled) -> dict[str, int]:
  """The per-device fields of ``compiled.memory_analysis()`` (empty if the backend gives none)."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return {}
  names = ("argument", "output", "temp", "alias", "generated_code")
  return {f"{n}_bytes": int(getattr(analysis, f"{n}_size_in_bytes", 0)) for n in names}


def collectives(compiled, users_per_device: int) -> dict:
  found = hlo.collectives(compiled.as_text())
  total = sum(c.result_bytes for c in found)
  return {
    "ops": [{"op": c.op, "result": list(c.result_shapes), "result_bytes": c.result_bytes} for c in found],
    "bytes_by_op": hlo.collective_bytes(compiled.as_text()),
    "result_bytes_per_device": total,
    "bytes_per_user": total / users_per_device,
  }


def compare(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]) -> dict:
  """Agreement of two ``(scores_uk, ids_uk)`` results: ids exactly, scores relative, per rank.

  Different matmul shapes (shard sizes, users per device) may round a score differently in the last bit, which can
  swap two near-tied items: then the ids differ at that rank while the scores there still agree to rounding.
  """
  (got_s, got_i), (want_s, want_i) = got, want
  same = got_i == want_i
  rel = np.abs(got_s - want_s) / np.maximum(np.abs(want_s), np.finfo(np.float32).tiny)
  out = {
    "ids_equal_fraction": float(same.mean()),
    "users_differing": int((~same).any(axis=1).sum()),
    "max_rel_score_diff": float(rel.max()),
    "max_rel_score_diff_same_id": float(rel[same].max()) if same.any() else None,
  }
  if not same.all():
    out["max_rel_score_diff_where_ids_differ"] = float(rel[~same].max())
    out["users_with_same_id_set"] = int(sum(set(a) == set(b) for a, b in zip(got_i, want_i, strict=True)))
  return out


def reference(queries_ud, table_vd, exclude_ue, *, k: int, num_valid: int):
  """The unsharded recall: scores of the whole table, masks, one ``lax.top_k``."""
  scores = queries_ud @ table_vd.T
  low = jnp.finfo(scores.dtype).min
  scores = scores.at[:, 0].set(low)
  scores = scores.at[jnp.arange(scores.shape[0])[:, None], exclude_ue].set(low)
  scores = jnp.where(jnp.arange(scores.shape[1]) >= num_valid, low, scores)
  return tuple(jax.lax.top_k(scores, k))


def normal_rows(key: jax.Array, first_row, num_rows: int, dim: int) -> jax.Array:
  """Rows ``first_row ..`` of a random normal table; row r drawn from ``fold_in(key, r)`` alone.

  Generated a block of rows at a time: one ``jax.random.normal`` over a whole 4M x 256 table holds several times
  the table in temporaries (the run was killed by the OOM killer), and each row depends only on its global index,
  so every mesh and the one-device copy hold the same table.
  """
  draw = lambda r: jax.random.normal(jax.random.fold_in(key, r), (dim,), jnp.float32)
  return jax.lax.map(draw, first_row + jnp.arange(num_rows), batch_size=INIT_BLOCK_ROWS)


def make_table(rows: int, dim: int, seed: int, mesh: jax.sharding.Mesh | None = None) -> jax.Array:
  """The table, built on the devices that hold it: split ``P('model', None)`` over ``mesh``, else on device 0."""
  key = jax.random.key(seed)
  if mesh is None:
    init = jax.jit(
      lambda: normal_rows(key, 0, rows, dim), out_shardings=jax.sharding.SingleDeviceSharding(jax.devices()[0])
    )
    return jax.block_until_ready(init())
  rows_loc = rows // mesh.shape["model"]
  local = lambda: normal_rows(key, jax.lax.axis_index("model") * rows_loc, rows_loc, dim)
  init = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(), out_specs=P("model", None)))
  return jax.block_until_ready(init())


def run_mesh(spec: str, items: int, queries: np.ndarray, exclude: np.ndarray) -> tuple[dict, tuple[np.ndarray, ...]]:
  data, model = (int(x) for x in spec.split("x"))
  mesh = jax.make_mesh(
    (data, model),
    ("data", "model"),
    axis_types=(jax.sharding.AxisType.Auto,) * 2,
    devices=jax.devices()[: data * model],
  )
  k, users = _K.value, _USERS.value
  num_valid = items + 1
  rows = -(-num_valid // model) * model
  vocab_loc = rows // model
  users_per_device = users // data
  log(f"mesh {spec}, {items:,} items: table {rows:,} x {_DIM.value} sharded over {model}")
  by_rows = NamedSharding(mesh, P("data", None))
  q, ex = jax.device_put(queries, by_rows), jax.device_put(exclude, by_rows)
  table_shape = jax.ShapeDtypeStruct((rows, _DIM.value), jnp.float32, sharding=NamedSharding(mesh, P("model", None)))

  fn = jax.jit(lambda q, t, e: sharded_top_k(q, t, k, mesh=mesh, exclude_ue=e, num_valid=num_valid))
  t0 = time.perf_counter()
  compiled = fn.lower(q, table_shape, ex).compile()
  compile_s = time.perf_counter() - t0
  result = {
    "mesh": spec,
    "data": data,
    "model": model,
    "items": items,
    "rows": rows,
    "rows_per_shard": vocab_loc,
    "users_per_device": users_per_device,
    "compile_s": compile_s,
    "memory_per_device": memory(compiled),
  }
  mem = result["memory_per_device"]
  # The table is replicated over the data axis; every device runs the program.
  need = rows * _DIM.value * 4 * data + mesh.size * (mem.get("temp_bytes", 0) + mem.get("output_bytes", 0))
  avail = mem_available()
  if need > 0.9 * avail:
    result["skipped"] = f"needs ~{need / 2**30:.1f} GiB, more than 90% of the {avail / 2**30:.1f} GiB available"
    log(f"  skipped: {result['skipped']}")
    return result, None
  gathered = collectives(compiled, users_per_device)
  expected = min(k, vocab_loc) * model * CANDIDATE_BYTES if model > 1 else 0
  gathered["expected_bytes_per_user"] = expected
  gathered["ok"] = gathered["bytes_per_user"] == expected
  if not gathered["ok"]:
    log(f"  WARNING: gathered {gathered['bytes_per_user']} bytes per user, expected {expected}")
  log(
    f"  compiled in {compile_s:.1f} s; collectives {gathered['bytes_by_op']}, {gathered['bytes_per_user']:.0f} B/user"
  )
  t0 = time.perf_counter()
  table = make_table(rows, _DIM.value, _SEED.value, mesh)
  log(f"  table built in {time.perf_counter() - t0:.1f} s")
  shard_bytes = sorted({s.data.nbytes for s in table.addressable_shards})
  timing = time_calls(lambda: compiled(q, table, ex), _ROUNDS.value)
  log(f"  sharded: median {timing['median_s']:.3f} s ({timing['min_s']:.3f}-{timing['max_s']:.3f})")
  top = tuple(map(np.asarray, compiled(q, table, ex)))
  result.update(
    {
      **timing,
      "users_per_s": users / timing["median_s"],
      "table_bytes_per_device": shard_bytes[0] if len(shard_bytes) == 1 else shard_bytes,
      "gathered": gathered,
      "naive_auto": naive_auto(mesh, q, table, ex, k, num_valid, users_per_device),
      "peak_rss_bytes_so_far": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
  )
  return result, top


def naive_auto(mesh, q, table, ex, k: int, num_valid: int, users_per_device: int) -> dict:
  """The reference on the sharded inputs, partitioned by XLA: compiled always, timed when it fits."""
  compiled = jax.jit(functools.partial(reference, k=k, num_valid=num_valid)).lower(q, table, ex).compile()
  mem = memory(compiled)
  out = {"memory_per_device": mem, "gathered": collectives(compiled, users_per_device)}
  need = mesh.size * (mem.get("temp_bytes", 0) + mem.get("output_bytes", 0))
  log(
    f"  naive auto-partitioned: gathers {out['gathered']['bytes_per_user']:,.0f} B/user; needs ~{need / 2**30:.1f} GiB"
  )
  skip = naive_skip_reason(need, f"{mesh.size} devices x (temp + output)")
  if skip:
    out["skipped"] = skip
  else:
    out.update(time_calls(lambda: compiled(q, table, ex), _ROUNDS.value))
    log(f"  naive auto-partitioned: median {out['median_s']:.3f} s")
  if "skipped" in out:
    log(f"  naive auto-partitioned skipped: {out['skipped']}")
  return out


def naive_one_device(items: int, queries: np.ndarray, exclude: np.ndarray) -> tuple[dict, tuple | None]:
  """The reference with the whole table on device 0."""
  k, num_valid = _K.value, items + 1
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  rows = num_valid  # no padding needed on one device; the rows past num_valid would be masked anyway
  shape = jax.ShapeDtypeStruct((rows, _DIM.value), jnp.float32, sharding=device)
  q, ex = jax.device_put(queries, device), jax.device_put(exclude, device)
  compiled = jax.jit(functools.partial(reference, k=k, num_valid=num_valid)).lower(q, shape, ex).compile()
  mem = memory(compiled)
  table_bytes = rows * _DIM.value * 4
  need = table_bytes + mem.get("temp_bytes", 0) + mem.get("output_bytes", 0)
  out = {"rows": rows, "table_bytes": table_bytes, "memory": mem}
  skip = naive_skip_reason(need, "table + temp + output")
  if skip:
    out["skipped"] = skip
    log(f"naive one device, {items:,} items: skipped: {out['skipped']}")
    return out, None
  log(f"naive one device, {items:,} items: table {rows:,} x {_DIM.value}, needs ~{need / 2**30:.1f} GiB")
  # The same rows as the sharded tables, without their padding rows (random there too, masked by num_valid).
  table = make_table(rows, _DIM.value, _SEED.value)
  out.update(time_calls(lambda: compiled(q, table, ex), _ROUNDS.value))
  out["users_per_s"] = _USERS.value / out["median_s"]
  log(f"naive one device: median {out['median_s']:.3f} s ({out['min_s']:.3f}-{out['max_s']:.3f})")
  return out, tuple(map(np.asarray, compiled(q, table, ex)))


def main(argv):
  del argv
  record = {
    "benchmark": "sharded_recall",
    "command": "python " + " ".join(sys.argv),
    "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
    "machine": machine(),
    "git_commit": provenance.git_commit(),
    "load_average_start": os.getloadavg(),
    "config": {
      "items": [int(x) for x in _ITEMS.value],
      "dim": _DIM.value,
      "k": _K.value,
      "users": _USERS.value,
      "excluded_per_user": EXCLUDED_PER_USER,
      "rounds": _ROUNDS.value,
      "meshes": _MESH.value,
      "dtype": "float32",
      "table_init": "random normal, row r from fold_in(key, r), each device building its rows of"
      " P('model', None) in blocks of 8192; rows = items + 1 (id 0 = padding) padded to a"
      " multiple of the model axis, masked by num_valid = items + 1",
    },
    "method": {
      "time": "compiled call, compilation excluded, one warm-up call, then `rounds` calls each with"
      " block_until_ready: median / min / max seconds for the whole batch of users",
      "memory": "table_bytes_per_device from table.addressable_shards; memory_per_device from"
      " compiled.memory_analysis() (the per-device program)",
      "gathered": "collectives parsed from compiled.as_text() (per-device program) with"
      " recgpt_jax.parallel.hlo.collectives: result bytes summed, divided by the users of one device; expected"
      " min(k, rows / model) x model x (4 + 4) bytes per user",
      "naive_one_device": "the unsharded reference (scores of the whole table, then lax.top_k) with the table on"
      " device 0",
      "agreement": "per mesh, compare(): ids equal per rank and relative score differences, against the naive"
      " one-device result (or the first mesh when it was skipped)",
      "naive_auto": "the same reference jitted on the sharded inputs, partitioned by XLA",
    },
    "complete": False,
    "results": [],
    "naive_one_device": {},
  }
  rng = np.random.default_rng(_SEED.value)
  queries = rng.normal(size=(_USERS.value, _DIM.value)).astype(np.float32)
  log(f"{record['machine']['cpu']}, {record['machine']['devices']}, load {record['load_average_start']}")
  for items in record["config"]["items"]:
    exclude = rng.integers(1, items + 1, size=(_USERS.value, EXCLUDED_PER_USER)).astype(np.int32)
    tops = []
    for spec in _MESH.value:
      result, top = run_mesh(spec, items, queries, exclude)
      record["results"].append(result)
      tops.append(top)
      save(record)
    naive, naive_top = naive_one_device(items, queries, exclude)
    record["naive_one_device"][str(items)] = naive
    # Against the unsharded reference when it ran, else against the first mesh.
    if naive_top is not None:
      want, against = naive_top, "naive_one_device"
    else:
      want, against = next(
        ((t, f"mesh {m}") for t, m in zip(tops, _MESH.value, strict=True) if t is not None), (None, "")
      )
    for result, top in zip(record["results"][-len(tops) :], tops, strict=True):
      if top is None or want is None:
        continue
      result["agreement"] = {"against": against, **compare(top, want)}
      a = result["agreement"]
      log(
        f"  mesh {result['mesh']} vs {against}: ids equal {a['ids_equal_fraction']:.4%}"
        f" ({a['users_differing']} users differ), max rel. score diff {a['max_rel_score_diff']:.1e}"
      )
    save(record)
  record["complete"] = True
  save(record)
  log(f"wrote {_OUT.value}/bench_sharded_recall.json and .md; load {record['load_average_end']}")


def save(record: dict) -> None:
  """Writes the record so far (a long run that dies still leaves its finished parts)."""
  record["load_average_end"] = os.getloadavg()
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  (out / "bench_sharded_recall.json").write_text(json.dumps(record, indent=2) + "\n")
  write_markdown(out / "bench_sharded_recall.md", record)


def write_markdown(path: pathlib.Path, record: dict) -> None:
  mib = lambda b: f"{b / 2**20:,.1f} MiB"
  c, m = record["config"], record["machine"]
  lines = [
    f"# Sharded top-{c['k']} recall, {c['users']} users x {c['dim']}-d float32 table, 8 simulated CPU devices",
    "",
    f"`{record['command']}` on {record['date_utc']}, {m['cpu']}, {m['cores']} cores, {m['devices']}, jax"
    f" {m['jax_version']}, commit {record['git_commit']}. Load average {record['load_average_start']} at start,"
    f" {record['load_average_end']} at end (shared machine; figures not adjusted)."
    + ("" if record["complete"] else " **Incomplete run: the parts finished so far.**"),
    "",
    f"{c['excluded_per_user']} random excluded ids per user; table rows = items + 1 (id 0 = padding), padded to a"
    " multiple of the model axis. Time: whole batch, compiled, one warm-up, median (min-max) of"
    f" {c['rounds']} calls. Gathered: result bytes of the collectives in the compiled per-device HLO, per user,"
    " vs the expected min(k, rows/model) x model x 8 B.",
    "",
  ]
  for spec in c["meshes"]:
    lines += [
      f"## Mesh {spec} (data x model)",
      "",
      "| items | time s, median (min-max) | users/s | table / device | temp / device | gathered B/user (expected)"
      " | naive 1-device s | naive / sharded | naive auto-partitioned: gathered B/user, s |",
      "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in record["results"] if r["mesh"] == spec):
      if "skipped" in r:
        lines.append(f"| {r['items']:,} | skipped: {r['skipped']} |" + " |" * 7)
        continue
      naive = record["naive_one_device"].get(str(r["items"]), {})
      auto = r["naive_auto"]
      naive_s = f"{naive['median_s']:.2f}" if "median_s" in naive else "skipped"
      ratio = f"{naive['median_s'] / r['median_s']:.2f}x" if "median_s" in naive else "-"
      auto_s = f"{auto['median_s']:.2f}" if "median_s" in auto else "skipped"
      g = r["gathered"]
      ok = "" if g["ok"] else " **differs**"
      table = r["table_bytes_per_device"]
      lines.append(
        f"| {r['items']:,} | {r['median_s']:.2f} ({r['min_s']:.2f}-{r['max_s']:.2f}) | {r['users_per_s']:.0f}"
        f" | {mib(table) if isinstance(table, int) else table} | {mib(r['memory_per_device'].get('temp_bytes', 0))}"
        f" | {g['bytes_per_user']:,.0f} ({g['expected_bytes_per_user']:,}){ok} | {naive_s} | {ratio}"
        f" | {auto['gathered']['bytes_per_user']:,.0f}, {auto_s} |"
      )
    lines.append("")
  lines += ["## Notes", ""]
  for r in (r for r in record["results"] if "skipped" not in r):
    ops = ", ".join(f"{o['op']} {'+'.join(o['result'])}" for o in r["gathered"]["ops"]) or "none"
    lines.append(f"- {r['mesh']}, {r['items']:,} items: sharded collectives (per device): {ops}.")
    a = r.get("agreement")
    if a is None:
      continue
    line = (
      f"  Against {a['against']}: ids equal at {a['ids_equal_fraction']:.4%} of the ranks ({a['users_differing']}"
      f" users differ), max relative score difference {a['max_rel_score_diff']:.1e}"
    )
    if "max_rel_score_diff_where_ids_differ" in a:
      line += (
        f" ({a['max_rel_score_diff_where_ids_differ']:.1e} at the ranks where the ids differ;"
        f" {a['users_with_same_id_set']} of {record['config']['users']} users have the same set of ids)"
      )
    lines.append(line + ".")
    if "skipped" in r["naive_auto"]:
      lines.append(f"  Naive auto-partitioned not timed: {r['naive_auto']['skipped']}.")
  for items, naive in record["naive_one_device"].items():
    if "skipped" in naive:
      lines.append(f"- naive one device, {int(items):,} items: skipped, {naive['skipped']}.")
    else:
      lines.append(f"- naive one device, {int(items):,} items: temp {mib(naive['memory'].get('temp_bytes', 0))}.")
  path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
  app.run(main)
