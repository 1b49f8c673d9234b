"""Evaluates one trained run under several recall settings: plain top-K and two-step quotas (m, n).

For each K in --ks, every split m + n = K with n >= 1 is scored on the valid split; the best (m, n) by
valid NDCG@K and the plain top-K are then scored on test. Writes experiments/results/<name>.json.

  python -m experiments.recall_sweep --config=experiments/configs/beauty_recgpt.py \
      --workdir=runs/beauty_recgpt --name=beauty_recgpt_recall_sweep
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from recgpt_jax.eval import metrics as metrics_lib
from recgpt_jax.recall import decoder
from recgpt_jax.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config of the run.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding the trained model.")
_NAME = flags.DEFINE_string("name", None, "Results file name (without .json).")
_KS = flags.DEFINE_list("ks", ["5", "10", "20"], "Cut-offs K to sweep.")
_OUT = flags.DEFINE_string("out", "experiments/results", "Results directory.")
_ALSO = flags.DEFINE_multi_string("also", ["18,2"], "Quotas also scored on test whatever valid prefers.")
flags.mark_flags_as_required(["config", "workdir", "name"])


class _Evaluator:
  """The run's data and best parameters, evaluated under any recall quotas."""

  def __init__(self, config):
    self.run = loop.Run(config, _WORKDIR.value, writer=False)
    ckpt = self.run.ckpt
    self.params = (
      ckpt.restore_best(self.run.state.params)[0] if ckpt.has_best() else ckpt.restore(self.run.state)[0].params
    )

  def __call__(self, quotas, stage):
    ks = tuple(k for k in metrics_lib.KS if k <= sum(quotas))
    recall_fn = decoder.make_recall_fn(self.run.graphdef, quotas) if len(quotas) > 1 else None
    step = metrics_lib.make_eval_step(self.run.graphdef, ks, recall_fn=recall_fn)
    return metrics_lib.evaluate(step, self.params, self.run.eval_batches[stage])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  t0 = time.time()
  evaluate = _Evaluator(_CONFIG.value)
  rows = []
  for k in map(int, _KS.value):
    candidates = [(k,)] + [(m, k - m) for m in range(k - 1, 0, -1)]
    valid = {q: evaluate(q, "valid")[f"NDCG@{k}"] for q in candidates}
    best = max(candidates, key=lambda q: (valid[q], -len(q)))
    also = [tuple(int(m) for m in a.split(",")) for a in _ALSO.value]
    for q in dict.fromkeys([(k,), best, *(a for a in also if sum(a) == k)]):
      test = evaluate(q, "test")
      rows.append(
        {"K": k, "quotas": list(q), "valid_NDCG": valid[q], "test": {n: v for n, v in test.items() if n != "users"}}
      )
      print(
        f"K={k} quotas={q}: valid NDCG@{k} {valid[q]:.4f},"
        f" test HR@{k} {test[f'HR@{k}']:.4f} NDCG@{k} {test[f'NDCG@{k}']:.4f}",
        flush=True,
      )
    rows.append({"K": k, "valid_NDCG_by_quotas": {str(q): v for q, v in valid.items()}})
  record = {
    "name": _NAME.value,
    "workdir": _WORKDIR.value,
    "command": "python " + " ".join(sys.argv),
    "git_commit": loop.git_commit(),
    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    "machine": loop.machine_description(),
    "wall_time_s": round(time.time() - t0, 1),
    "sweep": rows,
  }
  out = pathlib.Path(_OUT.value) / f"{_NAME.value}.json"
  out.write_text(json.dumps(record, indent=2) + "\n")
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
