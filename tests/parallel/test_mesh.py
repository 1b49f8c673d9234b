"""The mesh and the logical-axis rules built from the config (8 host devices)."""

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from recgpt_jax.config import base_config
from recgpt_jax.errors import ConfigError
from recgpt_jax.model.transformer import ModelConfig, RecGPT
from recgpt_jax.parallel import mesh as mesh_lib


def mesh_cfg(**sizes):
  c = base_config().mesh
  for k, v in sizes.items():
    c[k] = v
  return c


@pytest.mark.parametrize(
  ("sizes", "shape"),
  [({}, (8, 1)), ({"model": 2}, (4, 2)), ({"data": 2, "model": -1}, (2, 4)), ({"data": 1}, (1, 1))],
)
def test_mesh_sizes(sizes, shape):
  m = mesh_lib.make_mesh(mesh_cfg(**sizes))
  assert (m.shape["data"], m.shape["model"]) == shape
  assert m.axis_names == ("data", "model")
  assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)


@pytest.mark.parametrize(
  ("sizes", "message"),
  [
    ({"data": 3, "model": 4}, "must match the 8 devices, got 3 x 4"),
    ({"model": 3}, "must match the 8 devices"),
    ({"data": 4, "model": 4}, "must match"),
    ({"data_slices": 2}, "span 1 processes"),
  ],
)
def test_mesh_errors(sizes, message):
  with pytest.raises(ConfigError, match=message):
    mesh_lib.make_mesh(mesh_cfg(**sizes))


def test_rules_map_logical_axes():
  rules = base_config().mesh.rules
  assert mesh_lib.spec_for(("vocab", "embed"), rules) == P("model", None)
  assert mesh_lib.spec_for(("batch", "vocab"), rules) == P("data", "model")
  assert mesh_lib.spec_for(("vocab", "vocab"), rules) == P("model", None)  # a mesh axis is used once
  assert mesh_lib.spec_for(None, rules) == P()
  with pytest.raises(ConfigError, match="no mesh rule for the logical axis 'experts'"):
    mesh_lib.spec_for(("experts",), rules)


def test_model_parameters_carry_logical_axes():
  model = RecGPT(
    ModelConfig(num_items=30, num_users=5, max_len=8, hidden=16, ffn=32, untied_head=True), rngs=nnx.Rngs(0)
  )
  specs = mesh_lib.param_specs(model, base_config().mesh.rules)
  assert specs["item_embed"]["embedding"] == P("model", None)
  assert specs["head"]["kernel"] == P(None, "model")
  assert specs["head"]["bias"] == P("model")
  assert specs["blocks"][0]["ffn_in"]["kernel"] == P(None, None)
  assert specs["user_embed"]["embedding"] == P(None, None)
  # Another rule set shards the feed-forward layers over `model` instead.
  rules = (*base_config().mesh.rules[:4], ("mlp", "model"), ("heads", None), ("positions", None))
  assert mesh_lib.param_specs(model, rules)["blocks"][0]["ffn_in"]["kernel"] == P(None, "model")
