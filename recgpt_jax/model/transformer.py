"""The RecGPT model: a causal transformer over item ids with a user module.

Input at each position: item embedding + user embedding (one learned vector per user, added at every
position; the "user module") + position embedding (restarting at 0 for each user of a packed row) +
segment embedding (0 = an item the user interacted with, 1 = an item the model generated). The hidden
state at a position is the user's interest vector; items are scored by a dot product with the item
table (tied head) or by an optional untied linear head.

Mixed precision: parameters are stored in ``param_dtype`` (float32), activations and matmuls run in ``dtype``
(bfloat16 on TPU/GPU); what stays float32 is listed in ``recgpt_jax.model.precision``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from recgpt_jax.model import precision
from recgpt_jax.model.attention import (
  ATTENTION_IMPLS,
  ATTENTION_KINDS,
  AttentionSettings,
  MultiHeadAttention,
  dropout,
  linear,
)

NORMS = ("post", "pre")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Model hyper-parameters (see experiments/configs for the documented defaults)."""

  num_items: int  # catalogue is 1..num_items; 0 is padding
  num_users: int  # user ids 1..num_users; 0 is padding / unknown user
  max_len: int = 50  # longest window of items the model sees (size of the position table)
  hidden: int = 64
  num_layers: int = 2
  num_heads: int = 2
  ffn: int = 256
  attention: str = "softmax"  # 'softmax' or 'flow'
  attention_impl: str = "auto"  # see recgpt_jax.model.attention: auto, xla, cudnn, splash, chunked
  flow_chunk: int = 128  # chunk of the chunked Flow-Attention
  dtype: str = "float32"  # activations and matmuls (bfloat16 recommended on TPU/GPU)
  param_dtype: str = "float32"  # stored parameters (master weights)
  norm: str = "post"  # 'post' (reference) or 'pre'
  attn_dropout: float = 0.0
  hidden_dropout: float = 0.0
  user_module: bool = True
  user_dropout: float = 0.0  # training only: a sequence's user vector is replaced by the unknown-user row
  untied_head: bool = False
  vocab_multiple: int = 1  # the item table has round_up(num_items + 1, vocab_multiple) rows

  @property
  def vocab_size(self) -> int:
    """Rows of the item table: ``num_items + 1`` rounded up to ``vocab_multiple`` (extra rows never score)."""
    return -(-(self.num_items + 1) // self.vocab_multiple) * self.vocab_multiple

  def __post_init__(self):
    if self.attention not in ATTENTION_KINDS:
      raise ValueError(f"model.attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"model.attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
    precision.to_dtype(self.dtype, "model.dtype")
    precision.to_dtype(self.param_dtype, "model.param_dtype")
    if self.norm not in NORMS:
      raise ValueError(f"model.norm must be one of {NORMS}, got {self.norm!r}")
    sizes = ("num_items", "num_users", "max_len", "hidden", "num_layers", "num_heads", "ffn", "vocab_multiple")
    for name in (*sizes, "flow_chunk"):
      if getattr(self, name) < 1:
        raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
    for name in ("attn_dropout", "hidden_dropout", "user_dropout"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")

  @property
  def dtypes(self) -> dict:
    """``dtype`` / ``param_dtype`` keyword arguments of the model's layers."""
    return {"dtype": jnp.dtype(self.dtype), "param_dtype": jnp.dtype(self.param_dtype)}

  @property
  def attention_settings(self) -> AttentionSettings:
    return AttentionSettings(self.attention, self.attention_impl, self.flow_chunk, self.attn_dropout)


def layer_norm(size: int, rngs: nnx.Rngs, **dtypes) -> nnx.LayerNorm:
  """LayerNorm; its statistics are float32 whatever ``dtype`` (flax computes them in at least float32)."""
  return nnx.LayerNorm(
    size,
    epsilon=1e-12,
    **dtypes,
    scale_init=nnx.with_partitioning(nnx.initializers.ones, ("embed",)),
    bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("embed",)),
    rngs=rngs,
  )


def embed(rows: int, hidden: int, axis: str | None, rngs: nnx.Rngs, *, param_dtype=jnp.float32, **_) -> nnx.Embed:
  """An embedding table (read with ``lookup``, which casts only the gathered rows)."""
  return nnx.Embed(
    rows,
    hidden,
    embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), (axis, "embed")),
    param_dtype=param_dtype,
    rngs=rngs,
  )


