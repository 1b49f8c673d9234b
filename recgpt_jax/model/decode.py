"""Incremental decoding: encode packed histories once, then append one token per user per step.

``prefill`` encodes the packed rows of an evaluation batch (``packing.pack_eval_batches``) and returns,
per user slot, the hidden state at the user's last history position plus a per-layer decode state.
``decode_step`` appends one token per user (``[U]``-shaped inputs) and processes that single position
against the state, so ``k`` extra positions cost ``k`` one-token passes instead of ``k`` re-encodings.

The history part of the state stays in the packed-row layout ``[R, heads, row_len, head_dim]``: a
decode step lays the users' new queries out as ``[R, row_len slots, ...]`` (slot = the user's
``seq_id`` in its row) and attends to the row with the slot's key mask, so no per-user copy of a row is
ever made (users average 9 tokens of a 50-token row). Per layer:

* softmax: the rows' keys and values ``k``, ``v`` (the KV cache of the histories) and the appended
  tokens' ``k_new``, ``v_new`` ``[U, heads, max_steps, head_dim]``;
* flow: the prefix sums of ``attention.flow_attention`` at each user's last token -- ``cs(K)``,
  ``cs(Q)``, ``cs(K out)``, ``cs(Q in)`` ``[U, heads, head_dim]``, ``cs(exp(src))`` ``[U, heads]`` -- and
  the matrix ``sum_j K_j (comp_j V_j)^T``, kept in two parts: over the history in factored form, the
  rows' ``keys`` (``K``) and ``comp_v`` (``comp V``) masked by the user's slot, and over the appended
  tokens as ``kv`` ``[U, heads, head_dim, head_dim]`` (None when ``max_steps <= 1``). In the parallel
  form every per-token quantity of token ``j`` (``in``, ``out``, ``src``, ``comp``) reads only prefix
  sums up to ``j`` and ``n_j``, so it is fixed once ``j`` is seen and later tokens only add to the sums:
  the state has a constant size, whatever the number of steps. (Forming the history matrix per user
  would cost a batched ``[U, heads, row_len, d] x [.., d]`` product, about 40% of a whole prefill at the
  reference size.)

The math is the model's (``transformer.RecGPT``) with dropout off, computed with its own submodules and
parameters. Attention over the packed rows uses the model's parallel kernels; the last layer then runs
its output projection, residuals and FFN only at the users' last positions (other positions feed
nothing downstream), which roughly halves a 1-layer prefill. Positions are clipped to ``max_len - 1``
exactly as the model does.

Batch contract (as built by ``pack_eval_batches``): ``last_col`` is the user's last token in its row,
and empty user slots come after the real ones (two slots naming the same row slot share its decode
queries; the lower slot index wins).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp

from recgpt_jax.model import attention
from recgpt_jax.model.transformer import Block, RecGPT

LayerState = dict[str, jax.Array]


@flax.struct.dataclass
class DecodeState:
  """What ``decode_step`` needs besides the parameters: a pytree of arrays with fixed shapes.

  Attributes:
    layers: one dict per block (see the module docstring for the keys and shapes).
    seq_ids: ``[R, row_len]`` int32, the packed rows' ``seq_ids`` (history key masks).
    owner: ``[R, row_len]`` int32, the user slot whose history is slot ``s`` (0-based) of row ``r``;
      ``U`` where none.
    row: ``[U]`` int32, each user's row.
    slot: ``[U]`` int32, each user's 0-based slot in its row (``seq_id - 1``).
    cursor: int32 scalar, tokens appended so far (the next slot of ``k_new`` / ``v_new``).
    length: ``[U]`` int32, the user's tokens so far (``n`` of the flow formulas).
    position: ``[U]`` int32, position of the user's last token (the next one usually takes ``+ 1``).
    user: ``[U]`` int32, the user id of each slot.
  """

  layers: tuple[LayerState, ...]
  seq_ids: jax.Array
  owner: jax.Array
  row: jax.Array
  slot: jax.Array
  cursor: jax.Array
  length: jax.Array
  position: jax.Array
  user: jax.Array


def _block_forward(
  block: Block,
  x: jax.Array,
  attend: Callable[[jax.Array], tuple[jax.Array, LayerState]],
  select: Callable[[jax.Array], jax.Array],
) -> tuple[jax.Array, LayerState]:
  """One block without dropout.

  Args:
    block: the model's block.
    x: block input, ``[..., hidden]``.
    attend: attention input -> (projected attention output at the selected positions, layer state).
    select: picks the positions to continue with from ``x`` (identity, or the users' last positions).

  Returns:
    The block output at the selected positions and the layer state.
  """
  ffn = block.ffn
  if block.pre_norm:
    a, layer = attend(block.norm1(x))
    x = select(x) + a
    return x + ffn(block.norm2(x)), layer
  a, layer = attend(x)
  h = block.norm1(select(x) + a)
  return block.norm2(h + ffn(h)), layer


def _prefill_attention(
  attn: attention.MultiHeadAttention,
  x_rld: jax.Array,
  seq_ids: jax.Array,
  last_row: jax.Array,
  last_col: jax.Array,
  max_steps: int,
  last_layer: bool,
) -> tuple[jax.Array, LayerState]:
  """Attention over packed rows plus the layer's decode state (the kind's ``prefill``).

  Returns:
    The projected attention output -- ``[r, len, hidden]`` for an inner layer, ``[U, hidden]`` at the
    users' last positions for the last layer -- and the layer state.
  """
  q, k, v = (jnp.swapaxes(t, 1, 2) for t in attn.split_heads(x_rld))  # [r, h, len, d]
  at_last = lambda t: t[last_row, :, last_col]  # [r, h, len, ...] -> [U, h, ...]
  y, layer = attn.kind.prefill(
    q,
    k,
    v,
    seq_ids,
    impl=attn.impl(q.shape[2], dropout=False),
    chunk=attn.settings.chunk,
    max_steps=max_steps,
    num_users=last_row.shape[0],
    at_last=at_last,
  )
  if last_layer:
    return attn.merge_heads(at_last(y)), layer
  return attn.merge_heads(jnp.swapaxes(y, 1, 2)), layer


def prefill(
  model: RecGPT,
  items: jax.Array,
  positions: jax.Array,
  segments: jax.Array,
  seq_ids: jax.Array,
  users: jax.Array,
  last_row: jax.Array,
  last_col: jax.Array,
  *,
  max_steps: int = 0,
) -> tuple[jax.Array, DecodeState]:
  """Encodes packed histories; returns each user's last hidden state and its decode state.

  Args:
    model: the model (e.g. ``nnx.merge(graphdef, params)`` inside a jit).
    items: ``[R, L]`` packed rows as in ``RecGPT.__call__`` (positions, segments, seq_ids, users alike).
    positions: ``[R, L]``.
    segments: ``[R, L]``.
    seq_ids: ``[R, L]``.
    users: ``[R, L]``.
    last_row: ``[U]`` row of each user slot's last token.
    last_col: ``[U]`` column of each user slot's last token (see the batch contract in the module
      docstring). Empty slots may point at any real token; their outputs are then meaningless.
    max_steps: how many tokens ``decode_step`` may append (static). Sizes the softmax cache of appended
      tokens (appending more overwrites its last slot); flow only needs to know whether it is >= 2 (with
      fewer, later tokens would not see the earlier appended ones).

  Returns:
    ``hidden_ud`` ``[U, hidden]`` (the model's output at each user's last position) and the state.
  """
  x = model.embed(items, positions, segments, users)  # [R, L, hidden]
  layers = []
  for i, block in enumerate(model.blocks):
    last_layer = i == len(model.blocks) - 1
    attend = functools.partial(
      _prefill_attention,
      block.attn,
      seq_ids=seq_ids,
      last_row=last_row,
      last_col=last_col,
      max_steps=max_steps,
      last_layer=last_layer,
    )
    select = (lambda t: t[last_row, last_col]) if last_layer else (lambda t: t)
    x, layer = _block_forward(block, x, attend, select)
    layers.append(layer)
  if model.final_norm is not None:
    x = model.final_norm(x)
  num_users = last_row.shape[0]
  slot = jnp.maximum(seq_ids[last_row, last_col] - 1, 0)
  # Lowest user slot wins a shared row slot, so trailing empty slots never displace a real user.
  owner = jnp.full(seq_ids.shape, num_users, jnp.int32).at[last_row, slot].min(jnp.arange(num_users, dtype=jnp.int32))
  state = DecodeState(
    layers=tuple(layers),
    seq_ids=seq_ids,
    owner=owner,
    row=last_row,
    slot=slot,
    cursor=jnp.zeros((), jnp.int32),
    length=jnp.sum(attention.causal_packed_mask(seq_ids)[last_row, 0, last_col], axis=-1, dtype=jnp.int32),
    position=positions[last_row, last_col],
    user=users[last_row, last_col],
  )
  return x, state


@dataclasses.dataclass(frozen=True)
class _History:
  """``attention.History`` over the packed rows of a ``DecodeState``: queries are laid out by (row, slot) so each
  row is read once for all its users, never copied per user."""

  state: DecodeState

  @property
  def mask_u1l(self) -> jax.Array:
    s = self.state
    return (s.seq_ids[s.row] == s.slot[:, None] + 1)[:, None, :]

  @property
  def cursor(self) -> jax.Array:
    return self.state.cursor

  def scores(self, q_uhd: jax.Array, keys_rhld: jax.Array) -> jax.Array:
    s = self.state
    q_rshd = q_uhd[jnp.minimum(s.owner, q_uhd.shape[0] - 1)]  # queries laid out by (row, slot)
    return jnp.einsum("rshd,rhld->rshl", q_rshd, keys_rhld.astype(q_uhd.dtype))[s.row, s.slot]

  def mix(self, w_uhl: jax.Array, values_rhld: jax.Array) -> jax.Array:
    s = self.state
    w_rshl = w_uhl[jnp.minimum(s.owner, w_uhl.shape[0] - 1)]
    return jnp.einsum("rshl,rhld->rshd", w_rshl, values_rhld.astype(w_uhl.dtype))[s.row, s.slot]


def _decode_attention(
  attn: attention.MultiHeadAttention,
  x_ud: jax.Array,
  layer: LayerState,
  state: DecodeState,
  length: jax.Array,
) -> tuple[jax.Array, LayerState]:
  """Attention of one new token per user against the layer state; returns (``[U, hidden]``, new state)."""
  q, k, v = attn.split_heads(x_ud)  # [U, h, d]
  y, new = attn.kind.decode(q, k, v, layer, _History(state), length)
  return attn.merge_heads(y), new


def decode_step(
  model: RecGPT,
  state: DecodeState,
  items: jax.Array,
  segments: jax.Array,
  positions: jax.Array,
  users: jax.Array,
) -> tuple[jax.Array, DecodeState]:
  """Appends one token per user and encodes that position only.

  Args:
    model: the model the state was built with.
    state: from ``prefill`` or a previous ``decode_step``.
    items: ``[U]`` item of the new token.
    segments: ``[U]`` its segment (1 for a generated item).
    positions: ``[U]`` its position (usually ``state.position + 1``).
    users: ``[U]`` its user id (usually ``state.user``).

  Returns:
    ``hidden_ud`` ``[U, hidden]``, the model's output at the new position, and the updated state.
  """
  x = model.embed(items, positions, segments, users)  # [U, hidden]
  length = state.length + 1
  layers = []
  for block, layer in zip(model.blocks, state.layers, strict=True):
    attend = functools.partial(_decode_attention, block.attn, layer=layer, state=state, length=length)
    x, layer = _block_forward(block, x, attend, lambda t: t)
    layers.append(layer)
  if model.final_norm is not None:
    x = model.final_norm(x)
  return x, state.replace(layers=tuple(layers), cursor=state.cursor + 1, length=length, position=positions, user=users)
