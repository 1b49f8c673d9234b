"""Model invariances: causality, packing and padding invariance, heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recgpt_jax.model.transformer import ModelConfig, RecGPT

KINDS = [("softmax", "post"), ("flow", "post"), ("flow", "pre"), ("softmax", "pre")]


def _model(kind, norm, **kw):
  cfg = ModelConfig(
    num_items=30,
    num_users=6,
    max_len=8,
    hidden=16,
    num_layers=2,
    num_heads=2,
    ffn=32,
    attention=kind,
    norm=norm,
    **kw,
  )
  return RecGPT(cfg, rngs=nnx.Rngs(0))


def _row(users_items, length):
  """Packs [(user, [items...]), ...] into one row of ``length``: (items, positions, segments, seq_ids, users)."""
  items, pos, seq, usr = [], [], [], []
  for slot, (user, its) in enumerate(users_items, start=1):
    items += its
    pos += list(range(len(its)))
    seq += [slot] * len(its)
    usr += [user] * len(its)
  pad = length - len(items)
  arrs = [items + [0] * pad, pos + [0] * pad, [0] * length, seq + [0] * pad, usr + [0] * pad]
  return [jnp.asarray([a], dtype=jnp.int32) for a in arrs]


@pytest.mark.parametrize(("kind", "norm"), KINDS)
def test_causal(kind, norm):
  model = _model(kind, norm)
  base = _row([(1, [3, 4, 5, 6, 7])], 8)
  changed = list(base)
  changed[0] = base[0].at[0, 3].set(20)  # change the 4th item
  h0, h1 = model(*base), model(*changed)
  np.testing.assert_array_equal(np.asarray(h0[0, :3]), np.asarray(h1[0, :3]))
  assert not np.allclose(np.asarray(h0[0, 3:5]), np.asarray(h1[0, 3:5]))


@pytest.mark.parametrize(("kind", "norm"), KINDS)
def test_packing_and_padding_invariance(kind, norm):
  model = _model(kind, norm)
  alone = model(*_row([(2, [5, 6, 7])], 4))[0, :3]
  alone_long_pad = model(*_row([(2, [5, 6, 7])], 12))[0, :3]
  packed = model(*_row([(1, [9, 10, 11, 12]), (2, [5, 6, 7]), (3, [1, 2])], 12))[0, 4:7]
  np.testing.assert_allclose(np.asarray(alone_long_pad), np.asarray(alone), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(packed), np.asarray(alone), rtol=1e-5, atol=1e-6)


def test_user_module_and_segments_change_output():
  model = _model("softmax", "post")
  a = model(*_row([(1, [3, 4])], 4))
  b = model(*_row([(2, [3, 4])], 4))
  assert not np.allclose(np.asarray(a[0, :2]), np.asarray(b[0, :2]))
  no_user = _model("softmax", "post", user_module=False)
  np.testing.assert_array_equal(
    np.asarray(no_user(*_row([(1, [3, 4])], 4))[0, :2]), np.asarray(no_user(*_row([(2, [3, 4])], 4))[0, :2])
  )
  row = _row([(1, [3, 4])], 4)
  seg = list(row)
  seg[2] = row[2].at[0, 0].set(1)
  assert not np.allclose(np.asarray(model(*row)[0, :2]), np.asarray(model(*seg)[0, :2]))


def test_heads():
  model = _model("flow", "post", untied_head=True)
  h = model(*_row([(1, [3, 4, 5])], 4))
  tied = model.logits(h)
  assert tied.shape == (1, 4, 31)
  np.testing.assert_allclose(np.asarray(tied), np.asarray(h @ model.item_embed.embedding[...].T), rtol=1e-5, atol=1e-7)
  assert model.logits(h, "untied").shape == (1, 4, 31)
  with pytest.raises(ValueError, match="untied head"):
    _model("flow", "post").logits(h, "untied")


def test_dropout_is_keyed():
  model = _model("softmax", "post", attn_dropout=0.3, hidden_dropout=0.3)
  row = _row([(1, [3, 4, 5])], 4)
  a = model(*row, dropout_key=jax.random.key(1))
  b = model(*row, dropout_key=jax.random.key(1))
  c = model(*row, dropout_key=jax.random.key(2))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a[0, :3]), np.asarray(c[0, :3]))


def test_bad_config():
  with pytest.raises(ValueError, match="attention"):
    ModelConfig(num_items=3, num_users=1, attention="linear")
  with pytest.raises(ValueError, match="divisible"):
    RecGPT(ModelConfig(num_items=3, num_users=1, hidden=10, num_heads=3), rngs=nnx.Rngs(0))


def test_user_dropout_drops_whole_users():
  model = _model("softmax", "post", user_dropout=0.5)
  row = _row([(1, [3, 4, 5]), (2, [6, 7]), (3, [8, 9])], 8)
  unknown = list(row)
  unknown[4] = jnp.zeros_like(row[4])  # every token as the unknown user 0
  h_known, h_unknown = model(*row), model(*unknown)
  dropped_any = kept_any = False
  for seed in range(8):
    h = model(*row, dropout_key=jax.random.key(seed))
    # With other dropouts off, each user's tokens equal either the known-user or the unknown-user output.
    for sl in (slice(0, 3), slice(3, 5), slice(5, 7)):
      if np.allclose(np.asarray(h[0, sl]), np.asarray(h_unknown[0, sl]), atol=1e-6):
        dropped_any = True
      else:
        np.testing.assert_allclose(np.asarray(h[0, sl]), np.asarray(h_known[0, sl]), atol=1e-6)
        kept_any = True
  assert dropped_any and kept_any


def test_chunked_flow_model_equals_quadratic_flow_model():
  """attention_impl='chunked' is the same function as the quadratic form: outputs and gradients, with hidden dropout."""
  quadratic = _model("flow", "pre", attention_impl="xla", hidden_dropout=0.2)
  chunked = _model("flow", "pre", attention_impl="chunked", flow_chunk=3, hidden_dropout=0.2)
  row = _row([(1, [3, 4, 5, 6]), (2, [7, 8]), (3, [9, 10, 11, 12, 13])], 14)  # users cross chunks of 3
  key = jax.random.key(3)

  def loss(model):
    return jnp.sum(jnp.sin(model(*row, dropout_key=key)))

  (l1, g1), (l2, g2) = (nnx.value_and_grad(loss)(m) for m in (quadratic, chunked))
  np.testing.assert_allclose(l2, l1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(g1)), jax.tree.leaves(nnx.to_pure_dict(g2)), strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
