"""The reference configuration of the speed benchmarks (experiments/reference.py), for ahead-of-time compiles.

Hidden 256, 1 layer, 2 heads, FFN 512, causal Flow-Attention, post-norm, user module, length 50 (the reference
code's Beauty setup); training batches of 30 packed rows of 50 (about 256 Beauty users). The loss is the
package's full-softmax CE for both stages (the speed benchmarks pre-train with the reference's one-negative
BCE: add --config.train.loss=bce); recall is the paper's two-step (18, 2). The catalogue sizes are Beauty's.

  python -m experiments.aot_compile --config=experiments/configs/aot_reference.py --target=tpu:v5e:2x4
"""

from recgpt_jax.config import base_config


def get_config():
  c = base_config()
  c.name = "aot_reference"
  c.dataset = "Beauty"
  c.max_len = 50
  c.model.hidden = 256
  c.model.num_layers = 1
  c.model.num_heads = 2
  c.model.ffn = 512
  c.model.attention = "flow"
  c.model.norm = "post"
  c.model.user_module = True
  c.model.attn_dropout = 0.5
  c.model.hidden_dropout = 0.1
  c.train.loss = "ce"
  c.train.row_len = 50
  c.train.rows_per_batch = 32  # the benchmarks' 30, rounded to split over 8 or 16 devices
  c.recall.quotas = (18, 2)
  c.eval.users_per_batch = 1024
  c.eval.rows_per_batch = 256
  return c
