"""Default run of `make run`: a small softmax-attention model pre-trained on Beauty for a few epochs.

Finishes in a few minutes on a 2-core CPU and prints test HR/NDCG@5/10/20.

  python -m recgpt_jax.main --config=experiments/configs/default.py --workdir=runs/default
"""

from recgpt_jax.config import base_config


def get_config():
  c = base_config()
  c.name = "default"
  c.dataset = "Beauty"
  c.train.num_epochs = 8  # a short run; see beauty_pretrain_ce.py for the full recipe
  # Pre-training generalises better without the per-user vector on Beauty (measured: see
  # experiments/results/beauty_pretrain_ce*.json); prompt-tuning configs keep the same architecture.
  c.model.user_module = False
  return c
