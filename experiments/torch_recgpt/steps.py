"""Training and evaluation steps for ``TorchRecGPT``, written from the spec of ``recgpt_jax.train``.

* Pre-training: next-item loss on packed rows (``'ce'`` full softmax over the catalogue, column 0 never a
  candidate; or ``'bce'`` / ``'sampled_softmax'`` with negatives drawn by torch's RNG), then one Adam step.
* Prompt-tuning: under ``torch.no_grad()`` and without dropout, the *current* model scores every position
  of the real view; ``pick_prompt_items`` chooses the generated items column by column exactly as
  ``recgpt_jax.train.prompts.pick_prompt_items`` (best-scoring items not in the user's used set, same
  candidate order and tie-breaking); the loss is then computed on the prompted view.
* Evaluation: HR@k / NDCG@k sums of the full-catalogue ranking at each user's last position, history
  excluded (``recgpt_jax.eval.metrics.make_eval_step`` without multi-interest recall).

``make_step(..., compile=True)`` wraps the model forward + loss in ``torch.compile`` (inductor; the backward
is compiled by AOTAutograd too) and the generation forward in a second compiled function. The prompt
picker stays eager: it is a sequential loop over the row's columns (each column's used set depends on the
previous picks); compiling it would unroll ``len`` iterations into one graph, and the exhausted-candidate
fallback is data-dependent. On a 2-core CPU at the reference size (hidden 256, Beauty, 30 rows of 50),
compiling pays off only for the full-softmax loss, where it fuses the ``[tokens, items]`` log-softmax and
its gradient (~15% faster forward + backward); with BCE it is ~10-40% *slower* than eager (inductor's
scatter-add for the embedding-gather gradients and its small per-token kernels lose to ATen's), so the
eager step is the one to use there. A first compiled step takes ~5-35 s (cold inductor cache).

Batches are dicts of int tensors (``to_torch_batch`` converts the numpy batches of
``recgpt_jax.data.pipeline``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from experiments.torch_recgpt import convert
from experiments.torch_recgpt.model import TorchRecGPT

Batch = dict[str, torch.Tensor]
MODEL_INPUTS = ("items", "positions", "segments", "seq_ids", "users")
STAGES = ("pretrain", "prompt_tune")
LOSSES = ("ce", "bce", "sampled_softmax")
PROMPT_MODES = ("last", "interleave")
# Candidates per column the prompt picker compares with the used set (recgpt_jax.train.prompts).
NUM_CANDIDATES = 32
KS = (5, 10, 20)


def to_torch_batch(batch: Mapping[str, np.ndarray]) -> Batch:
  """int64 torch tensors of a numpy batch (index tensors must be int64 for gather/scatter)."""
  return {k: torch.from_numpy(np.asarray(v)).long() for k, v in batch.items()}


def _masked_mean(per_token: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
  return (per_token * weights).sum() / weights.sum().clamp(min=1.0)


# ----------------------------------------------------------------------------------------------------------
# Losses.


def item_scores(model: TorchRecGPT, hidden: torch.Tensor, head: str = "tied") -> torch.Tensor:
  """Scores ``[..., num_items]`` of the real items only (column ``j`` = item ``j + 1``).

  The JAX code scores the whole vocabulary and gives the non-items (item 0, ids > num_items) the lowest
  float, so they add exactly nothing to a softmax and are never chosen; leaving them out is the same math
  without a masking pass over the (largest) ``[rows, len, vocab]`` tensor and its gradient.
  """
  table, bias = model.head_weights(head)
  num_items = model.cfg.num_items
  return F.linear(hidden, table[1 : num_items + 1], None if bias is None else bias[1 : num_items + 1])


def full_softmax_ce(scores_rln: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
  """Mean cross-entropy over real targets (``> 0``) of the whole catalogue; ``scores_rln`` are ``item_scores``
  (``recgpt_jax.train.losses.full_softmax_ce``: column 0 is never a candidate)."""
  total = F.cross_entropy(scores_rln.flatten(0, -2), targets.flatten() - 1, ignore_index=-1, reduction="sum")
  return total / (targets > 0).sum().clamp(min=1).to(total.dtype)


def sample_negatives(items: torch.Tensor, targets: torch.Tensor, seq_ids: torch.Tensor, num_items: int) -> torch.Tensor:
  """One uniform negative per position from the items its user never touched in the row.

  Same exact rule as ``recgpt_jax.train.losses.sample_negatives`` (the ``u``-th item of the complement of
  the user's sorted distinct items is ``u + 1 + #{k : s_k - k <= u}``), with torch's RNG.
  """
  big = num_items + 1
  same_user = seq_ids[:, :, None] == seq_ids[:, None, :]  # [r, i, j]
  owned = torch.cat([items, targets], dim=-1)  # [r, 2l]
  keep = torch.cat([same_user, same_user], dim=-1) & (owned[:, None, :] > 0)
  owned = torch.where(keep, owned[:, None, :], torch.full_like(owned[:, None, :], big)).sort(dim=-1).values
  dup = torch.cat([torch.zeros_like(owned[..., :1], dtype=torch.bool), owned[..., 1:] == owned[..., :-1]], dim=-1)
  owned = torch.where(dup, torch.full_like(owned, big), owned).sort(dim=-1).values
  valid = owned < big
  num_owned = valid.sum(dim=-1)
  u = torch.floor(torch.rand(items.shape, device=items.device) * (num_items - num_owned)).long()
  rank = torch.arange(1, owned.shape[-1] + 1, device=items.device)
  skip = (valid & (owned - rank <= u[..., None])).sum(dim=-1)
  return (u + 1 + skip).clamp(1, num_items)


def bce_loss(hidden_rld: torch.Tensor, table_vd: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor):
  """``-log sigmoid(s_pos) - log(1 - sigmoid(s_neg))`` with one negative per position, mean over real targets."""
  # One gather (and one scatter-add in the backward) for both items.
  pos, neg = (hidden_rld[..., None, :] * table_vd[torch.stack([targets, negatives], dim=-1)]).sum(dim=-1).unbind(-1)
  per_token = -F.logsigmoid(pos) - F.logsigmoid(-neg)
  return _masked_mean(per_token, (targets > 0).to(hidden_rld.dtype))


def sampled_softmax(hidden_rld: torch.Tensor, table_vd: torch.Tensor, targets: torch.Tensor, negatives_n: torch.Tensor):
  """Softmax over the target and ``N`` shared uniform negatives (a negative equal to the target is masked)."""
  pos = (hidden_rld * table_vd[targets]).sum(dim=-1, keepdim=True)  # [r, l, 1]
  neg = hidden_rld @ table_vd[negatives_n].T  # [r, l, n]
  neg = neg.masked_fill(negatives_n[None, None, :] == targets[..., None], torch.finfo(neg.dtype).min)
  per_token = torch.logsumexp(torch.cat([pos, neg], dim=-1), dim=-1) - pos[..., 0]
  return _masked_mean(per_token, (targets > 0).to(hidden_rld.dtype))


def loss_from_hidden(
  model: TorchRecGPT,
  hidden: torch.Tensor,
  batch: Batch,
  kind: str = "ce",
  head: str = "tied",
  num_negatives: int = 256,
) -> torch.Tensor:
  """The training loss of hidden states ``[r, l, d]`` for ``batch['targets']`` (0 = no loss)."""
  targets = batch["targets"]
  num_items = model.cfg.num_items
  if kind == "ce":
    return full_softmax_ce(item_scores(model, hidden, head), targets)
  table, _ = model.head_weights(head)
  if kind == "bce":
    negatives = sample_negatives(batch["items"], targets, batch["seq_ids"], num_items)
    return bce_loss(hidden, table, targets, negatives)
  if kind == "sampled_softmax":
    negatives = torch.randint(1, num_items + 1, (num_negatives,), device=hidden.device)
    return sampled_softmax(hidden, table, targets, negatives)
  raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")


def hard_negative_loss(model: TorchRecGPT, hidden: torch.Tensor, prompted: Batch) -> torch.Tensor:
  """Mean ``softplus(s_shown - s_clicked)`` over prompt slots (``recgpt_jax.train.step.hard_negative_loss``)."""
  rows, length = hidden.shape[:2]
  row_idx = torch.arange(rows, device=hidden.device)[:, None]
  slot = prompted["gen_col"] >= 0
  at = (torch.arange(length, device=hidden.device)[None, :] - 1 - prompted["gen_rank"]).clamp(0, length - 1)
  h = hidden[row_idx, at]  # [r, l, d] the hidden state that "showed" the slot's item
  clicked = prompted["targets"][row_idx, at]
  shown = prompted["items"]
  in_window = prompted["positions"] - 1 - prompted["gen_rank"] >= 0  # the showing token is this user's
  weights = (slot & in_window & (clicked > 0) & (shown != clicked)).to(hidden.dtype)
  table = model.item_embed.weight
  margin = (h * (table[shown] - table[clicked])).sum(dim=-1)
  return _masked_mean(F.softplus(margin), weights)


# ----------------------------------------------------------------------------------------------------------
# Prompt generation.


def candidate_items(scores_rln: torch.Tensor, count: int) -> torch.Tensor:
  """``[r, l, count]`` best ids of every column in ``jax.lax.top_k`` order over the whole vocabulary.

  ``scores_rln`` are ``item_scores`` (real items only). In the JAX code the non-items (item 0 and the
  vocabulary padding ids) all score the lowest float and follow the real items in ascending id order
  when ``count`` exceeds the catalogue; ``torch.topk`` does not order ties, so they are appended here.

  Args:
    scores_rln: ``[r, l, num_items]`` item scores.
    count: candidates per column (at most the vocabulary size minus one, as in JAX).
  """
  num_items = scores_rln.shape[-1]
  k_real = min(count, num_items)
  cand = torch.topk(scores_rln, k_real, dim=-1).indices + 1
  if count > k_real:
    filler = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(num_items + 1, num_items + count - k_real)])
    cand = torch.cat([cand, filler[: count - k_real].to(cand.device).expand(*cand.shape[:-1], -1)], dim=-1)
  return cand


def pick_prompt_items(
  scores_rln: torch.Tensor, batch: Batch, mode: str, width: int, vocab_size: int | None = None
) -> torch.Tensor:
  """Chooses the generated items column by column, as ``recgpt_jax.train.prompts.pick_prompt_items``.

  At column ``t`` the item the prompted sequence holds there (the real item, or in ``'last'`` mode at a
  slot the pick made at ``t - 1``) joins the user's used set; then the pick is the first candidate (in
  score order) not in the set, or if all ``NUM_CANDIDATES`` candidates are used, the exact argmax over the
  catalogue with used items excluded (0 if every real item is used: the JAX argmax over all-lowest scores).
  In ``'interleave'`` mode each of the ``width`` picks joins the used set before the next. The used set is
  a ``[rows, vocab]`` table of *stamps*: an item is used iff its stamp equals the row's current user
  counter, which is bumped where a new user starts (position 0), so forgetting a user costs nothing.

  Args:
    scores_rln: ``[r, l, num_items]`` real-view ``item_scores`` (column ``j`` = item ``j + 1``).
    batch: the prompt-tuning batch (``items``, ``positions``, ``seq_ids`` of the real view; ``gen_col``).
    mode: ``'last'`` or ``'interleave'``.
    width: prompt width ``w``.
    vocab_size: the model's vocabulary (``cfg.vocab_size``, default ``num_items + 1``): the number of
      candidates is ``min(NUM_CANDIDATES, vocab_size - 1)`` as in JAX, which matters for tiny catalogues.

  Returns:
    ``[r, l, picks]`` int64 (``picks`` = ``width`` for interleave, 1 for last), in score order.
  """
  if mode not in PROMPT_MODES:
    raise ValueError(f"prompt mode must be one of {PROMPT_MODES}, got {mode!r}")
  rows, length, num_items = scores_rln.shape
  vocab = max(vocab_size or 0, num_items + 1)
  device = scores_rln.device
  low = torch.finfo(scores_rln.dtype).min
  num_picks = width if mode == "interleave" else 1
  cand_rlc = candidate_items(scores_rln, min(NUM_CANDIDATES, vocab - 1))
  items, gen_col = batch["items"], batch["gen_col"]
  slot_rl = None
  if mode == "last":  # column t is a slot iff some prompted token has gen_col == t - 1
    cols = torch.where(gen_col >= 0, gen_col + 1, torch.full_like(gen_col, length))
    slot_rl = torch.zeros(rows, length + 1, dtype=torch.bool, device=device).scatter_(1, cols, True)[:, :length]
  new_user_rl = (batch["positions"] == 0) & (batch["seq_ids"] > 0)
  stamp_rl = torch.cumsum(new_user_rl.long(), dim=1)  # the row's user counter at every column
  used_rv = torch.full((rows, vocab), -1, dtype=torch.long, device=device)  # stamp of the user that used it
  row_idx = torch.arange(rows, device=device)
  picks_rlk = torch.empty(rows, length, num_picks, dtype=torch.long, device=device)
  prev_pick_r = torch.zeros(rows, dtype=torch.long, device=device)
  for t in range(length):
    stamp_r = stamp_rl[:, t]
    here_r = items[:, t] if slot_rl is None else torch.where(slot_rl[:, t], prev_pick_r, items[:, t])
    used_rv[row_idx, here_r] = stamp_r
    cand_rc = cand_rlc[:, t]
    for k in range(num_picks):
      free_rc = used_rv.gather(1, cand_rc) != stamp_r[:, None]
      pick_r = cand_rc.gather(1, free_rc.to(torch.uint8).argmax(dim=1, keepdim=True))[:, 0]
      exhausted_r = ~free_rc.any(dim=1)
      if bool(exhausted_r.any()):
        masked_rn = scores_rln[:, t].masked_fill(used_rv[:, 1 : num_items + 1] == stamp_r[:, None], low)
        where_r = masked_rn.argmax(dim=-1)  # the first maximum, as jnp.argmax
        any_free_r = masked_rn.gather(1, where_r[:, None])[:, 0] > low
        best_r = torch.where(any_free_r, where_r + 1, torch.zeros_like(where_r))
        pick_r = torch.where(exhausted_r, best_r, pick_r)
      picks_rlk[:, t, k] = pick_r
      if mode == "interleave":
        used_rv[row_idx, pick_r] = stamp_r
    prev_pick_r = picks_rlk[:, t, 0]
  return picks_rlk


def fill_prompts(picks_rlk: torch.Tensor, batch: Batch) -> torch.Tensor:
  """The prompted view's items: real items, and at each slot the pick ``(gen_col, gen_rank)``."""
  row_idx = torch.arange(picks_rlk.shape[0], device=picks_rlk.device)[:, None]
  gen_col = batch["gen_col"]
  filled = picks_rlk[row_idx, gen_col.clamp(min=0), batch["gen_rank"]]
  return torch.where(gen_col >= 0, filled, batch["p_items"])


