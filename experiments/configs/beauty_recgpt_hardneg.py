"""RecGPT on Beauty, variant: the shown-but-not-clicked prompts as extra hard negatives.

  python -m recgpt_jax.main --mode=prompt_tune --config=experiments/configs/beauty_recgpt_hardneg.py \
      --workdir=runs/beauty_recgpt_hardneg --config.init_from=runs/beauty_ce --config.results_dir=experiments/results
"""

from experiments.configs import beauty_recgpt


def get_config():
  c = beauty_recgpt.get_config()
  c.name = "beauty_recgpt_hardneg"
  c.prompt.hard_negative_weight = 0.5  # also rank the clicked item above the shown prompt
  return c
