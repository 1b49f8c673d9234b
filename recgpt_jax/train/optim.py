"""Optimizers: optax Adam(W) with a learning-rate schedule and optional global-norm clipping."""

from __future__ import annotations

import jax
import ml_collections
import optax

from recgpt_jax.errors import ConfigError
from recgpt_jax.train import rows

SCHEDULES = ("constant", "cosine", "warmup_cosine", "linear")


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Builds the schedule named by ``cfg.schedule`` over ``total_steps`` steps."""
  lr, warmup = cfg.learning_rate, cfg.warmup_steps
  total_steps = max(total_steps, warmup + 1)
  if cfg.schedule == "constant":
    base = optax.constant_schedule(lr)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), base], [warmup]) if warmup else base
  if cfg.schedule in ("cosine", "warmup_cosine"):
    return optax.warmup_cosine_decay_schedule(0.0 if warmup else lr, lr, warmup, total_steps, end_value=0.0)
  if cfg.schedule == "linear":
    return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.linear_schedule(lr, 0.0, total_steps - warmup)],
      [max(warmup, 1)],
    )
  raise ConfigError(f"unknown optimizer.schedule {cfg.schedule!r}; expected one of {SCHEDULES}")


def _decay_mask(params):
  """Weight decay on matrices only: no decay on embeddings tables, biases and LayerNorm parameters."""

  def keep(path, leaf):
    names = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
    return leaf.ndim == 2 and names[-1] == "kernel"

  return jax.tree_util.tree_map_with_path(keep, params)


def adam_spec(cfg: ml_collections.ConfigDict, total_steps: int) -> rows.AdamSpec:
  """What the row-sparse table update (``recgpt_jax.train.rows``) needs to know of ``make_optimizer(cfg)``."""
  return rows.AdamSpec(
    b1=cfg.b1,
    b2=cfg.b2,
    eps=cfg.eps,
    schedule=learning_rate_schedule(cfg, total_steps),
    clip_norm=float(cfg.clip_norm or 0.0),
  )


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """Adam (AdamW when ``cfg.weight_decay > 0``) with the configured schedule and clipping."""
  schedule = learning_rate_schedule(cfg, total_steps)
  parts = []
  if cfg.clip_norm and cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(
    optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=_decay_mask)
  )
  return optax.chain(*parts)
