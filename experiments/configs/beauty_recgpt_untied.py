"""RecGPT on Beauty, variant: the reference's untied head trains the loss and chooses the prompts.

The pre-trained model (tied head only) starts the untied head as a copy of its item table. Evaluation and
recall score items with the head the loss trains (here the untied one). Compare with
``--config.prompt.head=tied`` (untied loss, prompts from the item table) and with beauty_recgpt (tied).

  python -m recgpt_jax.main --mode=prompt_tune --config=experiments/configs/beauty_recgpt_untied.py \
      --workdir=runs/beauty_recgpt_untied --config.init_from=runs/beauty_ce_nouser \
      --config.results_dir=experiments/results
"""

from experiments.configs import beauty_recgpt


def get_config():
  c = beauty_recgpt.get_config()
  c.name = "beauty_recgpt_untied"
  c.model.untied_head = True
  c.train.head = "untied"
  c.prompt.head = "untied"
  return c
