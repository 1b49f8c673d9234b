"""Every experiment config loads and passes validation; the variants differ from their base as intended."""

import importlib
import pathlib

import pytest

from recgpt_jax import config as config_lib

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
