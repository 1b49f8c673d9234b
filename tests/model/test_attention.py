"""Attention kernels against direct per-position implementations of their formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recgpt_jax.errors import ConfigError
from recgpt_jax.model import attention


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def flow_loop(q, k, v, seq_ids):
  """The reference formulas, one position at a time, in float64 NumPy. q, k, v: [h, len, d]."""
  eps = attention.FLOW_EPS
  h, length, d = q.shape
  out = np.zeros_like(q, dtype=np.float64)
  for head in range(h):
    qs, ks, vv = _sigmoid(q[head].astype(np.float64)), _sigmoid(k[head].astype(np.float64)), v[head]
    for i in range(length):
      if seq_ids[i] == 0:
        continue
      prefix = [j for j in range(i + 1) if seq_ids[j] == seq_ids[i]]
      # Per-position flows of every prefix token j (each with its own prefix).
      n, inflow, outflow, src = {}, {}, {}, {}
      for j in prefix:
        pj = [t for t in prefix if t <= j]
        n[j] = len(pj)
        inflow[j] = n[j] / np.dot(qs[j] + eps, ks[pj].sum(0) + eps)
        outflow[j] = n[j] / np.dot(ks[j] + eps, qs[pj].sum(0) + eps)
      for j in prefix:
        pj = [t for t in prefix if t <= j]
        src[j] = np.clip(np.dot(ks[j] + eps, sum(qs[t] * inflow[t] for t in pj) + eps) / n[j], -1, 1)
      sink = np.dot(qs[i] + eps, sum(ks[t] * outflow[t] for t in prefix) + eps) / n[i]
      alloc = _sigmoid(sink)
      acc = np.zeros(d)
      for j in prefix:
        comp_j = n[j] * np.exp(src[j]) / sum(np.exp(src[t]) for t in prefix if t <= j)
        acc += np.dot(qs[i] * inflow[i] / n[i], ks[j]) * vv[j] * comp_j
      out[head, i] = alloc * acc
  return out


def softmax_loop(q, k, v, seq_ids):
  h, length, d = q.shape
  out = np.zeros_like(q, dtype=np.float64)
  for head in range(h):
    for i in range(length):
      if seq_ids[i] == 0:
        continue
      prefix = [j for j in range(i + 1) if seq_ids[j] == seq_ids[i]]
      logits = np.array([np.dot(q[head, i], k[head, j]) / np.sqrt(d) for j in prefix])
      w = np.exp(logits - logits.max())
      w /= w.sum()
      out[head, i] = sum(wj * v[head, j] for wj, j in zip(w, prefix, strict=False))
  return out


SEQ_IDS = np.array([[1, 1, 1, 1, 2, 2, 2, 0, 3, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])


@pytest.mark.parametrize(("kind", "loop"), [("flow", flow_loop), ("softmax", softmax_loop)])
def test_kernel_matches_per_position_loop(kind, loop):
  rng = np.random.default_rng(0)
  b, h, length, d = 2, 2, SEQ_IDS.shape[1], 4
  q, k, v = (rng.normal(size=(b, h, length, d)).astype(np.float32) * 2 for _ in range(3))
  mask = attention.causal_packed_mask(jnp.asarray(SEQ_IDS))
  fn = attention.flow_attention if kind == "flow" else attention.softmax_attention
  got = np.asarray(fn(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask))
  for row in range(b):
    want = loop(q[row], k[row], v[row], SEQ_IDS[row])
    np.testing.assert_allclose(got[row], want, rtol=1e-4, atol=1e-5)
  # Padding positions output exactly zero.
  assert np.all(got[0, :, SEQ_IDS[0] == 0] == 0)


def test_mask_blocks_users_and_future():
  mask = np.asarray(attention.causal_packed_mask(jnp.asarray(SEQ_IDS[:1])))[0, 0]
  assert mask[2, 0] and mask[2, 2] and not mask[2, 3]  # causal within user 1
  assert not mask[4, 3] and mask[5, 4]  # user 2 cannot see user 1
  assert not mask[7].any() and not mask[:, 7].any()  # padding attends / is attended by nothing
  assert mask[8, 8] and not mask[8, 6]


def test_dropout_identity_without_key_and_scaled_with_key():
  x = jnp.ones((1000,))
  assert jnp.all(attention.dropout(x, 0.5, None) == x)
  y = attention.dropout(x, 0.5, jax.random.key(0))
  assert set(np.unique(np.asarray(y)).tolist()) <= {0.0, 2.0}
  assert 400 < int(jnp.sum(y > 0)) < 600


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_keep_mask_rate_and_independence(rate):
  """Counter-hash dropout masks: kept fraction within 5 standard deviations of 1 - rate, two keys agree as
  independent draws would (p^2 + (1-p)^2), neighbouring entries and rows are uncorrelated, same key = same mask."""
  shape = (400, 500)
  n = shape[0] * shape[1]
  a = np.asarray(attention.keep_mask(jax.random.key(0), rate, shape))
  b = np.asarray(attention.keep_mask(jax.random.key(1), rate, shape))
  keep = 1.0 - rate
  sd = (keep * rate / n) ** 0.5
  assert abs(a.mean() - keep) < 5 * sd
  assert abs((a == b).mean() - (keep**2 + rate**2)) < 5 * (0.25 / n) ** 0.5 + 1e-3
  flat = a.ravel().astype(np.float64)
  for lag in (1, shape[1]):  # next element, next row
    assert abs(np.corrcoef(flat[:-lag], flat[lag:])[0, 1]) < 0.02
  np.testing.assert_array_equal(a, np.asarray(attention.keep_mask(jax.random.key(0), rate, shape)))
  folded = np.asarray(attention.keep_mask(jax.random.fold_in(jax.random.key(0), 1), rate, shape))
  assert abs((a == folded).mean() - (keep**2 + rate**2)) < 5 * (0.25 / n) ** 0.5 + 1e-3


def _qkv(seed=0, b=2, h=2, d=8):
  rng = np.random.default_rng(seed)
  length = SEQ_IDS_LONG.shape[1]
  return [jnp.asarray(rng.normal(size=(b, h, length, d)).astype(np.float32)) for _ in range(3)]


# Three users, padding between and after them; length not a multiple of anything.
SEQ_IDS_LONG = np.array([[1] * 6 + [2] * 5 + [0] + [3] * 6 + [0] * 2, [1] * 20])


def test_dot_product_attention_form_equals_xla_form():
  """The cuDNN route's layout and packed-row mask, run through jax.nn.dot_product_attention's XLA backend on CPU
  (the cuDNN kernel itself is compared on a GPU by experiments/gpu_check.py)."""
  q, k, v = _qkv()
  seq = jnp.asarray(SEQ_IDS_LONG)
  want = attention.softmax_attention(q, k, v, attention.causal_packed_mask(seq))
  got = attention.softmax_dot_product_attention(q, k, v, seq, implementation="xla")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(got)[0, :, SEQ_IDS_LONG[0] == 0] == 0)


def test_splash_attention_equals_xla_form_in_interpret_mode():
  """The TPU splash kernel (Pallas interpreter on CPU): forward and gradients equal the XLA form."""
  q, k, v = _qkv(1)
  seq = jnp.asarray(SEQ_IDS_LONG)
  probe = jnp.asarray(np.random.default_rng(2).normal(size=q.shape).astype(np.float32))

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * probe)

  xla = lambda q, k, v: attention.softmax_attention(q, k, v, attention.causal_packed_mask(seq))  # noqa: E731
  splash = lambda q, k, v: attention.softmax_splash(q, k, v, seq, interpret=True)  # noqa: E731
  np.testing.assert_allclose(splash(q, k, v), xla(q, k, v), rtol=1e-5, atol=1e-6)
  got, want = (jax.grad(loss(fn), argnums=(0, 1, 2))(q, k, v) for fn in (splash, xla))
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_auto_is_decided_in_one_place():
  resolve = attention.resolve_impl
  assert resolve("softmax", "auto", length=4096, dropout=False) == "xla"
  assert resolve("flow", "auto", length=attention.FLOW_CHUNKED_MIN_LEN - 1, dropout=False) == "xla"
  assert resolve("flow", "auto", length=attention.FLOW_CHUNKED_MIN_LEN, dropout=False) == "chunked"
  assert resolve("flow", "auto", length=4096, dropout=True) == "xla"  # only the xla form has weight dropout
  assert resolve("softmax", "cudnn", length=64, dropout=False) == "cudnn"
  with pytest.raises(ValueError, match="dropout"):
    resolve("flow", "chunked", length=64, dropout=True)


@pytest.mark.parametrize(
  ("kind", "impl", "kwargs", "message"),
  [
    ("softmax", "flash", {}, "must be one of"),
    ("softmax", "chunked", {}, "not an implementation of softmax"),
    ("flow", "cudnn", {}, "not an implementation of flow"),
    ("flow", "chunked", {"attn_dropout": 0.1}, "no attention-weight dropout"),
    ("softmax", "cudnn", {"dtype": "float32", "platform": "gpu"}, "needs model.dtype bfloat16"),
    ("softmax", "cudnn", {"dtype": "bfloat16", "platform": "cpu"}, "needs a gpu/cuda device; this run has cpu"),
    ("softmax", "splash", {"platform": "cpu"}, "needs a tpu device"),
    ("mamba", "auto", {}, "model.attention must be"),
  ],
)
def test_impls_a_setting_cannot_run_are_config_errors(kind, impl, kwargs, message):
  with pytest.raises(ConfigError, match=message):
    attention.check_impl(kind, impl, **kwargs)


def test_available_impls_pass_the_check():
  attention.check_impl("softmax", "cudnn", dtype="bfloat16", platform="gpu")
  attention.check_impl("softmax", "splash", platform="tpu")
  attention.check_impl("flow", "chunked", platform="cpu")
  attention.check_impl("softmax", "xla", attn_dropout=0.5, platform="cpu")


def test_splash_attention_under_a_mesh_equals_xla_form():
  """Traced under a 2 x 2 mesh (parallel.mesh.kernel_mesh), the kernel shard_maps itself over `data`: the Mosaic
  kernel cannot be partitioned by the compiler. Value and gradients equal the XLA form (replicas over `model` do
  not double the gradient)."""
  from jax.sharding import NamedSharding, PartitionSpec

  from recgpt_jax.parallel import mesh as mesh_lib

  mesh = jax.make_mesh(
    (2, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=jax.devices()[:4]
  )
  rng = np.random.default_rng(3)
  seq = jnp.asarray(np.repeat(SEQ_IDS_LONG[:1], 4, axis=0))
  q, k, v, w = (jnp.asarray(rng.normal(size=(4, 2, seq.shape[1], 8)).astype(np.float32)) for _ in range(4))

  def splash(q, k, v):
    with mesh_lib.kernel_mesh(mesh, "splash"):
      return jnp.sum(attention.softmax_splash(q, k, v, seq, interpret=True) * w)

  def xla(q, k, v):
    return jnp.sum(attention.softmax_attention(q, k, v, attention.causal_packed_mask(seq)) * w)

  sharded = [jax.device_put(t, NamedSharding(mesh, PartitionSpec("data"))) for t in (q, k, v)]
  got = jax.jit(jax.value_and_grad(splash, argnums=(0, 1, 2)))(*sharded)
  want = jax.value_and_grad(xla, argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, x in zip(got[1], want[1], strict=True):
    np.testing.assert_allclose(g, x, rtol=1e-5, atol=1e-5)
