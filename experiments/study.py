"""The RecGPT study: datasets x recipes x seeds, resumable, with one report.

  python -m experiments.study tune   [--datasets=...]                      # baseline sweep on valid (seed 0)
  python -m experiments.study grid   [--datasets=...] [--recipes=...] [--seeds=0,1,2]
  python -m experiments.study recall [--datasets=...] [--recipes=...] [--seeds=...]  # recall settings, ranks
  python -m experiments.study repeats [--datasets=...] [--seeds=...]     # history excluded vs kept (ce models)
  python -m experiments.study report                                       # tune.md, report.md/.json/.png

Every run is one ``python -m recgpt_jax.main`` process with its own workdir under ``--runs`` and its results
JSON (plus per-user test metrics) under ``--results``. A run whose results JSON exists is skipped and an
interrupted run resumes from its checkpoint, so the same command continues a study across sessions. The
report is regenerated from the results files alone.

Recipes (every one starts from the dataset's tuned baseline, experiments/configs/study.py):

* ``ce``: the pre-train-only model: full-softmax cross-entropy pre-training.
* ``ce_finetune``: the no-prompt control: fine-tuning ``ce`` with the prompt-tuning schedule, no prompts.
* ``recgpt``: RecGPT as in the paper: prompt-tuning ``ce`` (top-1 prompts replacing the last input),
  two-step recall (18, 2).
* ``aligned``: beyond the paper: prompt-tuning ``ce`` with aligned prompting (the position of a shown prompt
  learns the item the user did next, the shown item excluded), two-step recall (18, 2).
* ``aligned_list``: aligned prompting where the prompt's position also excludes the first recall step's list
  (the generating position's top 10), with recall (10, 10).
* ``authors_bce``: the authors' pre-training regime: BCE with one negative, hidden 256, 1 layer, flow
  attention, user module, dropout 0.1 on residuals, 30 epochs.
* ``authors_finetune`` / ``authors_recgpt``: the authors' second stage from ``authors_bce``: full-softmax CE on
  an untied head (evaluation with the tied table), without / with prompts (generated with dropout on, from
  the untied head), the latter with two-step recall (18, 2).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

from experiments.configs import study as study_config
from experiments.configs.study import RECIPES
from recgpt_jax import errors
from recgpt_jax.config import base_config
from recgpt_jax.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "experiments/configs/study.py"
PER_USER_SUFFIX = ".test_per_user.npz"  # recgpt_jax.train.loop.PER_USER_FILE beside <name>.json

# The baseline sweep: one factor at a time from the base (experiments/configs/study.py), seed 0, selected on
# valid NDCG@10. Patience 5 instead of the study's 10 keeps it affordable on 2 CPU cores.
SWEEP: dict[str, dict] = {
  "base": {},
  "hidden128": {"model.hidden": 128, "model.ffn": 512},
  "layers3": {"model.num_layers": 3},
  "dropout0.3": {"model.attn_dropout": 0.3, "model.hidden_dropout": 0.3},
  "lr2e-3": {"optimizer.learning_rate": 2e-3},
  "len100": {"max_len": 100, "train.row_len": 128, "train.rows_per_batch": 16},
  # A quarter of the batch (about 64 users, 4x the updates per epoch): the published models train on every
  # prefix as its own sample, so they take many more, smaller steps per epoch than all-position training.
  "batch8": {"train.rows_per_batch": 8},
}
SWEEP_SETTINGS = {"train.patience": 5}
# The user module (the paper's third component), on Beauty: as the paper has it, and regularised (user vectors
# dropped per sequence, or an L2 prior on them; train.user_l2).
USER_SWEEP: dict[str, dict] = {
  "user": {"model.user_module": True},
  "user_drop0.5": {"model.user_module": True, "model.user_dropout": 0.5},
  "user_l2_0.1": {"model.user_module": True, "train.user_l2": 0.1},
  "user_l2_1": {"model.user_module": True, "train.user_l2": 1.0},
}
USER_SWEEP_DATASETS = ("Beauty",)

MIN_SEEDS_FOR_VERDICT = 3  # fewer seeds: the interval would not carry the spread between training runs
PAIR_METRICS = ("NDCG@10", "HR@20")
REPORT_METRICS = ("HR@10", "NDCG@10", "HR@20", "NDCG@20")
# Best published full-ranking test HR@10 / NDCG@10 on these files (../shared/docs/recgpt-reference.md).
PUBLISHED = {
  "Beauty": (0.1041, 0.0614),
  "Sports_and_Outdoors": (0.0635, 0.0367),
  "Toys_and_Games": (0.1055, 0.0657),
  "Yelp": (0.0474, 0.0245),
}

_DATASETS = flags.DEFINE_list("datasets", list(study_config.DATASETS), "Datasets of the study.")
_RECIPES = flags.DEFINE_list("recipes", list(RECIPES), "grid: recipes to run (their parents are added).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "grid: seeds.")
_RUNS = flags.DEFINE_string("runs", "runs/study", "Where run workdirs go.")
_RESULTS = flags.DEFINE_string("results", "experiments/results/study", "Where per-run JSON and the report go.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands of the runs still to do; run nothing.")
_POINTS = flags.DEFINE_list("points", [], "tune: only these sweep points, in this order (default: all).")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 2000, "report: bootstrap replicates of each paired comparison.")


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One training run: a stage of ``recgpt_jax.main`` with a config and overrides."""

  name: str  # unique within its group: the results file name
  dataset: str
  stage: str
  overrides: tuple[tuple[str, object], ...]
  group: str  # results sub-folder
  runs: pathlib.Path  # root of the workdirs
  results: pathlib.Path  # root of the results
  parent: RunSpec | None = None  # the run whose model this one starts from: it must be finished first
  recipe: str = ""  # a RECIPES name ('' = the dataset's baseline config)

  @property
  def config_arg(self) -> str:
    """The argument of experiments/configs/study.py's get_config: ``<dataset>[,<recipe>]``."""
    return f"{self.dataset},{self.recipe}" if self.recipe else self.dataset

  def workdir(self) -> pathlib.Path:
    return self.runs / self.group / self.name

  def result(self) -> pathlib.Path:
    return self.results / self.group / f"{self.name}.json"

  def config(self):
    """The run's config (``ml_collections.ConfigDict``) as its command builds it."""
    c = study_config.get_config(self.config_arg)
    for k, v in self.overrides:
      study_config.set_field(c, k, v)
    return c

  def expected_config(self) -> dict:
    """The training-relevant config this run records (its results JSON's ``recipe.config``)."""
    return _training_fields(json.loads(self.config().to_json()))

  def finished(self) -> bool:
    """True when the results JSON exists; UserError when it was made with another config (stale)."""
    if not self.result().exists():
      return False
    # Fields added to the schema after a run was made read as their defaults.
    defaults = json.loads(base_config().to_json())
    recorded = _training_fields(_merged(defaults, json.loads(self.result().read_text())["recipe"]["config"]))
    if recorded != self.expected_config():
      differ = sorted(_diff(recorded, self.expected_config()))
      raise UserError(
        f"{self.result()} was made with another config ({', '.join(differ[:3])}); move it away to rerun it"
      )
    return True

  def check_workdir(self) -> None:
    """UserError when the run's workdir holds a run with another config: resuming it would report that run."""
    saved = self.workdir() / "config.json"
    if not saved.exists():
      return
    defaults = json.loads(base_config().to_json())
    recorded = _training_fields(_merged(defaults, json.loads(saved.read_text())))
    if recorded != self.expected_config():
      differ = sorted(_diff(recorded, self.expected_config()))
      raise UserError(
        f"{self.workdir()} holds a run with another config ({', '.join(differ[:3])}); move it away to rerun it"
      )

  def command(self) -> list[str]:
    return [
      sys.executable,
      "-m",
      "recgpt_jax.main",
      f"--mode={self.stage}",
      f"--config={CONFIG}:{self.config_arg}",
      f"--workdir={self.workdir()}",
      f"--config.name={self.name}",
      f"--config.results_dir={self.result().parent}",
      *(f"--config.{k}={_flag_value(v)}" for k, v in self.overrides),
    ]