def lookup(table: nnx.Embed, ids: jax.Array, dtype) -> jax.Array:
  """Rows ``ids`` of ``table`` in ``dtype``: the gather happens first, so only the rows are cast (``nnx.Embed``
  with a ``dtype`` would cast the whole table every step)."""
  return jnp.take(table.embedding[...], ids, axis=0).astype(dtype)


class Block(nnx.Module):
  """Transformer block. Post-LN: ``h = LN(x + Drop(Attn(x)))``, ``y = LN(h + Drop(FFN(h)))``."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.pre_norm = cfg.norm == "pre"
    self.hidden_dropout = cfg.hidden_dropout
    self.attn = MultiHeadAttention(cfg.hidden, cfg.num_heads, cfg.attention_settings, rngs=rngs, **cfg.dtypes)
    self.norm1 = layer_norm(cfg.hidden, rngs, **cfg.dtypes)
    self.ffn_in = linear(cfg.hidden, cfg.ffn, ("embed", "mlp"), rngs, **cfg.dtypes)
    self.ffn_out = linear(cfg.ffn, cfg.hidden, ("mlp", "embed"), rngs, **cfg.dtypes)
    self.norm2 = layer_norm(cfg.hidden, rngs, **cfg.dtypes)

  def ffn(self, h: jax.Array) -> jax.Array:
    """The position-wise feed-forward branch (GELU), without dropout."""
    return self.ffn_out(jax.nn.gelu(self.ffn_in(h), approximate=False))

  def __call__(self, x: jax.Array, seq_ids: jax.Array, key: jax.Array | None) -> jax.Array:
    keys = jax.random.split(key, 4) if key is not None else [None] * 4
    ffn = self.ffn
    if self.pre_norm:
      x = x + dropout(self.attn(self.norm1(x), seq_ids, keys[0]), self.hidden_dropout, keys[1])
      return x + dropout(ffn(self.norm2(x)), self.hidden_dropout, keys[2])
    h = self.norm1(x + dropout(self.attn(x, seq_ids, keys[0]), self.hidden_dropout, keys[1]))
    return self.norm2(h + dropout(ffn(h), self.hidden_dropout, keys[2]))


class RecGPT(nnx.Module):
  """Causal transformer over packed rows of item ids; returns hidden states ``[rows, len, hidden]``."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    # Parameters carry logical axis names (recgpt_jax.parallel.mesh maps them to mesh axes); they are
    # placed on devices by the train state's shardings, not when they are created.
    with nnx.use_eager_sharding(False):
      # The item table doubles as the tied output head; row 0 is padding, rows > num_items pad the
      # vocabulary to vocab_size.
      dtypes = cfg.dtypes
      self.item_embed = embed(cfg.vocab_size, cfg.hidden, "vocab", rngs, **dtypes)
      self.user_embed = embed(cfg.num_users + 1, cfg.hidden, "users", rngs, **dtypes) if cfg.user_module else None
      self.pos_embed = embed(cfg.max_len, cfg.hidden, "positions", rngs, **dtypes)
      self.seg_embed = embed(2, cfg.hidden, None, rngs, **dtypes)
      self.embed_norm = layer_norm(cfg.hidden, rngs, **dtypes)
      self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
      self.final_norm = layer_norm(cfg.hidden, rngs, **dtypes) if cfg.norm == "pre" else None
      # The untied head's product is item_scores' (float32 out); its parameters are the Linear's.
      self.head = linear(cfg.hidden, cfg.vocab_size, ("embed", "vocab"), rngs, **dtypes) if cfg.untied_head else None

  def __call__(
    self,
    items: jax.Array,
    positions: jax.Array,
    segments: jax.Array,
    seq_ids: jax.Array,
    users: jax.Array,
    *,
    dropout_key: jax.Array | None = None,
  ) -> jax.Array:
    """Encodes packed rows.

    Args:
      items: ``[rows, len]`` item ids, 0 = padding.
      positions: ``[rows, len]`` position of each token within its user's window.
      segments: ``[rows, len]`` 0 = real item, 1 = generated (prompt) item.
      seq_ids: ``[rows, len]`` which user of the row a token belongs to, 0 = padding.
      users: ``[rows, len]`` user id of each token (0 = padding or unknown user).
      dropout_key: PRNG key for dropout; None for deterministic evaluation.

    Returns:
      ``[rows, len, hidden]`` hidden states in ``cfg.dtype``; padding positions carry no information.
    """
    keys = jax.random.split(dropout_key, self.cfg.num_layers + 2) if dropout_key is not None else None
    if self.user_embed is not None and keys is not None and self.cfg.user_dropout > 0:
      # One draw per (row, user slot), so all of a user's tokens lose the user vector together; the
      # unknown-user row 0 learns a generic user and the model cannot lean on memorised user vectors.
      drop_rs = jax.random.bernoulli(keys[-2], self.cfg.user_dropout, (users.shape[0], users.shape[1] + 1))
      users = jnp.where(jnp.take_along_axis(drop_rs, seq_ids, axis=1), 0, users)
    x_rld = dropout(
      self.embed(items, positions, segments, users), self.cfg.hidden_dropout, None if keys is None else keys[-1]
    )
    for i, block in enumerate(self.blocks):
      x_rld = block(x_rld, seq_ids, None if keys is None else keys[i])
    if self.final_norm is not None:
      x_rld = self.final_norm(x_rld)
    return x_rld

  def embed(self, items: jax.Array, positions: jax.Array, segments: jax.Array, users: jax.Array) -> jax.Array:
    """Input embedding of tokens of any leading shape: LN(item + position + segment + user), no dropout."""
    dtype = self.cfg.dtype
    x = lookup(self.item_embed, items, dtype)
    x = x + lookup(self.pos_embed, jnp.clip(positions, 0, self.cfg.max_len - 1), dtype)
    x = x + lookup(self.seg_embed, segments, dtype)
    if self.user_embed is not None:
      x = x + lookup(self.user_embed, users, dtype)
    return self.embed_norm(x)

  def item_table(self) -> jax.Array:
    """The ``[num_items + 1, hidden]`` table used by the tied head (row 0 = padding)."""
    return self.item_embed.embedding[...]

  def head_weights(self, head: str = "tied") -> tuple[jax.Array, jax.Array | None]:
    """``(table [vocab_size, hidden], bias [vocab_size] or None)`` of the tied or untied head."""
    if head == "untied":
      if self.head is None:
        raise ValueError("the untied head was requested but model.untied_head is False")
      return self.head.kernel[...].T, self.head.bias[...]
    return self.item_table(), None

  def logits(self, hidden: jax.Array, head: str = "tied") -> jax.Array:
    """Scores ``[..., vocab_size]`` of every item (index = item id) for hidden states ``[..., hidden]``.

    Scores are float32 whatever the activation dtype (``precision.item_scores``). Column 0 (padding) is scored
    like any item (callers exclude it); the vocabulary padding columns (ids > num_items) get the lowest float,
    so they are never ranked or sampled.
    """
    scores = precision.item_scores(hidden, *self.head_weights(head))
    if self.cfg.vocab_size > self.cfg.num_items + 1:
      ids = jnp.arange(self.cfg.vocab_size)
      scores = jnp.where(ids > self.cfg.num_items, jnp.finfo(scores.dtype).min, scores)
    return scores
