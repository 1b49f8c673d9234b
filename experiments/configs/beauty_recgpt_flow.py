"""RecGPT on Beauty, variant: flow attention, from experiments/configs/beauty_pretrain_ce_flow.py.

  python -m recgpt_jax.main --mode=prompt_tune --config=experiments/configs/beauty_recgpt_flow.py \
      --workdir=runs/beauty_recgpt_flow --config.init_from=runs/beauty_ce_flow --config.results_dir=experiments/results
"""

from experiments.configs import beauty_recgpt


def get_config():
  c = beauty_recgpt.get_config()
  c.name = "beauty_recgpt_flow"
  c.model.attention = "flow"
  c.init_from = "runs/beauty_ce_flow"
  return c
