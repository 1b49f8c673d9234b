"""Causal self-attention over packed rows: the attention kinds, their implementations and decode states.

Rows are *packed*: one row of length ``L`` holds several users' sequences one after another. A token
attends to the tokens of the same user (same non-zero ``seq_id``) at or before its own position; padding
(``seq_id == 0``) attends to nothing and is attended by nothing, and its output is zero.

Two *kinds* (the math: ``model.attention``) and several *implementations* (how it is computed:
``model.attention_impl``), all behind one interface, ``AttentionKind``:

* ``softmax``: scaled dot-product attention.
  * ``xla``: the masked ``L x L`` form written in ``jnp`` (any platform; supports attention dropout).
  * ``cudnn``: ``jax.nn.dot_product_attention(implementation='cudnn')``, cuDNN flash attention on NVIDIA
    GPUs, with the packed-row segment mask and ``is_causal``; needs bfloat16/float16 activations.
  * ``splash``: Pallas splash attention on TPU (causal mask + ``SegmentIds``); rows padded to 128.
* ``flow``: causal Flow-Attention (Flowformer), a linear attention.
  * ``xla``: the masked parallel ``L x L`` form (cheap for ``L`` up to a few hundred; supports dropout).
  * ``chunked``: ``recgpt_jax.model.flow_chunked``, linear in ``L``: quadratic only inside chunks of
    ``model.flow_chunk`` positions, prefix sums carried across chunks.

``auto`` is decided in one place, ``resolve_impl``: flow takes ``chunked`` for rows of at least
``FLOW_CHUNKED_MIN_LEN`` positions when the call has no attention dropout (evaluation always); softmax takes
``xla`` (the fused kernels are opt-in until measured on the device). The fused and chunked forms never form
the attention weights, so they do not support attention-weight dropout: ``check_impl`` rejects them with
``model.attn_dropout > 0`` (and on a platform that lacks them).

Every kind also owns its incremental-decoding state (``prefill`` / ``decode``; ``recgpt_jax.model.decode``
drives them through ``History``), so a new kind is one class here and touches no other file.

Shapes: ``q, k, v`` are ``[batch, heads, len, head_dim]``; ``seq_ids`` is ``[batch, len]`` int. Mixed
precision (``recgpt_jax.model.precision``): softmax logits and weights are float32 and Flow-Attention runs in
float32 whatever the activation dtype; outputs come back in the dtype of ``v``.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from recgpt_jax.errors import ConfigError

ATTENTION_KINDS = ("softmax", "flow")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash", "chunked")
# The platforms (jax.Device.platform) a fused implementation runs on.
IMPL_PLATFORMS = {"cudnn": ("gpu", "cuda"), "splash": ("tpu",)}
# Kernels the compiler cannot partition: the step is traced under its mesh (parallel.mesh.kernel_mesh) and the
# kernel shard_maps itself over the batch.
IMPLS_NEEDING_MESH = ("splash",)
# auto: Flow-Attention is chunked from this row length on (bench_attention: equal speed near L = 128-256 on CPU;
# the quadratic form's [L, L] buffers dominate memory beyond).
FLOW_CHUNKED_MIN_LEN = 256

# Flow-Attention's stabiliser, as in the reference formulas.
FLOW_EPS = 1e-6

LayerState = dict[str, jax.Array | None]


def causal_packed_mask(seq_ids: jax.Array) -> jax.Array:
  """Boolean ``[batch, 1, len, len]`` mask: query i may attend key j.

  Args:
    seq_ids: ``[batch, len]`` int, which user a token belongs to within its row; 0 = padding.

  Returns:
    ``mask[b, 0, i, j]`` is true iff ``seq_ids[b, i] == seq_ids[b, j] != 0`` and ``j <= i``.
  """
  length = seq_ids.shape[-1]
  return (_same_user(seq_ids) & jnp.tril(jnp.ones((length, length), dtype=bool)))[:, None]


def _same_user(seq_ids: jax.Array) -> jax.Array:
  """``[batch, len, len]``: tokens i and j belong to the same (non-padding) user."""
  return (seq_ids[:, :, None] == seq_ids[:, None, :]) & (seq_ids[:, None, :] != 0)


def _valid(seq_ids: jax.Array) -> jax.Array:
  """``[batch, 1, len, 1]``: 1 at real tokens, 0 at padding (zeroes padding outputs)."""
  return (seq_ids != 0)[:, None, :, None]


def _mix32(x: jax.Array) -> jax.Array:
  """A 32-bit integer finaliser with full avalanche (the "lowbias32" constants of Wellons' hash search)."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def keep_mask(key: jax.Array, rate: float, shape: tuple[int, ...]) -> jax.Array:
  """Boolean mask with each entry kept with probability ``1 - rate``, as a counter-based hash of the key.

  Bit ``i`` of the mask comes from ``mix(mix(i ^ k0) + k1)`` with ``(k0, k1)`` the key's 32-bit words and
  ``mix`` a full-avalanche 32-bit finaliser: a few integer operations per element that XLA fuses into the
  consumer. On a 2-core CPU this is ~5x cheaper than ``jax.random.bernoulli`` (Threefry-2x32, 20 rounds),
  which was 10% of the pre-training step. Keys from ``jax.random.split`` / ``fold_in`` give independent
  streams as usual; the rate is exact up to ``2**-32``.
  """
  words = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)
  size = 1
  for d in shape:
    size *= d
  if size >= 2**32:
    raise ValueError(f"dropout mask of {size} elements exceeds the 32-bit counter")
  counter = jax.lax.iota(jnp.uint32, size).reshape(shape)
  bits = _mix32(_mix32(counter ^ words[0]) + words[-1])
  return bits >= jnp.uint32(min(int(round(rate * 2.0**32)), 2**32 - 1))


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout; the identity when ``key`` is None (evaluation) or ``rate == 0``."""
  if key is None or rate <= 0.0:
    return x
  return jnp.where(keep_mask(key, rate, x.shape), x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


# ----------------------------------------------------------------------------------------------- softmax


def softmax_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: jax.Array,
  *,
  dropout_rate: float = 0.0,
  dropout_key: jax.Array | None = None,
) -> jax.Array:
  """Masked scaled dot-product attention (the ``xla`` form). Padding queries get zeros. Returns ``[b, h, len, d]``.

  Logits and the softmax are float32; the weights are cast to ``v``'s dtype for the value product.
  """
  scale = q.shape[-1] ** -0.5
  logits_bhij = jnp.einsum("bhid,bhjd->bhij", q, k, preferred_element_type=jnp.float32) * scale
  logits_bhij = jnp.where(mask, logits_bhij, jnp.finfo(jnp.float32).min)
  # Rows with no valid key (padding queries) would be uniform; the mask product zeroes them.
  weights_bhij = jax.nn.softmax(logits_bhij, axis=-1) * mask
  weights_bhij = dropout(weights_bhij, dropout_rate, dropout_key)
  return jnp.einsum("bhij,bhjd->bhid", weights_bhij.astype(v.dtype), v)


def softmax_dot_product_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, seq_ids: jax.Array, *, implementation: str = "cudnn"
) -> jax.Array:
  """Softmax attention through ``jax.nn.dot_product_attention`` (``cudnn``: flash attention on NVIDIA GPUs).

  The causal part is ``is_causal`` (cuDNN skips the blocks above the diagonal) and the packed-row part a
  boolean same-user mask. ``implementation='xla'`` runs the same call anywhere (used to test the layout and
  mask on CPU). Returns ``[b, h, len, d]``, zero at padding.
  """
  to_blhd = lambda t: jnp.swapaxes(t, 1, 2)  # jax.nn.dot_product_attention takes [batch, len, heads, dim]
  y = jax.nn.dot_product_attention(
    to_blhd(q),
    to_blhd(k),
    to_blhd(v),
    mask=_same_user(seq_ids)[:, None],
    is_causal=True,
    implementation=implementation,
  )
  return jnp.swapaxes(y, 1, 2) * _valid(seq_ids).astype(y.dtype)


SPLASH_BLOCK = 128  # TPU splash attention tiles; rows are padded to a multiple of this


def softmax_splash(
  q: jax.Array, k: jax.Array, v: jax.Array, seq_ids: jax.Array, *, interpret: bool = False
) -> jax.Array:
  """Softmax attention with the Pallas TPU splash-attention kernel: causal mask plus ``SegmentIds`` (packing).

  Rows are padded with padding tokens to a multiple of ``SPLASH_BLOCK``; padding queries attend padding keys
  inside the kernel and are zeroed after. ``interpret=True`` runs the kernel in the Pallas interpreter on any
  platform (tests on CPU). Traced under a mesh (``parallel.mesh.kernel_mesh``), the kernel runs under
  ``shard_map`` with the rows split over ``data``. Returns ``[b, h, len, d]``.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

  b, h, length, d = q.shape
  padded = -(-length // SPLASH_BLOCK) * SPLASH_BLOCK
  block = next(s for s in (512, 256, SPLASH_BLOCK) if padded % s == 0)
  pad = lambda t: jnp.pad(t, [(0, 0)] * 2 + [(0, padded - length), (0, 0)])
  ids = jnp.pad(seq_ids, [(0, 0), (0, padded - length)]).astype(jnp.int32)
  kernel = splash.make_splash_mha(
    splash_mask.MultiHeadMask([splash_mask.CausalMask((padded, padded))] * h),
    block_sizes=splash.BlockSizes(
      block_q=block,
      block_kv=block,
      block_kv_compute=block,
      block_q_dkv=block,
      block_kv_dkv=block,
      block_kv_dkv_compute=block,
      block_q_dq=block,
      block_kv_dq=block,
    ),
    head_shards=1,
    q_seq_shards=1,
    interpret=interpret,
  )
  scaled_q = q * jnp.asarray(d**-0.5, q.dtype)  # splash applies no scale
  rows = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=splash.SegmentIds(q=s1, kv=s1)))
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    # A Mosaic kernel is not partitioned by the compiler: each device runs it on its rows (batch over `data`;
    # heads are not split, so the other axes hold replicas).
    spec = jax.sharding.PartitionSpec("data" if "data" in mesh.axis_names else None)
    rows = jax.shard_map(rows, mesh=mesh, in_specs=(spec,) * 4, out_specs=spec, check_vma=False)
  y = rows(pad(scaled_q), pad(k), pad(v), ids)
  return y[:, :, :length].astype(v.dtype) * _valid(seq_ids).astype(v.dtype)


