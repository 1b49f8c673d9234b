"""Sharded top-k against the unsharded reference on 8 (and 2) fake CPU devices, and the HLO collective sizes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from recgpt_jax.parallel import hlo
from recgpt_jax.parallel.topk import pad_rows, sharded_top_k

NUM_VALID = 1001  # real rows (id 0 = padding included); not divisible by 2, 4 or 8
DIM = 16
USERS = 8
MESHES = [(1, 8), (2, 4), (4, 2), (8, 1), (1, 2), (2, 1)]  # (data, model); the last two over 2 devices
KS = [1, 5, 20]

top_k = jax.jit(sharded_top_k, static_argnums=2, static_argnames=("mesh", "num_valid", "batch_axis"))


def make_mesh(data: int, model: int) -> jax.sharding.Mesh:
  if jax.device_count() < data * model:
    pytest.skip(f"needs {data * model} devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)")
  return jax.make_mesh(
    (data, model),
    ("data", "model"),
    axis_types=(jax.sharding.AxisType.Auto,) * 2,
    devices=jax.devices()[: data * model],
  )


def reference(queries_ud, table_vd, k, exclude_ue=None, bias_v=None, num_valid=None):
  scores = queries_ud @ table_vd.T
  if bias_v is not None:
    scores = scores + bias_v
  low = jnp.finfo(scores.dtype).min
  scores = scores.at[:, 0].set(low)
  if exclude_ue is not None:
    scores = scores.at[jnp.arange(scores.shape[0])[:, None], exclude_ue].set(low)
  num_valid = table_vd.shape[0] if num_valid is None else num_valid
  scores = jnp.where(jnp.arange(scores.shape[1]) >= num_valid, low, scores)
  return tuple(jax.lax.top_k(scores, k))


def make_inputs(seed: int = 0, integer: bool = False):
  """Table padded to 1008 rows (num_valid 1001), queries, bias and exclusions spread over the shards.

  ``integer``: small-integer values, so that scores are exact and many are tied.
  """
  rng = np.random.default_rng(seed)
  if integer:
    table = rng.integers(-2, 3, size=(40, DIM))[rng.integers(0, 40, size=NUM_VALID)]  # duplicated rows
    queries = rng.integers(-2, 3, size=(USERS, DIM))
    bias = rng.integers(-1, 2, size=NUM_VALID)
  else:
    table = rng.normal(size=(NUM_VALID, DIM))
    queries = rng.normal(size=(USERS, DIM))
    bias = rng.normal(size=NUM_VALID)
  table_vd = pad_rows(jnp.asarray(table, jnp.float32), 8)
  bias_v = jnp.pad(jnp.asarray(bias, jnp.float32), (0, table_vd.shape[0] - NUM_VALID))
  # Per user: 12 random ids over the whole range (every shard), the user's own reference top-3 (so the exclusion
  # changes the answer), a duplicate and 0-padding.
  _, top_uk = reference(jnp.asarray(queries, jnp.float32), table_vd, 3, bias_v=bias_v, num_valid=NUM_VALID)
  exclude = np.zeros((USERS, 20), np.int32)
  exclude[:, :12] = rng.integers(1, NUM_VALID, size=(USERS, 12))
  exclude[:, 12:15] = np.asarray(top_uk)
  exclude[:, 15] = exclude[:, 0]
  exclude[::2, 16] = 7  # shard 0 of every mesh
  return jnp.asarray(queries, jnp.float32), table_vd, bias_v, jnp.asarray(exclude)


def assert_same(got, want):
  got_s, got_i = map(np.asarray, got)
  want_s, want_i = map(np.asarray, want)
  assert got_i.dtype == np.int32
  np.testing.assert_array_equal(got_i, want_i)
  np.testing.assert_allclose(got_s, want_s, rtol=1e-6)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_reference_with_padding_exclusion_and_bias(shape, k):
  mesh = make_mesh(*shape)
  queries_ud, table_vd, bias_v, exclude_ue = make_inputs(seed=k)
  got = top_k(queries_ud, table_vd, k, mesh=mesh, exclude_ue=exclude_ue, bias_v=bias_v, num_valid=NUM_VALID)
  want = reference(queries_ud, table_vd, k, exclude_ue, bias_v, NUM_VALID)
  assert_same(got, want)
  ids_uk = np.asarray(got[1])
  assert ids_uk.min() >= 1 and ids_uk.max() < NUM_VALID
  for ids_k, ex_e in zip(ids_uk, np.asarray(exclude_ue), strict=True):
    assert not set(ids_k) & set(ex_e)
    assert len(set(ids_k)) == k


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_reference_plain(shape):
  """No bias, exclusion or num_valid; eager call."""
  queries_ud, table_vd, _, _ = make_inputs(seed=3)
  got = sharded_top_k(queries_ud, table_vd, 20, mesh=make_mesh(*shape))
  assert_same(got, reference(queries_ud, table_vd, 20))


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_ties_go_to_the_lower_id(shape):
  mesh = make_mesh(*shape)
  queries_ud, table_vd, bias_v, exclude_ue = make_inputs(seed=4, integer=True)
  got = top_k(queries_ud, table_vd, 20, mesh=mesh, exclude_ue=exclude_ue, bias_v=bias_v, num_valid=NUM_VALID)
  want = reference(queries_ud, table_vd, 20, exclude_ue, bias_v, NUM_VALID)
  assert_same(got, want)
  scores_uk = np.asarray(got[0])
  assert (np.diff(scores_uk, axis=1) == 0).mean() > 0.5  # the case is really about ties
  # All rows equal: every score ties, so the answer is the lowest valid ids that are not excluded.
  flat_vd = jnp.ones_like(table_vd)
  exclude = np.zeros((USERS, 3), np.int32)
  exclude[:, 0], exclude[1, 1] = 2, 5
  ids_uk = np.asarray(top_k(queries_ud, flat_vd, 5, mesh=mesh, exclude_ue=jnp.asarray(exclude))[1])
  want_ids = np.tile([1, 3, 4, 5, 6], (USERS, 1))
  want_ids[1] = [1, 3, 4, 6, 7]
  np.testing.assert_array_equal(ids_uk, want_ids)


def test_unsplit_users_and_k_above_shard_size():
  """batch_axis=None, and k larger than the rows of one shard (every shard sends all its rows)."""
  mesh = make_mesh(2, 4)
  queries_ud, table_vd, bias_v, exclude_ue = make_inputs(seed=5)
  small_vd, small_v = table_vd[:16], bias_v[:16]
  ex_ue = jnp.where(exclude_ue < 16, exclude_ue, 0).at[:, 0].set(9)
  got = top_k(queries_ud[:3], small_vd, 6, mesh=mesh, exclude_ue=ex_ue[:3], bias_v=small_v, batch_axis=None)
  assert_same(got, reference(queries_ud[:3], small_vd, 6, ex_ue[:3], small_v))


def test_errors():
  mesh = make_mesh(2, 4)
  queries_ud, table_vd, _, _ = make_inputs()
  with pytest.raises(ValueError, match="not divisible by the 4 shards"):
    sharded_top_k(queries_ud, table_vd[:NUM_VALID], 5, mesh=mesh)
  with pytest.raises(ValueError, match="k=1001 is outside"):
    sharded_top_k(queries_ud, table_vd, NUM_VALID, mesh=mesh, num_valid=NUM_VALID)
  with pytest.raises(ValueError, match="k=0 is outside"):
    sharded_top_k(queries_ud, table_vd, 0, mesh=mesh)
  with pytest.raises(ValueError, match="users are not divisible"):
    sharded_top_k(queries_ud[:3], table_vd, 5, mesh=mesh)
  # The largest valid k works.
  ids_uk = top_k(queries_ud, table_vd, NUM_VALID - 1, mesh=mesh, num_valid=NUM_VALID)[1]
  np.testing.assert_array_equal(np.sort(np.asarray(ids_uk), axis=1), np.tile(np.arange(1, NUM_VALID), (USERS, 1)))


def compiled_text(fn, *args) -> str:
  return jax.jit(fn).lower(*args).compile().as_text()


@pytest.mark.parametrize("k", [5, 20])
@pytest.mark.parametrize("shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gathers_only_k_candidates_per_shard(shape, k):
  data, model = shape
  mesh = make_mesh(data, model)
  queries_ud, table_vd, bias_v, exclude_ue = make_inputs()
  rows = NamedSharding(mesh, P("data", None))
  args = (
    jax.device_put(queries_ud, rows),
    jax.device_put(table_vd, NamedSharding(mesh, P("model", None))),
    jax.device_put(bias_v, NamedSharding(mesh, P("model"))),
    jax.device_put(exclude_ue, rows),
  )
  text = compiled_text(
    lambda q, t, b, e: sharded_top_k(q, t, k, mesh=mesh, exclude_ue=e, bias_v=b, num_valid=NUM_VALID), *args
  )
  found = hlo.collectives(text)
  users_per_device = USERS // data
  if model == 1:
    assert not found  # a plain local top-k
    return
  assert {c.op for c in found} == {"all-gather"}
  per_user = sum(c.result_bytes for c in found) / users_per_device
  assert per_user == k * model * (4 + 4)
  assert sum(c.operand_bytes for c in found) / users_per_device == k * (4 + 4)
  assert hlo.collective_bytes(text) == {"all-gather": k * model * 8 * users_per_device}
  assert all(shape_text.endswith(f"[{users_per_device},{k * model}]") for c in found for shape_text in c.result_shapes)


def test_collective_parser_sees_the_naive_gather():
  """XLA's own partitioning of the reference gathers the scores of the whole table: the parser must see it."""
  mesh = make_mesh(1, 8)
  queries_ud, table_vd, _, _ = make_inputs()
  table_vd = jax.device_put(table_vd, NamedSharding(mesh, P("model", None)))
  text = compiled_text(lambda q, t: reference(q, t, 5), queries_ud, table_vd)
  assert hlo.collective_bytes(text).get("all-gather", 0) >= USERS * table_vd.shape[0] * 4