def prompted_view(batch: Batch, items: torch.Tensor) -> Batch:
  """The prompted view of a prompt-tuning batch under the model's input names, with ``items`` filled in."""
  return {
    "items": items,
    "positions": batch["p_positions"],
    "segments": batch["p_segments"],
    "seq_ids": batch["p_seq_ids"],
    "users": batch["users"],
    "targets": batch["p_targets"],
    "gen_col": batch["gen_col"],
    "gen_rank": batch["gen_rank"],
  }


def prompted_batch(
  model: TorchRecGPT,
  batch: Batch,
  mode: str,
  width: int,
  head: str = "tied",
  forward: Callable[..., torch.Tensor] | None = None,
) -> Batch:
  """Generates the prompts with ``model`` (no gradient, no dropout) and returns the prompted view.

  ``forward`` (default ``model``) computes the real view's hidden states, e.g. a compiled model.
  """
  was_training = model.training
  model.eval()
  try:
    with torch.no_grad():
      hidden = (model if forward is None else forward)(*(batch[k] for k in MODEL_INPUTS))
      scores = item_scores(model, hidden, head)
      picks = pick_prompt_items(scores, batch, mode, width, model.cfg.vocab_size)
  finally:
    model.train(was_training)
  return prompted_view(batch, fill_prompts(picks, batch))


