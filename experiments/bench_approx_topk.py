"""Recall of approximate top-k (``eval.approx_recall``) against the exact top-k: a trained Beauty model and a
10^6-item table.

``lax.approx_max_k`` is a partial reduction on TPU only; XLA on CPU and GPU falls back to the exact top-k, so
here every approximate top-k of evaluation and of the multi-interest recall is replaced by
``topk.emulated_approx_max_k``, TPU's reduction (same window count as XLA's, tested) in plain ``jnp``: the
figures are those the TPU algorithm would give, computed on this machine (an emulation, not a TPU run).

* Beauty: the study's pre-trained model (``--workdir``, default ``runs/study/grid/Beauty__ce__s0``), every test
  user's list under the plain top-20 and the two-step recall (18, 2): recall@20 of the approximate list against
  the exact one, and HR@10 / NDCG@10 / HR@20 with each;
* with ``--large_workdir``, the same for a run trained on a store (the 10^6-item model of
  ``experiments.bench_store``, its ``eval.max_users`` sampled test users);
* a random ``[10^6, 64]`` item table and 512 random queries: recall@20 (and @100) of the reduction.

  python -m experiments.bench_approx_topk [--workdir=runs/study/grid/Beauty__ce__s0] \
    [--large_workdir=/work/bench_store/train_store_1e8x1e6/run]

Writes experiments/results/bench_approx_topk.{json,md} with the command, date and machine.
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags

from recgpt_jax import errors, provenance

_WORKDIR = flags.DEFINE_string("workdir", "runs/study/grid/Beauty__ce__s0", "A finished study run (Beauty ce).")
_TARGETS = flags.DEFINE_list("targets", ["0.8", "0.9", "0.95"], "Recall targets of approx_max_k.")
_LARGE = flags.DEFINE_string(
  "large_workdir", "", "Also a finished run on a large store (e.g. the 10^6-item run of experiments.bench_store)."
)
_ITEMS = flags.DEFINE_integer("items", 1_000_000, "Rows of the random table.")
_OUT = flags.DEFINE_string("out", "experiments/results", "Where the results go.")


def _emulate_approx():
  """Makes every ``topk.top_k(..., approx_recall > 0)`` use the emulated TPU reduction (module-level patch)."""
  from recgpt_jax.parallel import topk

  exact = topk.top_k

  def top_k(scores, k, approx_recall=0.0):
    if approx_recall:
      return topk.emulated_approx_max_k(scores, k, approx_recall)
    return exact(scores, k)

  topk.top_k = top_k


def _overlap(a, b) -> float:
  """Mean over rows of |a_row & b_row| / width."""
  import numpy as np

  return float(np.mean([len(set(x) & set(y)) / len(y) for x, y in zip(a, b, strict=True)]))


def beauty(workdir: pathlib.Path, targets: list[float]) -> dict:
  from experiments import study

  spec = next(s for s in study.grid_runs(["Beauty"], ["ce"], [0], workdir.parents[1], pathlib.Path("/nonexistent")))
  c = spec.config()
  c.init_from = ""
  return trained(workdir, c, targets)


def large(workdir: pathlib.Path, targets: list[float]) -> dict:
  """The model of a finished run on a large store (its own config, on this process's one device)."""
  import json

  import ml_collections

  c = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  c.mesh.data = 1
  out = trained(workdir, c, targets)
  return out


def trained(workdir: pathlib.Path, c, targets: list[float]) -> dict:
  import jax
  import numpy as np

  from recgpt_jax.eval import metrics as metrics_lib
  from recgpt_jax.recall import decoder
  from recgpt_jax.train import loop

  run = loop.Run(c, workdir, writer=False)
  params, _ = run.ckpt.restore_best(run.state.params)
  run.ckpt.close()
  batches = run.eval_batches["test"]
  out = {
    "workdir": str(workdir),
    "dataset": str(run.data.source),
    "num_items": int(run.data.num_items),
    "users": int(len(run.eval_sets["test"].users)),
    "settings": [],
  }
  for quotas in ((20,), (18, 2)):
    lists = {}
    for target in (0.0, *targets):
      fn = decoder.make_recall_fn(run.graphdef, quotas, run.head, approx_recall=target)
      items, answers = [], []
      for batch in batches:
        real = batch["answer"] > 0
        items.append(np.asarray(jax.device_get(fn(params, batch)["items"]))[real])
        answers.append(batch["answer"][real])
      items, answers = np.concatenate(items), np.concatenate(answers)
      m = metrics_lib.list_metrics(items, answers, (10, 20))
      lists[target] = items
      out["settings"].append(
        {
          "quotas": list(quotas),
          "approx_recall": target,
          "recall_at_20_vs_exact": _overlap(items, lists[0.0]),
          **{k: float(np.mean(m[k])) for k in ("HR@10", "NDCG@10", "HR@20")},
        }
      )
      print(f"  {workdir.name} {quotas} target {target}: {out['settings'][-1]}", file=sys.stderr, flush=True)
    if quotas == (20,):
      # Strided windows (entry j in window j mod M): lists of small, nearby ids never collide, so the spread of the
      # exact lists' ids explains a recall of 1.
      out["exact_item_id_percentiles"] = {str(q): float(np.percentile(lists[0.0], q)) for q in (50, 90, 99)}
  return out


def table(items: int, targets: list[float]) -> dict:
  import jax
  import numpy as np

  from recgpt_jax.parallel import topk

  q = jax.random.normal(jax.random.key(0), (512, 64))
  t = jax.random.normal(jax.random.key(1), (items, 64))
  scores = jax.jit(lambda q, t: q @ t.T)(q, t)
  out = {"items": items, "queries": 512, "settings": []}
  for k in (20, 100):
    exact = np.asarray(jax.lax.top_k(scores, k)[1])
    for target in targets:
      approx = np.asarray(jax.jit(lambda s, k=k, r=target: topk.emulated_approx_max_k(s, k, r))(scores)[1])
      windows = topk.approx_windows(items, k, target)
      out["settings"].append(
        {
          "k": k,
          "approx_recall": target,
          "windows": windows,
          "xla_estimate": float(np.exp((1 - k) / windows)),
          "recall_vs_exact": _overlap(approx, exact),
        }
      )
      print(f"  table k={k} target {target}: {out['settings'][-1]}", file=sys.stderr, flush=True)
  return out


def _markdown(r: dict) -> str:
  lines = [
    "# Approximate top-k (`eval.approx_recall`): recall against the exact top-k",
    "",
    f"Command: `{r['command']}`  ",
    f"Date: {r['date']}; machine: {r['cpu']}; commit {r['git_commit']}.",
    "",
    "**An emulation**: XLA on CPU (and GPU) falls back to the exact top-k, so each approximate top-k is TPU's",
    "partial reduction computed in `jnp` (`topk.emulated_approx_max_k`: XLA's window count, each window keeps",
    "its maximum, exact top-k of the maxima). Not a TPU run.",
    "",
  ]
  sections = [("Beauty, pre-trained CE model", r["beauty"])]
  if r.get("large"):
    sections.append(("A model trained on a store (`python -m experiments.bench_store`)", r["large"]))
  for title, part in sections:
    lines += [
      f"## {title}: {part['num_items']:,} items, {part['users']:,} test users (`{part['workdir']}`)",
      "",
      "| recall | approx_recall | recall@20 vs exact list | HR@10 | NDCG@10 | HR@20 |",
      "|---|---|---|---|---|---|",
    ]
    spread = part.get("exact_item_id_percentiles")
    for x in part["settings"]:
      name = "+".join(map(str, x["quotas"]))
      target = "exact" if not x["approx_recall"] else x["approx_recall"]
      lines.append(
        f"| {name} | {target} | {x['recall_at_20_vs_exact']:.5f} | {x['HR@10']:.4f} | {x['NDCG@10']:.4f}"
        f" | {x['HR@20']:.4f} |"
      )
    if spread:
      lines += [
        "",
        f"Item ids in the exact top-20 lists: median {spread['50']:,.0f}, 90th percentile {spread['90']:,.0f}, 99th"
        f" {spread['99']:,.0f} (of {part['num_items']:,}). Ids are numbered by first appearance, so popular items have"
        " small ids; two items share a strided window only if their ids differ by a multiple of the window count"
        " (256 to 2,048 here), which few of these lists' items do.",
      ]
    lines.append("")
  t = r["table"]
  lines += [
    f"## Random table: {t['items']:,} items x 64, {t['queries']} random queries",
    "",
    "| k | approx_recall | windows | XLA's estimate exp(-(k-1)/windows) | recall vs exact |",
    "|---|---|---|---|---|",
  ]
  for s in t["settings"]:
    lines.append(
      f"| {s['k']} | {s['approx_recall']} | {s['windows']:,} | {s['xla_estimate']:.4f} | {s['recall_vs_exact']:.4f} |"
    )
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
  del argv
  try:
    targets = [float(x) for x in _TARGETS.value]
  except ValueError:
    print(f"error: --targets must be numbers in (0, 1), got {_TARGETS.value}", file=sys.stderr)
    sys.exit(2)
  if not all(0 < x < 1 for x in targets):
    print(f"error: --targets must be in (0, 1), got {targets}", file=sys.stderr)
    sys.exit(2)
  workdir = pathlib.Path(_WORKDIR.value)
  if not (workdir / "best").is_dir():
    print(f"error: {workdir} holds no finished run (no best/); run the study's Beauty ce first", file=sys.stderr)
    sys.exit(2)
  _emulate_approx()
  record = {
    **provenance.record_header("experiments.bench_approx_topk"),
    "beauty": beauty(workdir, targets),
    "large": large(pathlib.Path(_LARGE.value), targets) if _LARGE.value else None,
    "table": table(_ITEMS.value, targets),
  }
  provenance.write_record(_OUT.value, "bench_approx_topk", record, _markdown(record))


if __name__ == "__main__":
  app.run(main, flags_parser=errors.parse_flags_or_exit)