# Config fields that name outputs or set batching of evaluation and bookkeeping, not what is trained or measured.
_OUTPUT_FIELDS = ("name", "results_dir", "tfds_data_dir", "init_from")
_BOOKKEEPING_FIELDS = {
  "train": ("checkpoint_every_steps", "keep_checkpoints", "log_every_steps"),
  "eval": ("users_per_batch", "rows_per_batch"),
}


def _training_fields(config: dict) -> dict:
  out = {k: v for k, v in config.items() if k not in _OUTPUT_FIELDS}
  for section, fields in _BOOKKEEPING_FIELDS.items():
    if isinstance(out.get(section), dict):
      out[section] = {k: v for k, v in out[section].items() if k not in fields}
  return out


def _merged(defaults: dict, values: dict) -> dict:
  out = dict(defaults)
  for k, v in values.items():
    out[k] = _merged(defaults[k], v) if isinstance(v, dict) and isinstance(defaults.get(k), dict) else v
  return out


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
  out = []
  for k in sorted(set(a) | set(b)):
    if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
      out += _diff(a[k], b[k], f"{prefix}{k}.")
    elif a.get(k) != b.get(k):
      out.append(f"{prefix}{k}: {a.get(k)!r} != {b.get(k)!r}")
  return out


def _flag_value(v) -> str:
  if isinstance(v, tuple):
    return "(" + ",".join(str(x) for x in v) + ("," if len(v) == 1 else "") + ")"
  return str(v)


def tune_runs(datasets, runs_root: pathlib.Path, results_root: pathlib.Path, only=None) -> list[RunSpec]:
  """The sweep, point by point across datasets (every dataset gets its base first); ``only``: these points, in
  this order."""
  runs = []
  points = [(p, o, datasets) for p, o in SWEEP.items()]
  points += [(p, o, [d for d in datasets if d in USER_SWEEP_DATASETS]) for p, o in USER_SWEEP.items()]
  if only:
    points = sorted((pt for pt in points if pt[0] in only), key=lambda pt: list(only).index(pt[0]))
  for point, overrides, point_datasets in points:
    for ds in point_datasets:
      settings = {**SWEEP_SETTINGS, **overrides, "seed": 0}
      spec = RunSpec(f"{ds}__{point}", ds, "pretrain", tuple(settings.items()), "tune", runs_root, results_root)
      runs.append(spec)
  return runs


def grid_name(dataset: str, recipe: str, seed: int) -> str:
  return f"{dataset}__{recipe}__s{seed}"