# ----------------------------------------------------------------------------------------------------------
# Optimizer and steps.


def make_optimizer(
  model: TorchRecGPT,
  learning_rate: float = 1e-3,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  impl: str = "fused",
) -> torch.optim.Optimizer:
  """Adam, or AdamW with decoupled weight decay on weight matrices only (Linear weights; not embeddings,
  biases or LayerNorm), like ``recgpt_jax.train.optim.make_optimizer`` with a constant learning rate.

  torch's Adam and ``optax.adam`` compute the same update, ``lr * m_hat / (sqrt(v_hat) + eps)`` with
  bias-corrected moments and ``eps`` outside the square root (torch folds the corrections into the step
  size and the denominator, so results agree up to float rounding).

  Args:
    impl: ``'foreach'`` (multi-tensor), ``'fused'`` (one fused CPU kernel) or ``'loop'`` (per parameter).
  """
  options = {"foreach": {"foreach": True}, "fused": {"fused": True}, "loop": {"foreach": False}}
  if impl not in options:
    raise ValueError(f"impl must be one of {tuple(options)}, got {impl!r}")
  if weight_decay <= 0:
    return torch.optim.Adam(model.parameters(), lr=learning_rate, betas=(b1, b2), eps=eps, **options[impl])
  decayed = {name for name, path, _ in convert.jax_paths(model) if path[-1] == "kernel"}
  groups = [
    {"params": [p for n, p in model.named_parameters() if n in decayed], "weight_decay": weight_decay},
    {"params": [p for n, p in model.named_parameters() if n not in decayed], "weight_decay": 0.0},
  ]
  return torch.optim.AdamW(groups, lr=learning_rate, betas=(b1, b2), eps=eps, **options[impl])


