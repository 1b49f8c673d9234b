"""Incremental decoding equals re-encoding the extended sequences with the full model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recgpt_jax.data import packing, split
from recgpt_jax.model import decode
from recgpt_jax.model.transformer import ModelConfig, RecGPT

KINDS = [("softmax", "post"), ("flow", "post"), ("flow", "pre"), ("softmax", "pre")]
# float32 with matmul precision "highest" (tests/conftest.py); the decode path sums in another order.
ATOL, RTOL = 1e-5, 1e-5
# Histories of different lengths; 11 + 3 appended tokens runs past max_len (positions are clipped).
HISTORIES = [[3, 4, 5, 6, 7], [8, 9], [1, 2, 3, 4, 5, 6, 7], [10, 11, 12], [13], [14, 15, 16, 17], list(range(1, 12))]
STEPS = 3


def noisy_model(
  kind: str, norm: str, num_layers: int = 2, seed: int = 0, **settings
) -> tuple[RecGPT, nnx.GraphDef, dict]:
  """A tiny model whose parameters are pushed far from init, so attention is far from uniform."""
  cfg = ModelConfig(
    num_items=30,
    num_users=8,
    max_len=12,
    hidden=16,
    num_layers=num_layers,
    num_heads=2,
    ffn=32,
    attention=kind,
    norm=norm,
    **settings,
  )
  graphdef, state = nnx.split(RecGPT(cfg, rngs=nnx.Rngs(seed)))
  params = nnx.to_pure_dict(state)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [p + 0.5 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys, strict=True)]
  params = jax.tree.unflatten(tree, leaves)
  return nnx.merge(graphdef, params), graphdef, params


def eval_batch(histories, row_len: int = 16, rows: int = 3, users_per_batch: int = 8) -> dict[str, np.ndarray]:
  """One packed evaluation batch (several users per row, an empty slot at the end)."""
  eval_set = split.EvalSet(
    users=np.arange(1, len(histories) + 1, dtype=np.int32),
    windows=[np.asarray(h, np.int32) for h in histories],
    answers=np.full(len(histories), 29, np.int32),
    histories=[np.asarray(h, np.int32) for h in histories],
  )
  batches = packing.pack_eval_batches(eval_set, row_len=row_len, rows_per_batch=rows, users_per_batch=users_per_batch)
  assert len(batches) == 1
  return batches[0]


def full_model_outputs(model, histories, appended, users=None, row_len: int = 16) -> list[np.ndarray]:
  """Runs the model on each history extended by ``appended[u]`` (segment 1); returns per-user outputs.

  User ids are ``users`` (default 1..N, as in ``eval_batch``).
  """
  users = np.arange(1, len(histories) + 1) if users is None else np.asarray(users)
  seqs = [list(h) + list(a) for h, a in zip(histories, appended, strict=True)]
  segs = [[0] * len(h) + [1] * len(a) for h, a in zip(histories, appended, strict=True)]
  lengths = np.array([len(s) for s in seqs])
  place = packing.first_fit(lengths, row_len=row_len, rows_per_batch=len(seqs))
  rows = packing.scatter_rows(
    lengths,
    place.row,
    place.col,
    place.seq_id,
    {"items": np.concatenate(seqs), "seg": np.concatenate(segs)},
    {"users": users},
    rows_per_batch=len(seqs),
    row_len=row_len,
  )
  hidden = np.asarray(model(rows["items"], rows["positions"], rows["seg"], rows["seq_ids"], rows["users"]))
  return [hidden[place.row[u], place.col[u] : place.col[u] + lengths[u]] for u in range(len(seqs))]


@functools.cache
def decode_fn(graphdef):
  """Jitted prefill + ``lax.scan`` of decode steps (segment 1, next position) -> ``[steps + 1, U, hidden]``."""

  @jax.jit
  def run(params, batch, appended_su):
    model = nnx.merge(graphdef, params)
    args = (batch[k] for k in ("items", "positions", "segments", "seq_ids", "users", "last_row", "last_col"))
    hidden, state = decode.prefill(model, *args, max_steps=appended_su.shape[0])

    def step(state, items_u):
      h, state = decode.decode_step(model, state, items_u, jnp.ones_like(items_u), state.position + 1, state.user)
      return state, h

    _, hs = jax.lax.scan(step, state, appended_su)
    return jnp.concatenate([hidden[None], hs], axis=0)

  return run


def run_decode(graphdef, params, batch, appended_su) -> np.ndarray:
  return np.asarray(decode_fn(graphdef)(params, batch, appended_su))


# Two layers cover both prefill paths (inner layers: every position; last layer: users' last positions).
# The chunked Flow-Attention prefill (chunks of 4, users crossing chunks) continues like the quadratic full model.
@pytest.mark.parametrize(
  ("kind", "norm", "num_layers", "impl"),
  [(k, n, 2, "xla") for k, n in KINDS] + [("flow", "post", 1, "xla"), ("flow", "post", 2, "chunked")],
)
def test_prefill_and_decode_match_full_model(kind, norm, num_layers, impl):
  model, _, params = noisy_model(kind, norm, num_layers)
  _, graphdef, _ = noisy_model(kind, norm, num_layers, attention_impl=impl, flow_chunk=4)
  batch = eval_batch(HISTORIES)
  assert np.max(batch["seq_ids"]) >= 2  # several users share a row
  num_users = len(HISTORIES)
  slots = batch["answer"].shape[0]
  appended_su = np.random.default_rng(0).integers(1, 31, size=(STEPS, slots)).astype(np.int32)
  hidden_sud = run_decode(graphdef, params, batch, appended_su)
  expected = full_model_outputs(model, HISTORIES, [appended_su[:, u] for u in range(num_users)])
  for u, hist in enumerate(HISTORIES):
    # Outputs at the last history position, then at each appended token.
    want = expected[u][len(hist) - 1 :]
    np.testing.assert_allclose(hidden_sud[:, u], want, atol=ATOL, rtol=RTOL, err_msg=f"user {u}")
  assert np.all(np.isfinite(hidden_sud))


def test_decode_sees_the_appended_item():
  model, graphdef, params = noisy_model("flow", "post")
  batch = eval_batch(HISTORIES)
  a = run_decode(graphdef, params, batch, np.full((1, 8), 3, np.int32))
  b = run_decode(graphdef, params, batch, np.full((1, 8), 4, np.int32))
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.allclose(a[1, : len(HISTORIES)], b[1, : len(HISTORIES)])


def _shapes(tree):
  return [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]


def test_flow_state_size_is_constant():
  model, _, _ = noisy_model("flow", "post")
  batch = eval_batch(HISTORIES)
  args = [jnp.asarray(batch[k]) for k in ("items", "positions", "segments", "seq_ids", "users", "last_row", "last_col")]

  def run(num_steps: int, max_steps: int):
    _, state = decode.prefill(model, *args, max_steps=max_steps)
    ones = jnp.ones_like(state.user)
    for _ in range(num_steps):
      _, state = decode.decode_step(model, state, ones, ones, state.position + 1, state.user)
    return state

  s0 = jax.eval_shape(lambda: run(0, 2))
  assert _shapes(s0) == _shapes(jax.eval_shape(lambda: run(0, 50)))
  assert _shapes(s0) == _shapes(jax.eval_shape(lambda: run(5, 5)))
  vec, rows = (8, 2, 8), (3, 2, 16, 8)  # [U, heads, head_dim], [R, heads, row_len, head_dim]
  want = dict(cs_k=vec, cs_q=vec, cs_kout=vec, cs_qin=vec, cs_exp=(8, 2), kv=(8, 2, 8, 8), keys=rows, comp_v=rows)
  assert {name: x.shape for name, x in s0.layers[0].items()} == want
  # A single appended token needs no appended-token matrix.
  assert jax.eval_shape(lambda: run(1, 1)).layers[0]["kv"] is None


def test_softmax_cache_has_room_for_max_steps():
  model, _, _ = noisy_model("softmax", "post", num_layers=1)
  batch = eval_batch(HISTORIES)
  args = [jnp.asarray(batch[k]) for k in ("items", "positions", "segments", "seq_ids", "users", "last_row", "last_col")]
  _, state = decode.prefill(model, *args, max_steps=4)
  assert state.layers[0]["k"].shape == (3, 2, 16, 8)  # the rows: [R, heads, row_len, head_dim]
  assert state.layers[0]["k_new"].shape == (8, 2, 4, 8)  # [U, heads, max_steps, head_dim]
  np.testing.assert_array_equal(np.asarray(state.length)[: len(HISTORIES)], [len(h) for h in HISTORIES])
  # Each real user owns its (row, slot); the trailing empty slot does not displace user 0.
  owner = np.asarray(state.owner)
  for u in range(len(HISTORIES)):
    assert owner[int(state.row[u]), int(state.slot[u])] == u
