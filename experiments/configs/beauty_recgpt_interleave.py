"""RecGPT on Beauty, variant: prompts interleaved after every real item.

  python -m recgpt_jax.main --mode=prompt_tune --config=experiments/configs/beauty_recgpt_interleave.py \
      --workdir=runs/beauty_recgpt_interleave --config.init_from=runs/beauty_ce --config.results_dir=experiments/results
"""

from experiments.configs import beauty_recgpt


def get_config():
  c = beauty_recgpt.get_config()
  c.name = "beauty_recgpt_interleave"
  c.prompt.mode = "interleave"  # a generated item after every real item (w = 1)
  return c
