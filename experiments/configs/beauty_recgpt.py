"""RecGPT on Beauty: prompt-tuning from the pre-trained CE model, then two-step multi-interest recall.

Stage 1 (pre-training) is experiments/configs/beauty_pretrain_ce.py; this config starts from its workdir:

  python -m recgpt_jax.main --config=experiments/configs/beauty_pretrain_ce.py --workdir=runs/beauty_ce
  python -m recgpt_jax.main --mode=prompt_tune --config=experiments/configs/beauty_recgpt.py \
      --workdir=runs/beauty_recgpt --config.init_from=runs/beauty_ce --config.results_dir=experiments/results
"""

from experiments.configs import beauty_pretrain_ce


def get_config():
  c = beauty_pretrain_ce.get_config()  # same data and architecture as the pre-trained model
  c.name = "beauty_recgpt"
  c.init_from = "runs/beauty_ce"
  c.prompt.mode = "last"  # the reference default: the last real input is replaced by a generated item
  c.prompt.width = 1
  c.prompt.head = "tied"
  c.optimizer.learning_rate = 5e-4  # the reference's prompt-tuning rate
  c.train.num_epochs = 40
  c.train.patience = 5
  c.recall.quotas = (18, 2)  # K = 20: 18 items from the first interest, 2 after the generated item
  return c