def test_collective_parser_on_handwritten_hlo():
  text = """
HloModule m

ENTRY %main (p0: f32[4,10], p1: s32[4,10]) -> (f32[4,5], s32[4,5]) {
  %p0 = f32[4,10]{1,0} parameter(0)
  %p1 = s32[4,10]{1,0} parameter(1)
  %ag = (f32[4,40]{0,1}, s32[4,40]{0,1}) all-gather(f32[4,10]{1,0} %p0, s32[4,10]{1,0} %p1), dimensions={1}
  %ags = (f32[4,10]{1,0}, f32[4,40]{1,0}) all-gather-start(%p0), dimensions={1}
  %agd = f32[4,40]{1,0} all-gather-done(%ags)
  %ar = bf16[8]{0} all-reduce(%x), to_apply=%add, metadata={op_name="jit(f)/all-gather(x)"}
  ROOT %t = (f32[4,5]{1,0}, s32[4,5]{1,0}) tuple(%a, %b)
}
"""
  found = hlo.collectives(text)
  assert [(c.op, c.name) for c in found] == [("all-gather", "ag"), ("all-gather", "agd"), ("all-reduce", "ar")]
  assert found[0].result_shapes == ("f32[4,40]", "s32[4,40]")
  assert (found[0].result_bytes, found[0].operand_bytes) == (4 * 40 * 8, 4 * 10 * 8)
  assert (found[1].result_bytes, found[1].operand_bytes) == (4 * 40 * 4, 4 * 10 * 4)
  assert hlo.collective_bytes(text) == {"all-gather": 4 * 40 * 12, "all-reduce": 16}
