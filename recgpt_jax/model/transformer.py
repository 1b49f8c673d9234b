"""The RecGPT model: a causal transformer over item ids with a user module.

Input at each position: item embedding + user embedding (one learned vector per user, added at every
position; the "user module") + position embedding (restarting at 0 for each user of a packed row) +
segment embedding (0 = an item the user interacted with, 1 = an item the model generated). The hidden
state at a position is the user's interest vector; items are scored by a dot product with the item
table (tied head) or by an optional untied linear head.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from recgpt_jax.model.attention import ATTENTION_KINDS, MultiHeadAttention, causal_packed_mask, dropout

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
  norm: str = "post"  # 'post' (reference) or 'pre'
  attn_dropout: float = 0.0
  hidden_dropout: float = 0.0
  user_module: bool = True
  user_dropout: float = 0.0  # training only: a sequence's user vector is replaced by the unknown-user row
  untied_head: bool = False

  def __post_init__(self):
    if self.attention not in ATTENTION_KINDS:
      raise ValueError(f"model.attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
    if self.norm not in NORMS:
      raise ValueError(f"model.norm must be one of {NORMS}, got {self.norm!r}")
    for name in ("num_items", "num_users", "max_len", "hidden", "num_layers", "num_heads", "ffn"):
      if getattr(self, name) < 1:
        raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
    for name in ("attn_dropout", "hidden_dropout", "user_dropout"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")


class Block(nnx.Module):
  """Transformer block. Post-LN: ``h = LN(x + Drop(Attn(x)))``, ``y = LN(h + Drop(FFN(h)))``."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    self.pre_norm = cfg.norm == "pre"
    self.hidden_dropout = cfg.hidden_dropout
    self.attn = MultiHeadAttention(cfg.hidden, cfg.num_heads, cfg.attention, cfg.attn_dropout, rngs=rngs)
    self.norm1 = nnx.LayerNorm(cfg.hidden, epsilon=1e-12, rngs=rngs)
    self.ffn_in = nnx.Linear(cfg.hidden, cfg.ffn, kernel_init=init, rngs=rngs)
    self.ffn_out = nnx.Linear(cfg.ffn, cfg.hidden, kernel_init=init, rngs=rngs)
    self.norm2 = nnx.LayerNorm(cfg.hidden, epsilon=1e-12, rngs=rngs)

  def ffn(self, h: jax.Array) -> jax.Array:
    """The position-wise feed-forward branch (GELU), without dropout."""
    return self.ffn_out(jax.nn.gelu(self.ffn_in(h), approximate=False))

  def __call__(self, x: jax.Array, mask: jax.Array, key: jax.Array | None) -> jax.Array:
    keys = jax.random.split(key, 4) if key is not None else [None] * 4
    ffn = self.ffn
    if self.pre_norm:
      x = x + dropout(self.attn(self.norm1(x), mask, keys[0]), self.hidden_dropout, keys[1])
      return x + dropout(ffn(self.norm2(x)), self.hidden_dropout, keys[2])
    h = self.norm1(x + dropout(self.attn(x, mask, keys[0]), self.hidden_dropout, keys[1]))
    return self.norm2(h + dropout(ffn(h), self.hidden_dropout, keys[2]))


class RecGPT(nnx.Module):
  """Causal transformer over packed rows of item ids; returns hidden states ``[rows, len, hidden]``."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    init = nnx.initializers.normal(0.02)
    # The item table doubles as the tied output head; row 0 is padding.
    self.item_embed = nnx.Embed(cfg.num_items + 1, cfg.hidden, embedding_init=init, rngs=rngs)
    self.user_embed = (
      nnx.Embed(cfg.num_users + 1, cfg.hidden, embedding_init=init, rngs=rngs) if cfg.user_module else None
    )
    self.pos_embed = nnx.Embed(cfg.max_len, cfg.hidden, embedding_init=init, rngs=rngs)
    self.seg_embed = nnx.Embed(2, cfg.hidden, embedding_init=init, rngs=rngs)
    self.embed_norm = nnx.LayerNorm(cfg.hidden, epsilon=1e-12, rngs=rngs)
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = nnx.LayerNorm(cfg.hidden, epsilon=1e-12, rngs=rngs) if cfg.norm == "pre" else None
    self.head = nnx.Linear(cfg.hidden, cfg.num_items + 1, kernel_init=init, rngs=rngs) if cfg.untied_head else None

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
      ``[rows, len, hidden]`` hidden states; padding positions carry no information.
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
    mask = causal_packed_mask(seq_ids)
    for i, block in enumerate(self.blocks):
      x_rld = block(x_rld, mask, None if keys is None else keys[i])
    if self.final_norm is not None:
      x_rld = self.final_norm(x_rld)
    return x_rld

  def embed(self, items: jax.Array, positions: jax.Array, segments: jax.Array, users: jax.Array) -> jax.Array:
    """Input embedding of tokens of any leading shape: LN(item + position + segment + user), no dropout."""
    x = self.item_embed(items) + self.pos_embed(jnp.clip(positions, 0, self.cfg.max_len - 1))
    x = x + self.seg_embed(segments)
    if self.user_embed is not None:
      x = x + self.user_embed(users)
    return self.embed_norm(x)

  def item_table(self) -> jax.Array:
    """The ``[num_items + 1, hidden]`` table used by the tied head (row 0 = padding)."""
    return self.item_embed.embedding[...]

  def logits(self, hidden: jax.Array, head: str = "tied") -> jax.Array:
    """Scores of every item (index = item id; column 0 is padding) for hidden states ``[..., hidden]``."""
    if head == "untied":
      if self.head is None:
        raise ValueError("the untied head was requested but model.untied_head is False")
      return self.head(hidden)
    return hidden @ self.item_table().T