def grid_runs(datasets, recipes, seeds, runs_root: pathlib.Path, results_root: pathlib.Path) -> list[RunSpec]:
  """Seed by seed, dataset by dataset; each recipe after the recipe it continues."""
  wanted = list(dict.fromkeys(p for r in recipes for p in (RECIPES[r].parent, r) if p))
  runs, by_name = [], {}
  for seed in seeds:
    for ds in datasets:
      for name in wanted:
        recipe = RECIPES[name]
        settings = {"seed": seed}
        parent = by_name.get(grid_name(ds, recipe.parent, seed)) if recipe.parent else None
        if parent is not None:
          settings["init_from"] = str(parent.workdir())
        spec = RunSpec(
          grid_name(ds, name, seed),
          ds,
          recipe.stage,
          tuple(settings.items()),
          "grid",
          runs_root,
          results_root,
          parent,
          name,
        )
        by_name[spec.name] = spec
        runs.append(spec)
  return runs


def execute(runs: list[RunSpec], dry_run: bool = False) -> None:
  """Runs what is not finished, in order; a failed run is reported and the next one starts.

  Several runners may share a study: each run is taken under an exclusive lock (released when its process
  ends, also by a crash), and a run whose parent is not finished is left for later.
  """
  todo = [r for r in runs if not r.finished()]
  print(f"{len(runs) - len(todo)} of {len(runs)} runs finished; {len(todo)} to do", flush=True)
  failed, waiting = [], []
  for i, r in enumerate(todo):
    cmd = r.command()
    if dry_run:
      print(" ".join(cmd[1:]))
      continue
    if r.parent is not None and not r.parent.finished():
      waiting.append(r.name)
      print(f"[{i + 1}/{len(todo)}] {r.name}: waits for {r.parent.name}", flush=True)
      continue
    log = r.runs / "logs" / f"{r.group}__{r.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log.with_suffix(".lock"), "w") as lock:
      try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        print(f"[{i + 1}/{len(todo)}] {r.name}: running in another process", flush=True)
        continue
      if r.finished():  # finished by another runner since this one listed it
        continue
      r.check_workdir()
      t0 = time.time()
      print(f"[{i + 1}/{len(todo)}] {r.name} ({r.stage}) -> {log}", flush=True)
      with open(log, "a") as f:
        f.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        f.flush()
        env = {**os.environ, "RECGPT_COMMAND": " ".join(["python", *cmd[1:]])}
        # The trainer holds the lock too: a runner killed alone does not free a run still training.
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, pass_fds=(lock.fileno(),))
    if rc != 0 or not r.result().exists():
      failed.append(r.name)
      print(f"    FAILED (exit {rc}; see {log})", flush=True)
    else:
      print(f"    done in {time.time() - t0:.0f} s", flush=True)
  if waiting:
    print(f"{len(waiting)} runs wait for a run that is not finished: run the command again later", flush=True)
  if failed:
    raise UserError(f"{len(failed)} runs failed: {', '.join(failed)}")


# ----------------------------------------------------------------------------------------------------- recall

# Recall settings scored on every prompt-tuned model (and the models they start from): plain top-20, the paper's
# two steps, larger second steps, and three steps.
RECALL_QUOTAS = ((20,), (18, 2), (14, 6), (10, 10), (14, 3, 3))
RECALL_RECIPES = ("ce", "ce_finetune", "recgpt", "aligned", "aligned_list", "authors_finetune", "authors_recgpt")
RANK_BUCKETS = ((1, 10), (11, 20), (21, 40))  # ranks of the test answer in the plain list


def recall_analysis(spec: RunSpec) -> tuple[dict, dict[str, np.ndarray]]:
  """Scores one finished run's best model under every ``RECALL_QUOTAS`` setting, and locates its test answers
  in its plain ranking.

  Returns:
    ``(record, per_user)``: valid/test means per quota setting and the fractions of test answers at each
    ``RANK_BUCKETS`` rank of the plain list; ``per_user`` holds ``users`` and ``<quotas>/<metric>`` test arrays.
  """
  import jax

  from recgpt_jax.eval import metrics as metrics_lib
  from recgpt_jax.recall import decoder
  from recgpt_jax.train import loop

  c = spec.config()
  c.init_from = ""  # only the run's own model is read
  run = loop.Run(c, spec.workdir(), writer=False)
  params, _ = run.ckpt.restore_best(run.state.params)
  record = {"name": spec.name, "quotas": {}}
  per_user = {"users": run.eval_sets["test"].users}
  for quotas in RECALL_QUOTAS:
    ks = tuple(k for k in metrics_lib.KS if k <= sum(quotas))
    recall_fn = decoder.make_recall_fn(run.graphdef, quotas, run.head) if len(quotas) > 1 else None
    step = metrics_lib.make_eval_step(run.graphdef, ks, run.head, recall_fn, per_user=True)
    entry = {}
    for split_name in ("valid", "test"):
      values = metrics_lib.evaluate_per_user(step, params, run.eval_batches[split_name])
      entry[split_name] = {m: float(np.mean(values[m], dtype=np.float64)) for m in values if m != "answer"}
      if split_name == "test":
        per_user |= {f"{_quota_key(quotas)}/{m}": values[m] for m in PAIR_METRICS}
    record["quotas"][_quota_key(quotas)] = entry
  plain = decoder.make_recall_fn(run.graphdef, (RANK_BUCKETS[-1][1],), run.head)
  ranks = []
  for batch in run.eval_batches["test"]:
    items = np.asarray(jax.device_get(plain(params, batch)["items"]))
    real = batch["answer"] > 0
    hit = items[real] == batch["answer"][real][:, None]
    ranks.append(np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, 0))
  ranks = np.concatenate(ranks)
  record["test_answer_rank"] = {f"{lo}-{hi}": float(np.mean((ranks >= lo) & (ranks <= hi))) for lo, hi in RANK_BUCKETS}
  record["test_answer_rank"][f">{RANK_BUCKETS[-1][1]}"] = float(np.mean(ranks == 0))
  return record, per_user


