"""Beauty pre-training with full-softmax CE in bfloat16 mixed precision (the float32 recipe otherwise).

Activations and matmuls in bfloat16, float32 parameters, optimizer state, norms' statistics, softmax, item
scores and loss (recgpt_jax/model/precision.py). Compared with the float32 recipe in
experiments/results/precision_beauty.md.

  python -m recgpt_jax.main --config=experiments/configs/beauty_pretrain_ce_bf16.py \
      --workdir=runs/beauty_pretrain_ce_bf16 --config.results_dir=experiments/results
"""

from experiments.configs import beauty_pretrain_ce


def get_config():
  c = beauty_pretrain_ce.get_config()
  c.name = "beauty_pretrain_ce_bf16"
  c.model.dtype = "bfloat16"
  return c
