"""Beauty pre-training with full-softmax CE and causal Flow-Attention (the reference code's attention).

Same recipe as beauty_pretrain_ce.py with model.attention = 'flow'.

  python -m recgpt_jax.main --config=experiments/configs/beauty_pretrain_ce_flow.py \
      --workdir=runs/beauty_ce_flow --config.results_dir=experiments/results
"""

from experiments.configs import beauty_pretrain_ce


def get_config():
  c = beauty_pretrain_ce.get_config()
  c.name = "beauty_pretrain_ce_flow"
  c.model.attention = "flow"
  return c
