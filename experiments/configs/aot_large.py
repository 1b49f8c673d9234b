"""A large RecGPT for ahead-of-time compiles: 1M items, hidden 512, 4 layers, 8 heads, FFN 2048, length 200.

Activations and matmuls in bfloat16 with float32 parameters (``model.dtype`` / ``model.param_dtype``, where
this version of the package has them). The item table (1M x 512, 2 GiB in float32, 6 GiB with Adam's moments)
is split over a `model` axis of 8 devices; the batch over the rest (`data`). Full-softmax CE over the sharded
table, the paper's two-step recall (18, 2).

  python -m experiments.aot_compile --config=experiments/configs/aot_large.py --target=tpu:v5e:16x16

The catalogue is not read from data: ``NUM_ITEMS`` below gives its size to experiments/aot_compile.py (its
--num_items flag overrides it); the users are Beauty's 22,363 unless --num_users says otherwise (the user
table is replicated on every device: 6 KiB per user in float32 with Adam's moments).
"""

from recgpt_jax.config import base_config

# Catalogue size for experiments/aot_compile.py (the config schema has no such field: sizes come from data).
NUM_ITEMS = 1_000_000


def get_config():
  c = base_config()
  c.name = "aot_large"
  c.dataset = "Beauty"  # not read by the ahead-of-time compiles (NUM_ITEMS)
  c.max_len = 200
  c.model.hidden = 512
  c.model.num_layers = 4
  c.model.num_heads = 8
  c.model.ffn = 2048
  c.model.attention = "softmax"
  c.model.norm = "post"
  c.model.user_module = True
  c.model.attn_dropout = 0.1
  c.model.hidden_dropout = 0.1
  if "dtype" in c.model:  # mixed precision, where the package has it
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
  c.train.loss = "ce"
  c.train.row_len = 200
  c.train.rows_per_batch = 64
  c.mesh.data = -1
  c.mesh.model = 8
  c.recall.quotas = (18, 2)
  c.eval.users_per_batch = 1024
  c.eval.rows_per_batch = 256
  return c
