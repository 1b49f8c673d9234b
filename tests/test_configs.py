"""Every experiment config loads and passes validation; the variants differ from their base as intended."""

import importlib
import pathlib
import re

import pytest

from recgpt_jax import config as config_lib
from recgpt_jax.errors import ConfigError

CONFIGS = sorted(
  p.stem for p in (pathlib.Path(__file__).parents[1] / "experiments" / "configs").glob("*.py") if p.stem != "__init__"
)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_valid(name):
  c = importlib.import_module(f"experiments.configs.{name}").get_config()
  config_lib.validate(c)
  assert set(c.keys()) == set(config_lib.base_config().keys())  # no field added outside the schema


def test_variants():
  get = lambda n: importlib.import_module(f"experiments.configs.{n}").get_config()
  base = get("beauty_recgpt")
  assert base.recall.quotas == (18, 2) and base.prompt.mode == "last" and base.prompt.width == 1
  assert get("beauty_recgpt_interleave").prompt.mode == "interleave"
  assert get("beauty_recgpt_hardneg").prompt.hard_negative_weight > 0
  assert get("beauty_recgpt_flow").model.attention == "flow"
  assert get("beauty_pretrain_ce_flow").model.attention == "flow"
  # A prompt-tuning config keeps the architecture of the pre-training config it starts from.
  assert base.model.to_dict() == get("beauty_pretrain_ce").model.to_dict()


@pytest.mark.parametrize(
  ("field", "value"),
  [
    ("train.log_every_steps", 0),  # was: ZeroDivisionError in the first step's report
    ("train.keep_checkpoints", 0),  # was: no checkpoint kept at all
    ("train.max_steps", -5),  # was: exit 0 with untrained results
    ("train.checkpoint_every_steps", -1),
    ("train.eval_every_epochs", 0),
    ("train.patience", -1),
  ],
)
def test_validate_rejects_values_that_break_a_run(field, value):
  c = config_lib.base_config()
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(ConfigError, match=rf"^{re.escape(field)} must be >= \d.*got {value}$"):
    config_lib.validate(c)


def test_catalogue_smaller_than_k_is_refused_before_training(tmp_path):
  """15 items but K = 20 recalled per user: one ConfigError when the data is loaded (it used to train a whole epoch
  and then fail inside the top-k), and the workdir is never created."""
  from recgpt_jax.train import loop
  from tests.helpers import tiny_config, write_cyclic_dataset

  data = write_cyclic_dataset(tmp_path / "small.txt", num_users=30, num_items=15)
  with pytest.raises(ConfigError, match=r"data has 15 items, fewer than the K = sum\(recall.quotas\) = 20"):
    loop.train_and_evaluate(tiny_config(data), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  config_lib.check_catalogue(tiny_config(data, **{"recall.quotas": (10, 5)}), 15)  # K = 15 fits
  with pytest.raises(ConfigError, match="K = sum"):
    config_lib.check_catalogue(tiny_config(data, **{"recall.quotas": (10, 6)}), 15)
