"""RecGPT in PyTorch: the same model as ``recgpt_jax.model.transformer.RecGPT``, written from its spec.

Rows are *packed* (several users per row; ``seq_ids`` says which user a token belongs to, 0 = padding) and
attention is causal within a user only (``causal_packed_mask``). Both attention kinds are computed in
their parallel, masked ``L x L`` form with batched matmuls, as the JAX code does:

* softmax: masked logits, softmax, times the mask (padding queries, which have no valid key, get zeros);
* flow: causal Flow-Attention with every prefix sum a product with the mask, the same formulas, ``eps``
  and clipping as ``recgpt_jax.model.attention.flow_attention_parts``.

Parameter names mirror the JAX module tree (``item_embed``, ``blocks.0.attn.qkv``, ...), so
``experiments.torch_recgpt.convert`` maps them one to one (torch ``Linear.weight`` is the transposed
flax kernel). Dropout (hidden, attention weights, user vector) is active in ``train()`` mode only; its
random draws naturally differ from JAX's, so parity is tested with dropout rates of 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recgpt_jax.model.transformer import ModelConfig

# Flow-Attention's stabiliser (recgpt_jax.model.attention.FLOW_EPS).
FLOW_EPS = 1e-6
# LayerNorm epsilon of every norm of the model.
LN_EPS = 1e-12
# Standard deviation of the normal initialisation of embeddings and linear weights (as in JAX).
INIT_STD = 0.02


def dropout(x: torch.Tensor, rate: float, training: bool = True) -> torch.Tensor:
  """Inverted dropout ``where(keep, x / (1 - rate), 0)`` as in the JAX code; the identity in evaluation.

  Drawing the keep mask with ``rand >= rate`` is ~4x faster on CPU than ``F.dropout`` (a Bernoulli draw)."""
  if not training or rate <= 0.0:
    return x
  keep = torch.rand_like(x) >= rate
  return torch.where(keep, x * (1.0 / (1.0 - rate)), torch.zeros((), dtype=x.dtype, device=x.device))


def causal_packed_mask(seq_ids: torch.Tensor) -> torch.Tensor:
  """Boolean ``[rows, 1, len, len]`` mask: ``mask[r, 0, i, j]`` iff ``seq_ids[r, i] == seq_ids[r, j] != 0``
  and ``j <= i`` (same user, not padding, causal)."""
  length = seq_ids.shape[-1]
  same = (seq_ids[:, :, None] == seq_ids[:, None, :]) & (seq_ids[:, None, :] != 0)
  causal = torch.ones(length, length, dtype=torch.bool, device=seq_ids.device).tril()
  return (same & causal)[:, None]


def softmax_attention(
  q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, dropout_p: float = 0.0
) -> torch.Tensor:
  """Masked scaled dot-product attention over ``[b, h, len, d]``; padding queries get zeros.

  Written out as in the JAX code (masked logits at the lowest float, softmax, times the mask, so a padding
  query's all-masked row gives zeros): at these sizes (``len`` ~50, ``d`` ~128) it is ~15% faster on CPU
  than ``F.scaled_dot_product_attention``, which also needs a fix-up for all-masked rows.

  Args:
    q, k, v: ``[b, h, len, d]``.
    mask: ``[b, 1, len, len]`` bool from ``causal_packed_mask``.
    dropout_p: dropout rate on the attention weights (pass 0 in evaluation).
  """
  scale = q.shape[-1] ** -0.5
  logits = torch.matmul(q * scale, k.transpose(-1, -2)).masked_fill(~mask, torch.finfo(q.dtype).min)
  weights = torch.softmax(logits, dim=-1) * mask
  return torch.matmul(dropout(weights, dropout_p), v)


def flow_attention(
  q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, dropout_p: float = 0.0
) -> torch.Tensor:
  """Causal Flow-Attention in masked parallel form; ``[b, h, len, d]``, zero at padding positions.

  With ``cs(x)_i = sum_{j <= i, same user} x_j`` (a product with the mask), ``n_i`` the user's tokens up to
  ``i``, ``Q = sigmoid(q)``, ``K = sigmoid(k)``:

  * ``in_i = n_i / <Q_i + eps, cs(K)_i + eps>``, ``out_i = n_i / <K_i + eps, cs(Q)_i + eps>``
  * ``sink_i = <Q_i + eps, cs(K out)_i + eps> / n_i``, ``src_i = clip(<K_i + eps, cs(Q in)_i + eps> / n_i, -1, 1)``
  * ``alloc_i = sigmoid(sink_i)``, ``comp_i = n_i exp(src_i) / cs(exp(src))_i``
  * ``y_i = alloc_i sum_{j <= i} <Q_i in_i / n_i, K_j> comp_j V_j``

  The two pairs of prefix sums that share the mask are each one matmul over concatenated features.
  """
  eps = FLOW_EPS
  d = q.shape[-1]
  m = mask.to(q.dtype)  # [b, 1, i, j]
  n = m.sum(dim=-1)  # [b, 1, i]
  valid = n > 0
  n_safe = torch.where(valid, n, torch.ones_like(n))
  qs, ks = torch.sigmoid(q), torch.sigmoid(k)
  cs_k, cs_q = torch.matmul(m, torch.cat([ks, qs], dim=-1)).split(d, dim=-1)
  inflow = n / ((qs + eps) * (cs_k + eps)).sum(dim=-1)  # [b, h, i]
  outflow = n / ((ks + eps) * (cs_q + eps)).sum(dim=-1)
  cs_kout, cs_qin = torch.matmul(m, torch.cat([ks * outflow[..., None], qs * inflow[..., None]], dim=-1)).split(
    d, dim=-1
  )
  sink = ((qs + eps) * (cs_kout + eps)).sum(dim=-1) / n_safe
  src = torch.clamp(((ks + eps) * (cs_qin + eps)).sum(dim=-1) / n_safe, -1.0, 1.0)
  alloc = torch.sigmoid(sink)
  exp_src = torch.where(valid, torch.exp(src), torch.zeros_like(src))
  cs_exp = torch.matmul(m, exp_src[..., None])[..., 0]
  comp = n * exp_src / torch.where(valid, cs_exp, torch.ones_like(cs_exp))
  q_scaled = qs * (inflow / n_safe)[..., None]
  weights = torch.matmul(q_scaled, ks.transpose(-1, -2)) * m * comp[:, :, None, :]
  weights = dropout(weights, dropout_p)
  return alloc[..., None] * torch.matmul(weights, v)


ATTENTION = {"softmax": softmax_attention, "flow": flow_attention}


def _linear(n_in: int, n_out: int) -> nn.Linear:
  layer = nn.Linear(n_in, n_out)
  nn.init.normal_(layer.weight, std=INIT_STD)
  nn.init.zeros_(layer.bias)
  return layer


def _embedding(rows: int, hidden: int) -> nn.Embedding:
  table = nn.Embedding(rows, hidden)
  nn.init.normal_(table.weight, std=INIT_STD)
  return table


class MultiHeadAttention(nn.Module):
  """Multi-head self-attention of either kind with fused q/k/v input projection and output projection."""

  def __init__(self, hidden: int, num_heads: int, kind: str, dropout_rate: float):
    super().__init__()
    if kind not in ATTENTION:
      raise ValueError(f"unknown attention kind {kind!r}; expected one of {tuple(ATTENTION)}")
    if hidden % num_heads:
      raise ValueError(f"hidden size {hidden} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.kind = kind
    self.dropout_rate = dropout_rate
    self.qkv = _linear(hidden, 3 * hidden)
    self.out = _linear(hidden, hidden)

  def forward(self, x_bld: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    b, length, hidden = x_bld.shape
    qkv = self.qkv(x_bld).view(b, length, 3, self.num_heads, hidden // self.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [b, h, len, d]
    p = self.dropout_rate if self.training else 0.0
    y = ATTENTION[self.kind](q, k, v, mask, p)
    return self.out(y.transpose(1, 2).reshape(b, length, hidden))


class Block(nn.Module):
  """Transformer block. Post-LN: ``h = LN(x + Drop(Attn(x)))``, ``y = LN(h + Drop(FFN(h)))``; pre-LN:
  ``h = x + Drop(Attn(LN(x)))``, ``y = h + Drop(FFN(LN(h)))``. FFN = Linear, exact GELU, Linear."""

  def __init__(self, cfg: ModelConfig):
    super().__init__()
    self.pre_norm = cfg.norm == "pre"
    self.hidden_dropout = cfg.hidden_dropout
    self.attn = MultiHeadAttention(cfg.hidden, cfg.num_heads, cfg.attention, cfg.attn_dropout)
    self.norm1 = nn.LayerNorm(cfg.hidden, eps=LN_EPS)
    self.ffn_in = _linear(cfg.hidden, cfg.ffn)
    self.ffn_out = _linear(cfg.ffn, cfg.hidden)
    self.norm2 = nn.LayerNorm(cfg.hidden, eps=LN_EPS)

  def ffn(self, h: torch.Tensor) -> torch.Tensor:
    """The position-wise feed-forward branch, without dropout."""
    return self.ffn_out(F.gelu(self.ffn_in(h)))

  def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    p, train = self.hidden_dropout, self.training
    if self.pre_norm:
      x = x + dropout(self.attn(self.norm1(x), mask), p, train)
      return x + dropout(self.ffn(self.norm2(x)), p, train)
    h = self.norm1(x + dropout(self.attn(x, mask), p, train))
    return self.norm2(h + dropout(self.ffn(h), p, train))


class TorchRecGPT(nn.Module):
  """Causal transformer over packed rows of item ids; ``forward`` returns hidden states ``[rows, len, hidden]``.

  Input at each position: LN(item + position + segment [+ user]) embeddings; the position restarts at 0
  for every user of a row. The tied head scores items with the item table, the optional untied head
  with its own ``Linear(hidden, vocab_size)``.
  """

  def __init__(self, cfg: ModelConfig):
    super().__init__()
    self.cfg = cfg
    self.item_embed = _embedding(cfg.vocab_size, cfg.hidden)
    self.user_embed = _embedding(cfg.num_users + 1, cfg.hidden) if cfg.user_module else None
    self.pos_embed = _embedding(cfg.max_len, cfg.hidden)
    self.seg_embed = _embedding(2, cfg.hidden)
    self.embed_norm = nn.LayerNorm(cfg.hidden, eps=LN_EPS)
    self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
    self.final_norm = nn.LayerNorm(cfg.hidden, eps=LN_EPS) if cfg.norm == "pre" else None
    self.head = _linear(cfg.hidden, cfg.vocab_size) if cfg.untied_head else None
    # Columns of the vocabulary padding (ids > num_items): never ranked or sampled.
    self.register_buffer("vocab_padding", torch.arange(cfg.vocab_size) > cfg.num_items, persistent=False)

  def forward(
    self,
    items: torch.Tensor,
    positions: torch.Tensor,
    segments: torch.Tensor,
    seq_ids: torch.Tensor,
    users: torch.Tensor,
  ) -> torch.Tensor:
    """Encodes packed rows (all inputs int ``[rows, len]``, as in the JAX model); returns ``[rows, len, hidden]``.

    In training mode, with ``cfg.user_dropout > 0``, each (row, user slot) independently loses its user
    vector (replaced by the unknown-user row 0), so all of a user's tokens lose it together.
    """
    cfg = self.cfg
    if self.training and self.user_embed is not None and cfg.user_dropout > 0:
      rows, length = users.shape
      drop = torch.rand(rows, length + 1, device=users.device) < cfg.user_dropout
      users = torch.where(torch.gather(drop, 1, seq_ids.long()), torch.zeros_like(users), users)
    x = dropout(self.embed(items, positions, segments, users), cfg.hidden_dropout, self.training)
    mask = causal_packed_mask(seq_ids)
    for block in self.blocks:
      x = block(x, mask)
    if self.final_norm is not None:
      x = self.final_norm(x)
    return x

  def embed(
    self, items: torch.Tensor, positions: torch.Tensor, segments: torch.Tensor, users: torch.Tensor
  ) -> torch.Tensor:
    """Input embedding of tokens of any leading shape: LN(item + position + segment + user), no dropout."""
    x = self.item_embed(items) + self.pos_embed(positions.clamp(0, self.cfg.max_len - 1))
    x = x + self.seg_embed(segments)
    if self.user_embed is not None:
      x = x + self.user_embed(users)
    return self.embed_norm(x)

  def head_weights(self, head: str = "tied") -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(table [vocab_size, hidden], bias [vocab_size] or None)`` of the tied or untied head."""
    if head == "untied":
      if self.head is None:
        raise ValueError("the untied head was requested but model.untied_head is False")
      return self.head.weight, self.head.bias
    if head != "tied":
      raise ValueError(f"head must be 'tied' or 'untied', got {head!r}")
    return self.item_embed.weight, None

  def logits(self, hidden: torch.Tensor, head: str = "tied") -> torch.Tensor:
    """Scores ``[..., vocab_size]`` (index = item id) of hidden states ``[..., hidden]``.

    Column 0 (padding) is scored like any item (callers exclude it); the vocabulary padding columns (ids >
    num_items) get the lowest float. The train steps use ``steps.item_scores`` (real items only) instead.
    """
    table, bias = self.head_weights(head)
    scores = F.linear(hidden, table, bias)
    if self.cfg.vocab_size > self.cfg.num_items + 1:
      return scores.masked_fill(self.vocab_padding, torch.finfo(scores.dtype).min)
    return scores
