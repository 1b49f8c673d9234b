"""Plots valid NDCG@10 per epoch of training runs (one line per run) from their metrics.jsonl.

  python experiments/plot_curves.py --out=experiments/results/beauty_curves.png \
      pretrain=runs/beauty_ce prompt_tune=runs/beauty_recgpt

Each ``label=workdir`` argument adds a line; a prompt-tuning run's epochs continue from the epoch of the
pre-training checkpoint it started from when ``--continue_from`` names that label.
"""

from __future__ import annotations

import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from absl import app, flags  # noqa: E402

_OUT = flags.DEFINE_string("out", "experiments/results/curves.png", "PNG to write.")
_METRIC = flags.DEFINE_string("metric", "valid/NDCG@10", "Logged metric to plot.")
_TITLE = flags.DEFINE_string("title", "Beauty: validation NDCG@10 per epoch", "Plot title.")


def read_curve(workdir: pathlib.Path, metric: str) -> tuple[list[int], list[float]]:
  """(epochs, values) of ``metric`` in a run's metrics.jsonl; the last entry wins for a repeated epoch."""
  by_epoch = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if metric in record and "epoch" in record:
      by_epoch[record["epoch"]] = record[metric]
  epochs = sorted(by_epoch)
  return epochs, [by_epoch[e] for e in epochs]


def main(argv):
  runs = [a.split("=", 1) for a in argv[1:]]
  if not runs or any(len(r) != 2 for r in runs):
    raise app.UsageError("pass label=workdir arguments")
  fig, ax = plt.subplots(figsize=(7, 4))
  offset = 0
  for label, workdir in runs:
    epochs, values = read_curve(pathlib.Path(workdir), _METRIC.value)
    best = max(values)
    ax.plot([e + offset for e in epochs], values, marker=".", label=f"{label} (best {best:.4f})")
    if label.startswith("pretrain"):
      offset = epochs[values.index(best)]  # a following prompt-tuning run starts from the best epoch
  ax.set_xlabel("epoch (prompt-tuning continues from the best pre-training epoch)")
  ax.set_ylabel(_METRIC.value)
  ax.set_title(_TITLE.value)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(_OUT.value, dpi=120)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