def _quota_key(quotas) -> str:
  return "+".join(str(m) for m in quotas)


def _has_model(spec: RunSpec) -> bool:
  """True when the run's workdir still holds a saved best model (a step folder under ``best/``)."""
  best = spec.workdir() / "best"
  return best.is_dir() and any(p.name.isdigit() for p in best.iterdir())


def _analysis_todo(runs: list[RunSpec], recipes, out: pathlib.Path) -> tuple[pathlib.Path, list[RunSpec]]:
  """``out`` (created) and the finished runs of ``recipes`` without an analysis record there yet.

  A finished run whose workdir no longer holds its model (the results JSON outlives the workdir, e.g. on another
  machine) is reported and skipped: an analysis needs the model itself.
  """
  out.mkdir(parents=True, exist_ok=True)
  todo = [r for r in runs if r.name.split("__")[1] in recipes and r.finished()]
  todo = [r for r in todo if not (out / f"{r.name}.json").exists()]
  for r in todo:
    if not _has_model(r):
      print(f"{r.name}: skipped, no saved model in {r.workdir() / 'best'} (retrain it to analyse it)", flush=True)
  return out, [r for r in todo if _has_model(r)]


def run_recall(runs: list[RunSpec], results_root: pathlib.Path) -> None:
  """``recall_analysis`` of every finished run of ``RECALL_RECIPES`` that has none yet."""
  out, todo = _analysis_todo(runs, RECALL_RECIPES, results_root / "recall")
  print(f"recall analysis of {len(todo)} runs", flush=True)
  for r in todo:
    t0 = time.time()
    record, per_user = recall_analysis(r)
    record |= {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "wall_time_s": round(time.time() - t0, 1)}
    np.savez_compressed(out / f"{r.name}{PER_USER_SUFFIX}", **per_user)
    (out / f"{r.name}.json").write_text(json.dumps(record, indent=1) + "\n")
    q = record["quotas"]
    print(
      f"{r.name}: test HR@20 "
      + " ".join(f"{k} {v['test']['HR@20']:.4f}" for k, v in q.items())
      + "; answers at plain ranks "
      + " ".join(f"{k}: {v:.1%}" for k, v in record["test_answer_rank"].items()),
      flush=True,
    )


REPEAT_RECIPES = ("ce",)  # models scored with the history left in the ranking (``repeats``)


def repeats_analysis(spec: RunSpec) -> dict:
  """One finished run's best model on test with the user's history excluded (the protocol) and kept in the ranking
  (``eval.exclude_history=False``), and how many test answers repeat an item of their user's history: under the
  protocol those are misses whatever the model does."""
  from recgpt_jax.data import packing
  from recgpt_jax.eval import metrics as metrics_lib
  from recgpt_jax.train import loop

  c = spec.config()
  c.init_from = ""
  run = loop.Run(c, spec.workdir(), writer=False)
  params, _ = run.ckpt.restore_best(run.state.params)
  test = run.eval_sets["test"]
  repeat = np.array([a in set(h.tolist()) for a, h in zip(test.answers, test.histories, strict=True)])
  kept = dataclasses.replace(test, histories=[np.zeros(0, np.int32)] * len(test.users))
  kept_batches = packing.pack_eval_batches(
    kept, row_len=c.train.row_len, rows_per_batch=c.eval.rows_per_batch, users_per_batch=c.eval.users_per_batch
  )
  step = metrics_lib.make_eval_step(run.graphdef, metrics_lib.KS, run.head, per_user=True)
  record = {"name": spec.name, "test_answers_in_history": float(repeat.mean()), "users": int(len(repeat))}
  for name, batches in (("excluded", run.eval_batches["test"]), ("kept", kept_batches)):
    values = metrics_lib.evaluate_per_user(step, params, batches)
    record[name] = {m: float(np.mean(values[m], dtype=np.float64)) for m in ("HR@10", "NDCG@10", "HR@20")}
    record[name]["HR@10 of repeated answers"] = float(values["HR@10"][repeat].mean()) if repeat.any() else 0.0
  return record


def run_repeats(runs: list[RunSpec], results_root: pathlib.Path) -> None:
  """``repeats_analysis`` of every finished run of ``REPEAT_RECIPES`` that has none yet."""
  out, todo = _analysis_todo(runs, REPEAT_RECIPES, results_root / "repeats")
  print(f"repeat analysis of {len(todo)} runs", flush=True)
  for r in todo:
    t0 = time.time()
    record = repeats_analysis(r)
    record |= {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "wall_time_s": round(time.time() - t0, 1)}
    (out / f"{r.name}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(
      f"{r.name}: {record['test_answers_in_history']:.1%} of test answers repeat; HR@10 excluded"
      f" {record['excluded']['HR@10']:.4f}, kept {record['kept']['HR@10']:.4f}",
      flush=True,
    )