def optimizer_from_config(model: TorchRecGPT, opt_cfg, impl: str = "fused") -> torch.optim.Optimizer:
  """``make_optimizer`` from the repo's ``config.optimizer``; only the constant schedule without warm-up or
  clipping is implemented (the parity-tested setting)."""
  if opt_cfg.schedule != "constant" or opt_cfg.warmup_steps or opt_cfg.clip_norm:
    raise NotImplementedError("the torch steps implement a constant learning rate without warm-up or clipping")
  return make_optimizer(model, opt_cfg.learning_rate, opt_cfg.b1, opt_cfg.b2, opt_cfg.eps, opt_cfg.weight_decay, impl)


def _grad_norm(model: TorchRecGPT) -> torch.Tensor:
  return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])


def make_step(
  model: TorchRecGPT,
  optimizer: torch.optim.Optimizer,
  *,
  stage: str = "pretrain",
  loss: str = "ce",
  head: str = "tied",
  prompt_mode: str = "last",
  prompt_width: int = 1,
  prompt_head: str = "tied",
  hard_negative_weight: float = 0.0,
  num_negatives: int = 256,
  compile: bool = False,
) -> Callable[[Batch], dict[str, torch.Tensor]]:
  """Returns ``step(batch) -> metrics``: one optimizer step of ``stage`` on a batch (``to_torch_batch``).

  Args:
    model: the model (trained in place; put in train mode by the step).
    optimizer: e.g. ``make_optimizer(model)``.
    stage: ``'pretrain'`` or ``'prompt_tune'`` (prompts generated by the current model, then the loss on
      the prompted view; the batch must be a prompt-tuning batch of ``prompt_mode``/``prompt_width``).
    loss: ``'ce'``, ``'bce'`` or ``'sampled_softmax'``; ``head``: the head scoring items in the loss.
    prompt_mode, prompt_width, prompt_head: the prompts' layout and the head that chooses them.
    hard_negative_weight: weight of the extra pairwise loss (prompt-tuning only; 0 = off).
    num_negatives: negatives of ``sampled_softmax``.
    compile: ``torch.compile`` the forward + loss (and thus its backward) and the generation forward.

  Returns:
    The step; its metrics are scalar tensors ``loss``, ``grad_norm``, ``tokens`` (and
    ``hard_negative_loss`` when used), as the JAX step reports.
  """
  if stage not in STAGES:
    raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
  if loss not in LOSSES:
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
  prompted = stage == "prompt_tune"
  use_hard_negatives = prompted and hard_negative_weight > 0

  def loss_fn(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = model(*(batch[k] for k in MODEL_INPUTS))
    value = loss_from_hidden(model, hidden, batch, loss, head, num_negatives)
    hard = hard_negative_loss(model, hidden, batch) if use_hard_negatives else torch.zeros(())
    return value + hard_negative_weight * hard, hard

  generate = model
  if compile:
    loss_fn = torch.compile(loss_fn)
    generate = torch.compile(model)

  def step(batch: Batch) -> dict[str, torch.Tensor]:
    if prompted:
      batch = prompted_batch(model, batch, prompt_mode, prompt_width, prompt_head, generate)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    value, hard = loss_fn(batch)
    value.backward()
    metrics = {"loss": value.detach(), "grad_norm": _grad_norm(model), "tokens": (batch["targets"] > 0).sum()}
    if use_hard_negatives:
      metrics["hard_negative_loss"] = hard.detach()
    optimizer.step()
    return metrics

  return step


# ----------------------------------------------------------------------------------------------------------
# Evaluation.


def make_forward(model: TorchRecGPT, compile: bool = False) -> Callable[[Batch], torch.Tensor]:
  """``forward(batch) -> hidden [r, l, d]`` in evaluation mode (no dropout, no gradient)."""
  forward = torch.compile(model) if compile else model

  def run(batch: Batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
      return forward(*(batch[k] for k in MODEL_INPUTS))

  return run


def ranking_metrics(scores_uv: torch.Tensor, answer_u: torch.Tensor, exclude_uh: torch.Tensor, ks: Sequence[int] = KS):
  """Per-user HR@k and NDCG@k of the full ranking with padding and each user's history excluded."""
  low = torch.finfo(scores_uv.dtype).min
  scores_uv = scores_uv.scatter(1, exclude_uh, low)
  scores_uv[:, 0] = low
  top_uk = torch.topk(scores_uv, max(ks), dim=-1).indices
  is_answer = top_uk == answer_u[:, None]
  found = is_answer.any(dim=-1)
  rank = is_answer.to(torch.uint8).argmax(dim=-1)
  out = {}
  for k in ks:
    hit = found & (rank < k)
    out[f"HR@{k}"] = hit.float()
    out[f"NDCG@{k}"] = torch.where(hit, 1.0 / torch.log2(rank + 2.0), torch.zeros((), dtype=torch.float32))
  return out


def make_eval_step(
  model: TorchRecGPT, ks: Sequence[int] = KS, head: str = "tied", compile: bool = False
) -> Callable[[Batch], dict[str, torch.Tensor]]:
  """``eval_step(batch) -> sums`` of each metric over the real users of an evaluation batch
  (``recgpt_jax.data.packing.pack_eval_batches``) plus ``users``, like ``recgpt_jax.eval.metrics``."""
  forward = make_forward(model, compile)

  def eval_step(batch: Batch) -> dict[str, torch.Tensor]:
    hidden = forward(batch)
    with torch.no_grad():
      user_hidden = hidden[batch["last_row"], batch["last_col"]]
      per_user = ranking_metrics(model.logits(user_hidden, head), batch["answer"], batch["history"], ks)
    real = (batch["answer"] > 0).float()
    sums = {name: (v * real).sum() for name, v in per_user.items()}
    sums["users"] = real.sum()
    return sums

  return eval_step
