"""The study's cross-entropy baseline, per dataset: ``--config=experiments/configs/study.py:<dataset>``.

The architecture and optimiser of the pre-train-only model of the RecGPT study (experiments/study.py). Every
recipe of the study starts from this config and overrides what it changes. ``TUNED`` holds each dataset's
values chosen on *valid* NDCG@10 by the sweep ``python -m experiments.study tune`` (experiments/results/study/
tune.md lists every point tried); a dataset not in it uses the Beauty recipe of
experiments/configs/beauty_pretrain_ce.py.
"""

from recgpt_jax.config import base_config

DATASETS = ("Beauty", "Sports_and_Outdoors", "Toys_and_Games", "Yelp")

# Dataset -> {dotted config field: value}, set from the tuning sweep.
TUNED: dict[str, dict] = {}


def base(dataset: str):
  """The untuned baseline: the Beauty cross-entropy recipe on ``dataset``."""
  c = base_config()
  c.name = f"{dataset}_ce"
  c.dataset = dataset
  c.model.hidden = 64
  c.model.num_layers = 2
  c.model.num_heads = 2
  c.model.ffn = 256
  c.model.attention = "softmax"
  c.model.attn_dropout = 0.5
  c.model.hidden_dropout = 0.5
  c.model.user_module = False
  c.train.loss = "ce"
  c.train.num_epochs = 200
  c.train.patience = 10
  c.optimizer.learning_rate = 1e-3
  c.recall.quotas = (20,)
  return c


def set_field(c, dotted: str, value) -> None:
  """``c.<a>.<b> = value`` for a dotted field name."""
  *path, leaf = dotted.split(".")
  for part in path:
    c = c[part]
  c[leaf] = value


def get_config(dataset: str = "Beauty"):
  if dataset not in DATASETS:
    raise ValueError(f"unknown study dataset {dataset!r}; expected one of {DATASETS}")
  c = base(dataset)
  for field, value in TUNED.get(dataset, {}).items():
    set_field(c, field, value)
  return c