def repeats_report(records: dict[str, dict]) -> list[str]:
  if not records:
    return []
  lines = [
    "## Repeated items: the history left in the ranking",
    "",
    "The protocol excludes each user's history from the ranking, so a test answer that repeats an item of the",
    "history is a miss whatever the model does. The `ce` models scored both ways (test, mean over seeds; command:",
    "`python -m experiments.study repeats`). Kept, the figures are not comparable with the published ones.",
    "",
    "| dataset | seeds | answers in history | HR@10 excluded | HR@10 kept | NDCG@10 excluded | NDCG@10 kept"
    " | HR@10 of the repeated answers, kept |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for ds in study_config.DATASETS:
    recs = [r for n, r in records.items() if n.startswith(f"{ds}__")]
    if not recs:
      continue

    def mean(f, recs=recs):
      return float(np.mean([f(r) for r in recs]))

    lines.append(
      f"| {ds} | {len(recs)} | {mean(lambda r: r['test_answers_in_history']):.1%}"
      f" | {mean(lambda r: r['excluded']['HR@10']):.4f} | {mean(lambda r: r['kept']['HR@10']):.4f}"
      f" | {mean(lambda r: r['excluded']['NDCG@10']):.4f} | {mean(lambda r: r['kept']['NDCG@10']):.4f}"
      f" | {mean(lambda r: r['kept']['HR@10 of repeated answers']):.4f} |"
    )
  return lines + [""]


# ----------------------------------------------------------------------------------------------------- report


def _load(results_root: pathlib.Path, group: str) -> dict[str, dict]:
  folder = results_root / group
  return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.exists() else {}


def tune_report(results_root: pathlib.Path) -> str:
  """The sweep's table: every point tried, per dataset, with the one chosen on valid NDCG@10."""
  runs = _load(results_root, "tune")
  lines = ["# Baseline sweep (seed 0, selected on valid NDCG@10)", ""]
  lines += [
    "One factor at a time from the base (experiments/configs/study.py: hidden 64, 2 layers, 2 heads, FFN 256,",
    "dropout 0.5, Adam 1e-3, max length 50, full-softmax CE, no user module), patience 5; on Beauty also the user",
    "module, as in the paper and regularised (`user*` points).",
    "Command: `python -m experiments.study tune`; regenerate this file with `python -m experiments.study report`.",
    "",
    "| dataset | point | valid NDCG@10 | valid HR@10 | test HR@10 | test NDCG@10 | best epoch | wall s |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for ds in study_config.DATASETS:
    names = list(SWEEP) + (list(USER_SWEEP) if ds in USER_SWEEP_DATASETS else [])
    points = [(p, runs.get(f"{ds}__{p}")) for p in names]
    done = [(p, r) for p, r in points if r]
    best = max(done, key=lambda pr: pr[1]["valid"]["NDCG@10"])[0] if done else None
    for p, r in points:
      if r is None:
        lines.append(f"| {ds} | {p} | (not run) | | | | | |")
        continue
      mark = " **(best)**" if p == best else ""
      v, t = r["valid"], r["test"]
      lines.append(
        f"| {ds} | {p}{mark} | {v['NDCG@10']:.4f} | {v['HR@10']:.4f} | {t['HR@10']:.4f} | {t['NDCG@10']:.4f}"
        f" | {r['epochs']} | {r['wall_time_s']:.0f} |"
      )
  machines = sorted({r["machine"] for r in runs.values()})
  dates = sorted(r["date"] for r in runs.values())
  if dates:
    lines += ["", f"Runs from {dates[0]} to {dates[-1]} on {'; '.join(machines)}."]
  return "\n".join(lines) + "\n"


def paired_bootstrap(diff_su: np.ndarray, replicates: int, seed: int = 0) -> tuple[float, float, float]:
  """Mean of per-user paired differences ``[seeds, users]`` and its 95% bootstrap interval.

  Hierarchical: each replicate resamples the users and, independently, the seeds (both with replacement), so
  the interval carries the spread between training seeds as well as the sampling of test users.
  """
  rng = np.random.default_rng(seed)
  s, u = diff_su.shape
  stats = np.empty(replicates)
  for i in range(replicates):
    users = rng.integers(0, u, u)
    seeds = rng.integers(0, s, s)
    stats[i] = diff_su[seeds][:, users].mean()
  lo, hi = np.percentile(stats, [2.5, 97.5])
  return float(diff_su.mean()), float(lo), float(hi)


def _per_user(results_root: pathlib.Path, name: str) -> dict[str, np.ndarray] | None:
  path = results_root / "grid" / f"{name}{PER_USER_SUFFIX}"
  if not path.exists():
    return None
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def grid_summary(results_root: pathlib.Path, replicates: int) -> dict:
  """Means and spreads per (dataset, recipe), and every recipe's paired comparison with the baselines."""
  runs = _load(results_root, "grid")
  summary = {"cells": {}, "pairs": {}, "seeds": {}, "sweep": {}}
  for name, r in _load(results_root, "tune").items():
    ds, point = name.split("__", 1)
    entry = {m: r["test"][m] for m in ("HR@10", "NDCG@10")} | {"valid NDCG@10": r["valid"]["NDCG@10"]}
    summary["sweep"].setdefault(ds, {})[point] = entry
  for ds in study_config.DATASETS:
    for recipe in RECIPES:
      seeds = sorted(int(n.rsplit("__s", 1)[1]) for n in runs if n.startswith(f"{ds}__{recipe}__s"))
      if not seeds:
        continue
      recs = [runs[grid_name(ds, recipe, s)] for s in seeds]
      summary["cells"][f"{ds}/{recipe}"] = {
        "seeds": seeds,
        "selected_epochs": [r.get("epochs") for r in recs],
        **{
          m: {
            "mean": float(np.mean([r["test"][m] for r in recs])),
            "sd": float(np.std([r["test"][m] for r in recs], ddof=1)) if len(recs) > 1 else None,
            "values": [r["test"][m] for r in recs],
          }
          for m in REPORT_METRICS
          if m in recs[0]["test"]
        },
      }
      for base in RECIPES[recipe].controls:
        common = [s for s in seeds if grid_name(ds, base, s) in runs]
        pu = [
          (_per_user(results_root, grid_name(ds, recipe, s)), _per_user(results_root, grid_name(ds, base, s)))
          for s in common
        ]
        pu = [(a, b) for a, b in pu if a is not None and b is not None]
        if not pu:
          continue
        for a, b in pu:
          if not np.array_equal(a["users"], b["users"]):
            raise UserError(f"{ds}: {recipe} and {base} were tested on different users")
        for m in PAIR_METRICS:
          if m not in pu[0][0] or m not in pu[0][1]:
            continue
          diff = np.stack([a[m].astype(np.float64) - b[m].astype(np.float64) for a, b in pu])
          mean, lo, hi = paired_bootstrap(diff, replicates)
          verdict = "gain" if lo > 0 else ("loss" if hi < 0 else "no significant difference")
          if len(pu) < MIN_SEEDS_FOR_VERDICT:
            verdict = f"pending ({len(pu)} of {MIN_SEEDS_FOR_VERDICT} seeds)"
          summary["pairs"][f"{ds}/{recipe}/vs_{base}/{m}"] = {
            "seeds": len(pu),
            "users": int(diff.shape[1]),
            "mean_diff": mean,
            "ci95": [lo, hi],
            "per_seed": [float(d.mean()) for d in diff],
            "verdict": verdict,
          }
  return summary


def recall_summary(results_root: pathlib.Path, replicates: int) -> dict:
  """Per (dataset, recipe): mean test metrics of each recall setting over seeds, each setting's paired
  difference with the plain top-20 of the same models, and where the plain list ranks the test answers."""
  folder = results_root / "recall"
  records = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.exists() else {}
  out = {}
  for ds in study_config.DATASETS:
    for recipe in RECIPES:
      names = sorted(n for n in records if n.startswith(f"{ds}__{recipe}__s"))
      if not names:
        continue
      recs = [records[n] for n in names]
      per_user = []
      for n in names:
        with np.load(folder / f"{n}{PER_USER_SUFFIX}") as f:
          per_user.append({k: f[k] for k in f.files})
      cell = {"seeds": len(names), "quotas": {}, "test_answer_rank": {}}
      for k in recs[0]["test_answer_rank"]:
        cell["test_answer_rank"][k] = float(np.mean([r["test_answer_rank"][k] for r in recs]))
      plain = _quota_key(RECALL_QUOTAS[0])
      for q in recs[0]["quotas"]:
        entry = {m: float(np.mean([r["quotas"][q]["test"][m] for r in recs])) for m in PAIR_METRICS}
        if q != plain:
          for m in PAIR_METRICS:
            diff = np.stack([pu[f"{q}/{m}"].astype(np.float64) - pu[f"{plain}/{m}"] for pu in per_user])
            mean, lo, hi = paired_bootstrap(diff, replicates)
            entry[f"{m} vs {plain}"] = {"mean_diff": mean, "ci95": [lo, hi]}
        cell["quotas"][q] = entry
      out[f"{ds}/{recipe}"] = cell
  return out


def recall_report(recall: dict) -> list[str]:
  if not recall:
    return []
  lines = [
    "## Multi-interest recall settings",
    "",
    "Test HR@20 of each recipe's models under each recall setting (quotas m_1+...+m_S, K = 20), the paired",
    "difference with the plain top-20 of the same models (95% hierarchical bootstrap interval), and where the",
    "plain list ranks the test answers: answers at ranks 21-40 are the most a later step can bring into the",
    "top 20 (command: `python -m experiments.study recall`).",
    "",
    "| dataset | recipe | seeds | "
    + " | ".join(_quota_key(q) for q in RECALL_QUOTAS)
    + " | answers at ranks "
    + ", ".join(f"{lo}-{hi}" for lo, hi in RANK_BUCKETS)
    + ", >40 |",
    "|---|---|---|" + "---|" * (len(RECALL_QUOTAS) + 1),
  ]
  for key, cell in recall.items():
    ds, recipe = key.split("/")
    vals = []
    for q in RECALL_QUOTAS:
      e = cell["quotas"].get(_quota_key(q))
      if e is None:
        vals.append("")
        continue
      d = e.get(f"HR@20 vs {_quota_key(RECALL_QUOTAS[0])}")
      vals.append(
        f"{e['HR@20']:.4f}"
        + ("" if d is None else f" ({d['mean_diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}])")
      )
    ranks = ", ".join(f"{v:.1%}" for v in cell["test_answer_rank"].values())
    lines.append(f"| {ds} | `{recipe}` | {cell['seeds']} | " + " | ".join(vals) + f" | {ranks} |")
  return lines + [""]


_VERDICT_SHORT = {"gain": "gain", "loss": "loss", "no significant difference": "n.s."}


def overview_lines(summary: dict) -> list[str]:
  """Two compact tables across datasets: each recipe's mean test HR@10 / NDCG@10, and its verdicts against its
  controls (NDCG@10 and HR@20 mean differences; "pending" below 3 seeds)."""
  cells, pairs = summary["cells"], summary["pairs"]
  recipes = [r for r in RECIPES if any(f"{ds}/{r}" in cells for ds in study_config.DATASETS)]
  if not recipes:
    return []
  head = "| recipe | " + " | ".join(study_config.DATASETS) + " |"
  rule = "|---|" + "---|" * len(study_config.DATASETS)
  lines = [
    "## Overview",
    "",
    "Test HR@10 / NDCG@10, mean over seeds (seeds in brackets when fewer than 3; bold: the dataset's best NDCG@10):",
    "",
    head,
    rule,
  ]
  best = {}
  for ds in study_config.DATASETS:
    done = [r for r in recipes if f"{ds}/{r}" in cells]
    best[ds] = max(done, key=lambda r, ds=ds: cells[f"{ds}/{r}"]["NDCG@10"]["mean"]) if done else None
  for r in recipes:
    vals = []
    for ds in study_config.DATASETS:
      c = cells.get(f"{ds}/{r}")
      short = "" if c is None or len(c["seeds"]) >= MIN_SEEDS_FOR_VERDICT else f" ({len(c['seeds'])})"
      text = "" if c is None else f"{c['HR@10']['mean']:.4f} / {c['NDCG@10']['mean']:.4f}"
      vals.append(f"**{text}**{short}" if r == best[ds] else f"{text}{short}")
    lines.append(f"| `{r}` | " + " | ".join(vals) + " |")
  lines += [
    "",
    "Paired differences, NDCG@10 ; HR@20, with the verdict of the 95% interval (n.s.: the interval holds zero):",
    "",
    "| recipe | vs | " + " | ".join(study_config.DATASETS) + " |",
    "|---|---|" + "---|" * len(study_config.DATASETS),
  ]
  for r in recipes:
    for base in RECIPES[r].controls:
      vals = []
      for ds in study_config.DATASETS:
        got = [pairs.get(f"{ds}/{r}/vs_{base}/{m}") for m in PAIR_METRICS]
        vals.append(
          " ; ".join(
            f"{p['mean_diff']:+.4f} {_VERDICT_SHORT.get(p['verdict'], 'pending')}" for p in got if p is not None
          )
        )
      if any(vals):
        lines.append(f"| `{r}` | `{base}` | " + " | ".join(vals) + " |")
  return lines + [""]


def grid_report(summary: dict) -> str:
  cells, pairs = summary["cells"], summary["pairs"]
  lines = [
    "# RecGPT study: 4 datasets x recipes x seeds",
    "",
    "Regenerate with `python -m experiments.study report` (reads experiments/results/study/grid/*.json and the",
    "per-user test metrics beside them). Runs: `python -m experiments.study grid`. Test metrics, full ranking,",
    "mean +- sd over seeds. Each run keeps its best model on valid: NDCG@10 for pre-training, NDCG@20 for the",
    "second stages (the two-step recall changes only @20), whose starting model is a candidate too (epoch 0).",
    f'A verdict needs {MIN_SEEDS_FOR_VERDICT} seeds; "gain" only where the whole interval is above zero.',
    "",
  ]
  lines += overview_lines(summary)
  for ds in study_config.DATASETS:
    rows = [(r, cells[f"{ds}/{r}"]) for r in RECIPES if f"{ds}/{r}" in cells]
    if not rows:
      continue
    lines += [
      f"## {ds}",
      "",
      "| recipe | seeds | " + " | ".join(REPORT_METRICS) + " | selected epoch per seed |",
      "|---|---|" + "---|" * (len(REPORT_METRICS) + 1),
    ]
    for r, cell in rows:
      vals = []
      for m in REPORT_METRICS:
        c = cell.get(m)
        vals.append("" if c is None else f"{c['mean']:.4f}" + (f" +- {c['sd']:.4f}" if c["sd"] is not None else ""))
      epochs = ", ".join(str(e) for e in cell.get("selected_epochs", []))
      lines.append(f"| {RECIPES[r].label or r} (`{r}`) | {len(cell['seeds'])} | " + " | ".join(vals) + f" | {epochs} |")
    best = max(rows, key=lambda rc: rc[1]["NDCG@10"]["mean"])
    hr_pub, ndcg_pub = PUBLISHED[ds]
    hr, ndcg = best[1]["HR@10"]["mean"], best[1]["NDCG@10"]["mean"]
    lines += [
      "",
      f"Best recipe by mean test NDCG@10: `{best[0]}`: HR@10 {hr:.4f} = {hr / hr_pub:.0%} and NDCG@10 {ndcg:.4f} ="
      f" {ndcg / ndcg_pub:.0%} of the best published ({hr_pub} / {ndcg_pub}); the bar is 90%.",
      *_tried_lines(ds, hr / hr_pub, ndcg / ndcg_pub, [r for r, _ in rows], summary.get("sweep", {}).get(ds, {})),
      "",
      "Paired per-user differences (recipe - baseline), 95% hierarchical bootstrap interval (users and seeds):",
      "",
      "| recipe | vs | metric | seeds | mean diff | 95% CI | per seed | verdict |",
      "|---|---|---|---|---|---|---|---|",
    ]
    for r, _ in rows:
      for base in RECIPES[r].controls:
        for m in PAIR_METRICS:
          p = pairs.get(f"{ds}/{r}/vs_{base}/{m}")
          if p is None:
            continue
          per_seed = " ".join(f"{x:+.4f}" for x in p["per_seed"])
          lo, hi = p["ci95"]
          lines.append(
            f"| `{r}` | `{base}` | {m} | {p['seeds']} | {p['mean_diff']:+.4f} | [{lo:+.4f}, {hi:+.4f}]"
            f" | {per_seed} | {p['verdict']} |"
          )
    lines.append("")
  lines += recall_report(summary.get("recall", {}))
  lines += repeats_report(summary.get("repeats", {}))
  return "\n".join(lines) + "\n"


BAR = 0.9  # of the best published test HR@10 and NDCG@10


def _tried_lines(ds: str, hr_share: float, ndcg_share: float, recipes: list[str], sweep: dict) -> list[str]:
  """Where the best recipe misses the bar: what was tried (the sweep's points with their test figures, the
  recipes run); nothing when the bar is met."""
  missed = [m for m, share in (("HR@10", hr_share), ("NDCG@10", ndcg_share)) if share < BAR]
  if not missed:
    return []
  verb = "bars are" if len(missed) > 1 else "bar is"
  lines = ["", f"The {' and '.join(missed)} {verb} not reached. What was tried:"]
  if sweep:
    hr_pub, ndcg_pub = PUBLISHED[ds]
    hr_pub = PUBLISHED[ds][0]
    best_hr = max(sweep, key=lambda p: sweep[p]["HR@10"])
    chosen = max(sweep, key=lambda p: sweep[p]["valid NDCG@10"])
    points = ", ".join(f"{p} {v['HR@10']:.4f} / {v['NDCG@10']:.4f}" for p, v in sweep.items())
    lines.append(
      f"- the baseline sweep (seed 0, `tune.md`; test HR@10 / NDCG@10): {points}. Valid chose {chosen}; the best"
      f" test HR@10 of any point, {best_hr}'s, is {sweep[best_hr]['HR@10'] / hr_pub:.0%} of the published (one seed)."
    )
  lines.append(
    "- every recipe in the table above: "
    + ", ".join(f"`{r}`" for r in recipes)
    + " (attempts beyond the paper are labelled so; experiments/configs/study.py says what each changes)."
  )
  return lines


def plot(summary: dict, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(study_config.DATASETS), figsize=(4.5 * len(study_config.DATASETS), 4))
  for ax, ds in zip(np.atleast_1d(axes), study_config.DATASETS, strict=True):
    names = [r for r in RECIPES if f"{ds}/{r}" in summary["cells"]]
    means = [summary["cells"][f"{ds}/{r}"]["NDCG@10"]["mean"] for r in names]
    sds = [summary["cells"][f"{ds}/{r}"]["NDCG@10"]["sd"] or 0.0 for r in names]
    ax.bar(range(len(names)), means, yerr=sds, capsize=3, color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.axhline(BAR * PUBLISHED[ds][1], color="tab:red", ls="--", lw=1, label="90% of best published")
    ax.set_title(ds)
    ax.set_ylabel("test NDCG@10 (mean +- sd over seeds)")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def report(out: pathlib.Path, replicates: int) -> None:
  """Writes tune.md, report.md, report.json and report.png under ``out`` from the results files there."""
  out.mkdir(parents=True, exist_ok=True)
  (out / "tune.md").write_text(tune_report(out))
  summary = grid_summary(out, replicates)
  summary["recall"] = recall_summary(out, replicates)
  summary["repeats"] = _load(out, "repeats")
  (out / "report.json").write_text(json.dumps(summary, indent=1) + "\n")
  (out / "report.md").write_text(grid_report(summary))
  if summary["cells"]:
    plot(summary, out / "report.png")
  print(f"wrote {out / 'tune.md'}, {out / 'report.md'}, {out / 'report.json'}", flush=True)


# ------------------------------------------------------------------------------------------------------- main


def _seeds() -> list[int]:
  try:
    return [int(s) for s in _SEEDS.value]
  except ValueError:
    raise UserError(f"--seeds must be integers separated by commas, got {','.join(_SEEDS.value)!r}") from None


def main(argv):
  commands = ("tune", "grid", "recall", "repeats", "report")
  if len(argv) != 2 or argv[1] not in commands:
    raise UserError(f"usage: python -m experiments.study {{{'|'.join(commands)}}} [flags]; got {' '.join(argv[1:])!r}")
  unknown = [d for d in _DATASETS.value if d not in study_config.DATASETS]
  if unknown:
    raise UserError(f"unknown dataset {unknown[0]!r}; expected some of {', '.join(study_config.DATASETS)}")
  bad = [r for r in _RECIPES.value if r not in RECIPES]
  if bad:
    raise UserError(f"unknown recipe {bad[0]!r}; expected some of {', '.join(RECIPES)}")
  seeds = _seeds()
  runs_root, results_root = pathlib.Path(_RUNS.value).resolve(), pathlib.Path(_RESULTS.value).resolve()
  bad = [p for p in _POINTS.value if p not in SWEEP and p not in USER_SWEEP]
  if bad:
    raise UserError(f"unknown sweep point {bad[0]!r}; expected some of {', '.join([*SWEEP, *USER_SWEEP])}")
  if argv[1] == "tune":
    execute(tune_runs(_DATASETS.value, runs_root, results_root, _POINTS.value), _DRY_RUN.value)
  elif argv[1] == "grid":
    execute(grid_runs(_DATASETS.value, _RECIPES.value, seeds, runs_root, results_root), _DRY_RUN.value)
  elif argv[1] == "recall":
    run_recall(grid_runs(_DATASETS.value, _RECIPES.value, seeds, runs_root, results_root), results_root)
  elif argv[1] == "repeats":
    run_repeats(grid_runs(_DATASETS.value, list(REPEAT_RECIPES), seeds, runs_root, results_root), results_root)
  else:
    report(results_root, _BOOTSTRAP.value)


def run():
  def guarded(argv):
    try:
      main(argv)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(e.exit_code)

  app.run(guarded, flags_parser=errors.parse_flags_or_exit)


if __name__ == "__main__":
  run()