# -------------------------------------------------------------------------------------------------- flow


def flow_attention_parts(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: jax.Array,
  *,
  dropout_rate: float = 0.0,
  dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Causal Flow-Attention (Flowformer) with padding masked, in parallel form (the ``xla`` form).

  Every prefix sum ``cs(x)_i = sum_{j <= i, same user} x_j`` is a product with the mask, so packed rows
  and padding are handled exactly; ``n_i`` is the number of the user's tokens up to ``i``. With
  ``phi = sigmoid``, ``Q = phi(q)``, ``K = phi(k)``:

  * ``in_i = n_i / <Q_i + eps, cs(K)_i + eps>``, ``out_i = n_i / <K_i + eps, cs(Q)_i + eps>``
  * ``sink_i = <Q_i + eps, cs(K out)_i + eps> / n_i``,
    ``src_i = clip(<K_i + eps, cs(Q in)_i + eps> / n_i, -1, 1)``
  * ``alloc_i = sigmoid(sink_i)``, ``comp_i = n_i exp(src_i) / cs(exp(src))_i``
  * ``y_i = alloc_i sum_{j <= i} <Q_i in_i / n_i, K_j> comp_j V_j``

  Computed in float32 whatever the input dtype (see the module docstring).

  Returns:
    ``(y, parts)``: ``y`` ``[b, h, len, d]`` in ``v``'s dtype (zero at padding positions) and the per-token
    float32 prefix sums an incremental decoder continues from: ``ks``, ``cs_k``, ``cs_q``, ``cs_kout``,
    ``cs_qin`` (``[b, h, len, d]``), ``cs_exp`` (``[b, h, len]``) and ``comp_v`` (``comp_j V_j``).
  """
  out_dtype = v.dtype
  q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
  eps = FLOW_EPS
  m_bhij = mask.astype(jnp.float32)
  n_bhi = jnp.sum(m_bhij, axis=-1)
  valid_bhi = n_bhi > 0
  n_safe = jnp.where(valid_bhi, n_bhi, 1.0)

  def cumsum(x_bhjd):  # masked prefix sum over positions
    return jnp.einsum("bhij,bhjd->bhid", m_bhij, x_bhjd)

  qs = jax.nn.sigmoid(q)
  ks = jax.nn.sigmoid(k)
  cs_k, cs_q = cumsum(ks), cumsum(qs)
  inflow = n_bhi / jnp.sum((qs + eps) * (cs_k + eps), axis=-1)
  outflow = n_bhi / jnp.sum((ks + eps) * (cs_q + eps), axis=-1)
  cs_kout = cumsum(ks * outflow[..., None])
  cs_qin = cumsum(qs * inflow[..., None])
  sink = jnp.sum((qs + eps) * (cs_kout + eps), axis=-1) / n_safe
  src = jnp.clip(jnp.sum((ks + eps) * (cs_qin + eps), axis=-1) / n_safe, -1.0, 1.0)
  alloc = jax.nn.sigmoid(sink)
  exp_src = jnp.where(valid_bhi, jnp.exp(src), 0.0)
  cs_exp = jnp.einsum("bhij,bhj->bhi", m_bhij, exp_src)
  comp = n_bhi * exp_src / jnp.where(valid_bhi, cs_exp, 1.0)
  q_scaled = qs * (inflow / n_safe)[..., None]
  weights_bhij = jnp.einsum("bhid,bhjd->bhij", q_scaled, ks) * m_bhij * comp[:, :, None, :]
  weights_bhij = dropout(weights_bhij, dropout_rate, dropout_key)
  y = alloc[..., None] * jnp.einsum("bhij,bhjd->bhid", weights_bhij, v)
  parts = dict(ks=ks, cs_k=cs_k, cs_q=cs_q, cs_kout=cs_kout, cs_qin=cs_qin, cs_exp=cs_exp, comp_v=comp[..., None] * v)
  return y.astype(out_dtype), parts


def flow_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: jax.Array,
  *,
  dropout_rate: float = 0.0,
  dropout_key: jax.Array | None = None,
) -> jax.Array:
  """Causal Flow-Attention output ``[b, h, len, d]``; see ``flow_attention_parts`` for the formulas."""
  return flow_attention_parts(q, k, v, mask, dropout_rate=dropout_rate, dropout_key=dropout_key)[0]


def _flow_parts(q, k, v, seq_ids, impl: str, chunk: int):
  """``(y, parts)`` of Flow-Attention by the quadratic (``xla``) or ``chunked`` form, without dropout."""
  if impl == "chunked":
    from recgpt_jax.model import flow_chunked

    y, parts = flow_chunked.flow_attention_chunked(q, k, v, seq_ids, chunk=chunk)
    return y, {name: p.astype(jnp.float32) for name, p in parts.items()}
  return flow_attention_parts(q, k, v, causal_packed_mask(seq_ids))


# ----------------------------------------------------------------------------- the interface and choices


class History(Protocol):
  """What a decode step reads of the packed histories (built by ``recgpt_jax.model.decode``).

  Attributes:
    mask_u1l: ``[U, 1, row_len]`` bool, the keys of each user's history in its row.
    cursor: int32 scalar, tokens appended so far.
  """

  mask_u1l: jax.Array
  cursor: jax.Array

  def scores(self, q_uhd: jax.Array, keys_rhld: jax.Array) -> jax.Array:
    """``<q_u, key_l>`` for every key of each user's row: ``[U, h, row_len]``."""

  def mix(self, w_uhl: jax.Array, values_rhld: jax.Array) -> jax.Array:
    """``sum_l w_l value_l`` over each user's row: ``[U, h, d]``."""


class AttentionKind:
  """One attention kind: its implementations, its forward pass and its incremental-decoding state."""

  name: str
  impls: tuple[str, ...]  # explicit implementations; the first is the reference ('xla') form
  dropout_impls: tuple[str, ...] = ("xla",)  # those that support attention-weight dropout

  def auto(self, length: int, dropout: bool) -> str:
    """The implementation ``auto`` stands for at this row length (static)."""
    return "xla"

  def __call__(self, q, k, v, seq_ids, *, impl: str, chunk: int, dropout_rate: float, dropout_key) -> jax.Array:
    raise NotImplementedError

  def prefill(self, q, k, v, seq_ids, *, impl: str, chunk: int, max_steps: int, num_users: int, at_last):
    """Attention over packed rows plus the layer's decode state.

    Args:
      q: ``[r, h, len, d]`` (k, v alike).
      k: keys.
      v: values.
      seq_ids: ``[r, len]``.
      impl: resolved implementation.
      chunk: Flow-Attention chunk size.
      max_steps: tokens a decode may append (static).
      num_users: ``U``.
      at_last: ``[r, h, len, ...] -> [U, h, ...]``, picks each user's last position.

    Returns:
      ``y`` ``[r, h, len, d]`` and the layer state.
    """
    raise NotImplementedError

  def decode(self, q, k, v, layer: LayerState, history: History, length: jax.Array):
    """One new token per user (``q, k, v`` ``[U, h, d]``) against the layer state.

    Returns the attention output ``[U, h, d]`` and the new layer state. The output reads the old state plus
    the new token's own terms, so when the new state is not used (the last step) ``jit`` skips building it.
    """
    raise NotImplementedError


class Softmax(AttentionKind):
  """Scaled dot-product attention; decode state: the history KV cache plus room for appended tokens."""

  name = "softmax"
  impls = ("xla", "cudnn", "splash")

  def __call__(self, q, k, v, seq_ids, *, impl, chunk, dropout_rate, dropout_key):
    if impl == "cudnn":
      return softmax_dot_product_attention(q, k, v, seq_ids, implementation="cudnn")
    if impl == "splash":
      return softmax_splash(q, k, v, seq_ids)
    return softmax_attention(q, k, v, causal_packed_mask(seq_ids), dropout_rate=dropout_rate, dropout_key=dropout_key)

  def prefill(self, q, k, v, seq_ids, *, impl, chunk, max_steps, num_users, at_last):
    y = self(q, k, v, seq_ids, impl=impl, chunk=chunk, dropout_rate=0.0, dropout_key=None)
    _, heads, _, dim = q.shape
    room = jnp.zeros((num_users, heads, max_steps, dim), k.dtype)
    return y, {"k": k, "v": v, "k_new": room, "v_new": room}

  def decode(self, q, k, v, layer, history, length):
    k_new = jax.lax.dynamic_update_slice_in_dim(layer["k_new"], k[:, :, None], history.cursor, axis=2)
    v_new = jax.lax.dynamic_update_slice_in_dim(layer["v_new"], v[:, :, None], history.cursor, axis=2)
    q = q.astype(jnp.float32) * q.shape[-1] ** -0.5
    logits_uhc = jnp.concatenate(
      [history.scores(q, layer["k"].astype(jnp.float32)), jnp.einsum("uhd,uhtd->uht", q, k_new.astype(jnp.float32))],
      axis=-1,
    )
    new_mask_u1t = jnp.broadcast_to(jnp.arange(k_new.shape[2]) <= history.cursor, (q.shape[0], 1, k_new.shape[2]))
    mask_u1c = jnp.concatenate([history.mask_u1l, new_mask_u1t], axis=-1)
    logits_uhc = jnp.where(mask_u1c, logits_uhc, jnp.finfo(jnp.float32).min)
    weights_uhc = jax.nn.softmax(logits_uhc, axis=-1) * mask_u1c
    length_hist = history.mask_u1l.shape[-1]
    y = history.mix(weights_uhc[..., :length_hist], layer["v"].astype(jnp.float32))
    y = y + jnp.einsum("uht,uhtd->uhd", weights_uhc[..., length_hist:], v_new.astype(jnp.float32))
    return y.astype(v.dtype), {**layer, "k_new": k_new, "v_new": v_new}


class Flow(AttentionKind):
  """Causal Flow-Attention; decode state: constant-size prefix sums (see ``recgpt_jax.model.decode``)."""

  name = "flow"
  impls = ("xla", "chunked")

  def auto(self, length, dropout):
    return "chunked" if length >= FLOW_CHUNKED_MIN_LEN and not dropout else "xla"

  def __call__(self, q, k, v, seq_ids, *, impl, chunk, dropout_rate, dropout_key):
    if impl == "chunked":
      return _flow_parts(q, k, v, seq_ids, impl, chunk)[0]
    return flow_attention(q, k, v, causal_packed_mask(seq_ids), dropout_rate=dropout_rate, dropout_key=dropout_key)

  def prefill(self, q, k, v, seq_ids, *, impl, chunk, max_steps, num_users, at_last):
    y, s = _flow_parts(q, k, v, seq_ids, impl, chunk)
    layer = {name: at_last(s[name]) for name in ("cs_k", "cs_q", "cs_kout", "cs_qin", "cs_exp")}
    # One appended token needs no matrix (its own term is exact); a zero [U, h, d, d] matrix carried
    # through a scan would cost more than the decode step itself.
    _, heads, _, dim = q.shape
    kv = jnp.zeros((num_users, heads, dim, dim), jnp.float32) if max_steps >= 2 else None
    layer.update(keys=s["ks"], comp_v=s["comp_v"], kv=kv)
    return y, layer

  def decode(self, q, k, v, layer, history, length):
    out_dtype = v.dtype
    q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    eps = FLOW_EPS
    n = length[:, None].astype(jnp.float32)  # [U, 1], the count including the new token
    qs, ks = jax.nn.sigmoid(q), jax.nn.sigmoid(k)
    cs_k, cs_q = layer["cs_k"] + ks, layer["cs_q"] + qs
    inflow = n / jnp.sum((qs + eps) * (cs_k + eps), axis=-1)  # [U, h]
    outflow = n / jnp.sum((ks + eps) * (cs_q + eps), axis=-1)
    cs_kout = layer["cs_kout"] + ks * outflow[..., None]
    cs_qin = layer["cs_qin"] + qs * inflow[..., None]
    sink = jnp.sum((qs + eps) * (cs_kout + eps), axis=-1) / n
    src = jnp.clip(jnp.sum((ks + eps) * (cs_qin + eps), axis=-1) / n, -1.0, 1.0)
    exp_src = jnp.exp(src)
    cs_exp = layer["cs_exp"] + exp_src
    comp_v = (n * exp_src / cs_exp)[..., None] * v  # comp of the new token times its value
    # y = alloc (Q in / n)^T (history matrix + kv + K comp V^T), without forming any of the matrices.
    q_scaled = qs * (inflow / n)[..., None]
    past = history.mix(history.scores(q_scaled, layer["keys"]) * history.mask_u1l, layer["comp_v"])
    own = jnp.sum(q_scaled * ks, axis=-1, keepdims=True) * comp_v
    kv = layer["kv"]
    if kv is not None:
      own = own + jnp.einsum("uhd,uhde->uhe", q_scaled, kv)
      kv = kv + jnp.einsum("uhd,uhe->uhde", ks, comp_v)
    y = jax.nn.sigmoid(sink)[..., None] * (past + own)
    new = {**layer, "cs_k": cs_k, "cs_q": cs_q, "cs_kout": cs_kout, "cs_qin": cs_qin, "cs_exp": cs_exp, "kv": kv}
    return y.astype(out_dtype), new


KINDS: dict[str, AttentionKind] = {kind.name: kind for kind in (Softmax(), Flow())}


def resolve_impl(kind: str, impl: str, *, length: int, dropout: bool) -> str:
  """The implementation a call uses: ``impl`` itself, or what ``auto`` stands for (the one place it is decided).

  Args:
    kind: ``'softmax'`` or ``'flow'``.
    impl: ``model.attention_impl``.
    length: row length of the call (static).
    dropout: whether the call applies attention-weight dropout (training with ``attn_dropout > 0``).
  """
  attention = KINDS[kind]
  chosen = attention.auto(length, dropout) if impl == "auto" else impl
  if dropout and chosen not in attention.dropout_impls:
    # check_impl rejects this configuration up front; reaching it means a caller skipped the check.
    raise ValueError(f"attention implementation {chosen!r} has no attention dropout")
  return chosen


def check_impl(kind: str, impl: str, *, attn_dropout: float = 0.0, dtype: str = "float32", platform: str | None = None):
  """Raises ``ConfigError`` (one line) if ``impl`` cannot run ``kind`` with these settings on ``platform``.

  Args:
    kind: ``model.attention``.
    impl: ``model.attention_impl``.
    attn_dropout: ``model.attn_dropout``.
    dtype: ``model.dtype``.
    platform: the devices' platform (``'cpu'``, ``'gpu'``/``'cuda'``, ``'tpu'``); None skips the platform check
      (e.g. a config validated away from its devices).
  """
  if kind not in KINDS:
    raise ConfigError(f"model.attention must be one of {ATTENTION_KINDS}, got {kind!r}")
  if impl not in ATTENTION_IMPLS:
    raise ConfigError(f"model.attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
  if impl == "auto":
    return
  attention = KINDS[kind]
  if impl not in attention.impls:
    raise ConfigError(f"model.attention_impl={impl!r} is not an implementation of {kind} attention {attention.impls}")
  if attn_dropout > 0 and impl not in attention.dropout_impls:
    raise ConfigError(
      f"model.attention_impl={impl!r} has no attention-weight dropout; set model.attn_dropout=0 or use 'xla'"
    )
  if impl == "cudnn" and dtype not in ("bfloat16", "float16"):
    raise ConfigError(f"model.attention_impl='cudnn' needs model.dtype bfloat16 or float16, got {dtype!r}")
  if platform is not None and impl in IMPL_PLATFORMS and platform not in IMPL_PLATFORMS[impl]:
    raise ConfigError(
      f"model.attention_impl={impl!r} needs a {'/'.join(IMPL_PLATFORMS[impl])} device; this run has {platform}"
    )


@dataclasses.dataclass(frozen=True)
class AttentionSettings:
  """The static attention settings a layer is built with."""

  kind: str = "softmax"
  impl: str = "auto"
  chunk: int = 128  # Flow-Attention chunk (chunked implementation)
  dropout_rate: float = 0.0


def linear(n_in: int, n_out: int, axes: tuple[str, str], rngs: nnx.Rngs, *, dtype=None, param_dtype=jnp.float32):
  """A linear layer with normal(0.02) weights whose kernel and bias carry logical axis names ``axes``.

  ``dtype`` is the computation dtype (inputs and kernel are cast to it), ``param_dtype`` the stored one.
  """
  return nnx.Linear(
    n_in,
    n_out,
    kernel_init=nnx.with_partitioning(nnx.initializers.normal(0.02), axes),
    bias_init=nnx.with_partitioning(nnx.initializers.zeros, axes[1:]),
    dtype=dtype,
    param_dtype=param_dtype,
    rngs=rngs,
  )


class MultiHeadAttention(nnx.Module):
  """Multi-head self-attention of any kind and implementation, with input and output projections."""

  def __init__(self, hidden: int, num_heads: int, settings: AttentionSettings, *, rngs: nnx.Rngs, **dtypes):
    if settings.kind not in KINDS:
      raise ValueError(f"unknown attention kind {settings.kind!r}; expected one of {ATTENTION_KINDS}")
    if hidden % num_heads:
      raise ValueError(f"hidden size {hidden} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.settings = settings
    self.qkv = linear(hidden, 3 * hidden, ("embed", "heads"), rngs, **dtypes)
    self.out = linear(hidden, hidden, ("heads", "embed"), rngs, **dtypes)

  @property
  def kind(self) -> AttentionKind:
    return KINDS[self.settings.kind]

  def impl(self, length: int, dropout: bool) -> str:
    """The implementation used for rows of ``length`` (``dropout``: the call applies attention dropout)."""
    return resolve_impl(self.settings.kind, self.settings.impl, length=length, dropout=dropout)

  def split_heads(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``[..., hidden]`` -> q, k, v ``[..., heads, head_dim]`` through the input projection."""
    *lead, hidden = x.shape
    qkv = self.qkv(x).reshape(*lead, 3, self.num_heads, hidden // self.num_heads)
    return qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]

  def merge_heads(self, y: jax.Array) -> jax.Array:
    """``[..., heads, head_dim]`` -> output projection ``[..., hidden]``."""
    return self.out(y.reshape(*y.shape[:-2], -1))

  def __call__(self, x_bld: jax.Array, seq_ids: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in self.split_heads(x_bld))  # [b, h, len, d]
    rate = self.settings.dropout_rate if dropout_key is not None else 0.0
    y = self.kind(
      q,
      k,
      v,
      seq_ids,
      impl=self.impl(x_bld.shape[1], rate > 0),
      chunk=self.settings.chunk,
      dropout_rate=rate,
      dropout_key=dropout_key,
    )
    return self.merge_heads(jnp.swapaxes(y, 1, 2))
