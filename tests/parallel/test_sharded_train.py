"""Both training stages on 8 host devices: meshes 4x2, 2x4 and 8x1 against the 1-device run.

The item table (vocabulary 32 = 30 items + padding row, padded to a multiple of 8) is split over `model`,
the batch rows over `data`. After 3 steps the loss of every step and every parameter must equal the
1-device run within float32 reduction-order noise: losses to 1e-5 relative; parameters to 1e-5 absolute,
1e-3 of the learning rate (1e-2): Adam divides by sqrt(v), so a gradient of a few 1e-8 summed in another
order can move a parameter by ~1e-6, while a lost or doubled shard moves it by ~lr.
"""

import jax
import numpy as np
import pytest

from recgpt_jax.recall import decoder
from recgpt_jax.train import loop
from tests.helpers import tiny_config, write_cyclic_dataset

MESHES = [(4, 2), (2, 4), (8, 1)]
STEPS = 3
# name -> (stage, config overrides). With the sampled (bce) loss the item table, split over `model`, is also
# updated by row (recgpt_jax.train.rows); the user table is in every case.
STAGES = {
  "pretrain": ("pretrain", {}),
  "prompt_tune": ("prompt_tune", {}),
  "pretrain_bce": ("pretrain", {"train.loss": "bce"}),
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return write_cyclic_dataset(tmp_path_factory.mktemp("data") / "cyclic.txt")


def run_steps(config, workdir, stage):
  run = loop.Run(config, workdir, stage)
  state = run.state
  it = run.train_input.epoch_iterator(0)
  losses = []
  for _ in range(STEPS):
    state, metrics = run.train_step(state, next(it))
    losses.append(float(metrics["loss"]))
  return run, losses, state.params


@pytest.fixture(scope="module")
def single(dataset, tmp_path_factory):
  out = {}
  for name, (stage, overrides) in STAGES.items():
    cfg = tiny_config(dataset, **{"init_from": "unused", **overrides})
    _, losses, params = run_steps(cfg, tmp_path_factory.mktemp(f"one_{name}"), stage)
    out[name] = (losses, jax.device_get(params))
  return out


@pytest.mark.parametrize("name", list(STAGES))
@pytest.mark.parametrize(("data", "model"), MESHES)
def test_sharded_steps_equal_one_device(dataset, tmp_path, single, name, data, model):
  stage, overrides = STAGES[name]
  cfg = tiny_config(dataset, **{"init_from": "unused", "mesh.data": data, "mesh.model": model, **overrides})
  run, losses, params = run_steps(cfg, tmp_path / "run", stage)
  assert run.mesh.shape == {"data": data, "model": model}
  table = params["item_embed"]["embedding"]
  assert table.sharding.spec[0] == "model"
  assert {s.data.shape for s in table.addressable_shards} == {(32 // model, 16)}
  ref_losses, ref_params = single[name]
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  flat, ref_flat = jax.tree_util.tree_leaves_with_path(jax.device_get(params)), jax.tree.leaves(ref_params)
  for (path, a), b in zip(flat, ref_flat, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize(("data", "model"), MESHES)
def test_sharded_evaluation_and_recall_equal_one_device(dataset, tmp_path, data, model):
  """Evaluation (full ranking and two-step recall) on a mesh ranks exactly like one device.

  The real vocabulary (31 ids) does not divide over the shards; the table is padded to 32 rows.
  """
  overrides = {"recall.quotas": (4, 2), "eval.metric": "NDCG@5", "model.untied_head": True, "train.head": "untied"}
  one = loop.Run(tiny_config(dataset, **overrides), tmp_path / "one")
  many = loop.Run(tiny_config(dataset, **overrides, **{"mesh.data": data, "mesh.model": model}), tmp_path / "many")
  params = jax.device_get(one.state.params)
  params["head"]["bias"] = np.random.default_rng(0).normal(size=params["head"]["bias"].shape).astype(np.float32)
  sharded = jax.device_put(params, many.state_sharding.params)
  assert tuple(sharded["head"]["kernel"].sharding.spec) == (None, "model")
  for stage in ("valid", "test"):  # two-step recall lists
    assert many.evaluate(sharded, stage) == pytest.approx(one.evaluate(params, stage), abs=1e-6)
  del overrides["recall.quotas"], overrides["eval.metric"]  # full ranking (top-20 of the whole catalogue)
  one_full = loop.Run(tiny_config(dataset, **overrides), tmp_path / "one_full")
  many_full = loop.Run(tiny_config(dataset, **overrides, **{"mesh.data": data, "mesh.model": model}), tmp_path / "mf")
  assert many_full.evaluate(sharded, "test") == pytest.approx(one_full.evaluate(params, "test"), abs=1e-6)
  batches = one.eval_batches["test"]
  plain = decoder.recall_all(decoder.make_recall_fn(one.graphdef, (4, 2), "untied"), params, batches)
  on_mesh = decoder.recall_all(decoder.make_recall_fn(many.graphdef, (4, 2), "untied", many.mesh), sharded, batches)
  np.testing.assert_array_equal(on_mesh["items"], plain["items"])
  np.testing.assert_allclose(on_mesh["scores"], plain["scores"], rtol=1e-5, atol=1e-6)
  assert (on_mesh["items"] <= 30).all() and (on_mesh["items"] >= 1).all()
