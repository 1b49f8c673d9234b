"""The linear-time chunked Flow-Attention against the quadratic parallel form it replaces."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recgpt_jax.model import attention, flow_chunked

# float32 with matmul precision "highest" (tests/conftest.py); the two forms sum in different orders.
RTOL = ATOL = 1e-5
LENGTH = 61  # not a multiple of any chunk size below


def _row(*runs: tuple[int, int]) -> list[int]:
  """A row of ``seq_ids`` from ``(id, count)`` runs."""
  return [i for i, count in runs for _ in range(count)]


SEQ_IDS = np.array(
  [
    # Padding first, in the middle and at the end; users of 5, 20 (several chunks), 9 and 12 tokens.
    _row((0, 2), (1, 5), (2, 20), (0, 3), (3, 9), (4, 12), (0, 10)),
    # One user over the whole row.
    _row((1, LENGTH)),
    # All padding.
    _row((0, LENGTH)),
    # Many short users, one-token users and padding between, ending with a user at the last position.
    _row((1, 1), (2, 2), (0, 1), (3, 3), (4, 1), (5, 7), (0, 2), (6, 17), (7, 4), (0, 1), (8, 21), (9, 1)),
  ],
  dtype=np.int32,
)


def _inputs(seq_ids, heads=2, dim=8, seed=0, scale=2.0):
  rng = np.random.default_rng(seed)
  shape = (seq_ids.shape[0], heads, seq_ids.shape[1], dim)
  return tuple(jnp.asarray(rng.normal(size=shape).astype(np.float32) * scale) for _ in range(3))


@functools.cache
def _chunked(chunk, carry="scan"):
  return jax.jit(functools.partial(flow_chunked.flow_attention_chunked, chunk=chunk, carry=carry))


def _quadratic(q, k, v, seq_ids):
  return attention.flow_attention_parts(q, k, v, attention.causal_packed_mask(seq_ids))


def _with_grads(fn, seq_ids, w):
  """jit of (q, k, v) -> ((y, parts), d<w, y>/d(q, k, v)): the outputs and the gradients in one compile."""

  def loss(q, k, v):
    y, parts = fn(q, k, v, seq_ids)
    return jnp.sum(w * y), (y, parts)

  return jax.jit(lambda q, k, v: jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)[::-1])


def _grad_inputs():
  q, k, v = _inputs(SEQ_IDS)
  w = jnp.asarray(np.random.default_rng(2).normal(size=q.shape).astype(np.float32))
  return q, k, v, jnp.asarray(SEQ_IDS), w


@functools.cache
def _quadratic_with_grads():
  """The reference outputs and gradients, computed once for the parametrised test."""
  q, k, v, seq_ids, w = _grad_inputs()
  return _with_grads(_quadratic, seq_ids, w)(q, k, v)


def _assert_parts_close(got, want, **tol):
  assert set(got) == set(want)
  for name in want:
    assert got[name].shape == want[name].shape and got[name].dtype == want[name].dtype, name
    np.testing.assert_allclose(got[name], want[name], err_msg=name, **tol)


def test_rows_cover_the_cases():
  """The fixture has users crossing chunk boundaries and spanning several chunks for every chunk size."""
  assert LENGTH % 4 and LENGTH % 8 and LENGTH % 16
  assert (SEQ_IDS[0] == 2).sum() > 2 * 8 and (SEQ_IDS[3] == 8).sum() > 16


@pytest.mark.parametrize(("chunk", "carry"), [(4, "scan"), (16, "scan"), (8, "associative")])
def test_outputs_parts_and_gradients_match_quadratic_form(chunk, carry):
  """y, every part and the gradients of a random linear functional of y w.r.t. q, k, v."""
  q, k, v, seq_ids, w = _grad_inputs()
  (want_y, want), want_grads = _quadratic_with_grads()
  chunked = functools.partial(flow_chunked.flow_attention_chunked, chunk=chunk, carry=carry)
  (got_y, got), got_grads = _with_grads(chunked, seq_ids, w)(q, k, v)
  np.testing.assert_allclose(got_y, want_y, rtol=RTOL, atol=ATOL)
  _assert_parts_close(got, want, rtol=RTOL, atol=ATOL)
  assert np.all(np.moveaxis(np.asarray(got_y), 1, 0)[:, SEQ_IDS == 0] == 0)  # padding outputs exactly zero
  for name, g, g_want in zip("qkv", got_grads, want_grads, strict=True):
    np.testing.assert_allclose(g, g_want, rtol=RTOL, atol=ATOL, err_msg=f"d/d{name}")


def test_one_chunk_longer_than_the_row():
  """chunk > len: a single (padded) chunk, nothing carried."""
  q, k, v = _inputs(SEQ_IDS, seed=1)
  seq_ids = jnp.asarray(SEQ_IDS)
  want_y, want = jax.jit(_quadratic)(q, k, v, seq_ids)
  got_y, got = _chunked(64)(q, k, v, seq_ids)
  np.testing.assert_allclose(got_y, want_y, rtol=RTOL, atol=ATOL)
  _assert_parts_close(got, want, rtol=RTOL, atol=ATOL)


def test_bfloat16_inputs_computed_in_float32():
  """bf16 in: y in bf16, the parts (decode state) in float32, everything computed in float32.

  Against the float32 quadratic form on the same (bf16-representable) inputs, the parts agree to float32
  rounding and y differs only by its final rounding to bf16: at most half a unit in the last place of an
  8-bit significand, 2**-8 relative, so ``rtol = 2**-7`` holds with room while a computation in bf16
  (prefix sums of up to 22 terms, each rounded) would not. Against the float32 inputs before their
  rounding to bf16 (2**-8 relative each), that error propagates through the sigmoids and sums: a looser
  2% of the output scale.
  """
  q32, k32, v32 = _inputs(SEQ_IDS, seed=3)
  seq_ids = jnp.asarray(SEQ_IDS)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q32, k32, v32))
  y, parts = _chunked(8)(q, k, v, seq_ids)
  assert y.dtype == jnp.bfloat16

  quadratic = jax.jit(_quadratic)
  want_y, want = quadratic(*(x.astype(jnp.float32) for x in (q, k, v)), seq_ids)
  y32 = np.asarray(y.astype(jnp.float32))
  np.testing.assert_allclose(y32, want_y, rtol=2**-7, atol=1e-6)
  _assert_parts_close(parts, want, rtol=RTOL, atol=ATOL)

  exact_y, _ = quadratic(q32, k32, v32, seq_ids)
  assert np.max(np.abs(y32 - exact_y)) < 0.02 * np.max(np.abs(exact_y))


def test_memory_is_linear_in_length():
  """Forward + backward at L = 4096 compiles without any L x L buffer; the quadratic form needs several."""
  length, chunk = 4096, 64
  seq_ids = jnp.asarray(np.repeat(np.arange(1, 5), length // 4)[None].astype(np.int32))
  x = jax.ShapeDtypeStruct((1, 1, length, 8), jnp.float32)

  def compiled(fn):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v)[0])
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()

  square_bytes = length * length * 4  # one float32 L x L matrix
  chunked = compiled(functools.partial(flow_chunked.flow_attention_chunked, seq_ids=seq_ids, chunk=chunk))
  quadratic = compiled(lambda q, k, v: attention.flow_attention_parts(q, k, v, attention.causal_packed_mask(seq_ids)))
  assert chunked.memory_analysis().temp_size_in_bytes < square_bytes / 8
  assert quadratic.memory_analysis().temp_size_in_bytes > square_bytes  # the check can tell the two apart
  assert f"{length},{length}" not in chunked.as_text()
  assert f"{length},{length}" in quadratic.as_text()
