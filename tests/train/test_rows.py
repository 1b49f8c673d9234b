"""Row-sparse table updates (recgpt_jax.train.rows) equal the dense optimizer step."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recgpt_jax.config import base_config
from recgpt_jax.data import pipeline, tfds_builder
from recgpt_jax.model.transformer import ModelConfig, RecGPT
from recgpt_jax.train import optim, rows
from recgpt_jax.train import step as step_lib

NUM_USERS, NUM_ITEMS, HIDDEN = 30, 80, 16


def _batches(prompt_mode, width, count=3):
  rng = np.random.default_rng(0)
  seqs = [rng.choice(np.arange(1, NUM_ITEMS + 1), size=rng.integers(5, 15), replace=False) for _ in range(NUM_USERS)]
  source = tfds_builder.InMemorySource(np.arange(1, NUM_USERS + 1), seqs)
  ti = pipeline.TrainInput(
    source, max_len=12, row_len=24, rows_per_batch=4, seed=0, prompt_mode=prompt_mode, prompt_width=width
  )
  it = ti.epoch_iterator(0)
  return [next(it) for _ in range(count)]


CASES = {
  # name: (loss, head, prompt (mode, width, hard-negative weight) or None, clip_norm, weight_decay)
  "bce": ("bce", "tied", None, 0.0, 0.0),
  "sampled_softmax_clip_wd": ("sampled_softmax", "tied", None, 0.05, 0.1),
  "ce_users_only": ("ce", "tied", None, 0.0, 0.0),
  "ce_untied_prompt_hardneg_clip": ("ce", "untied", ("last", 1, 1.0), 0.05, 0.0),
  "bce_prompt_interleave_hardneg": ("bce", "tied", ("interleave", 2, 0.5), 0.0, 0.1),
}


# Mixed precision (bf16 activations, float32 parameters and optimizer state): both steps take the same bf16
# forward, so they agree as closely as in float32 up to bf16 roundings that a float32-level difference in the
# parameters flips after the first step.
TOLERANCES = {"float32": (2e-5, 1e-5, 2e-6), "bfloat16": (1e-3, 1e-3, 1e-4)}  # metrics rtol, params rtol, atol


@pytest.mark.parametrize(
  ("name", "dtype"),
  [(name, "float32") for name in CASES]
  + [pytest.param(n, "bfloat16", marks=pytest.mark.slow) for n in ("bce", "ce_untied_prompt_hardneg_clip")],
)
def test_row_sparse_steps_equal_dense_steps(name, dtype):
  loss, head, prompt, clip_norm, weight_decay = CASES[name]
  metrics_rtol, rtol, atol = TOLERANCES[dtype]
  cfg = ModelConfig(
    num_items=NUM_ITEMS,
    num_users=NUM_USERS,
    max_len=24,
    hidden=HIDDEN,
    num_layers=1,
    num_heads=2,
    ffn=32,
    hidden_dropout=0.1,
    attn_dropout=0.1,
    user_dropout=0.3,  # dropped users read row 0, which the gathered rows must hold
    untied_head=head == "untied",
    dtype=dtype,
  )
  opt = base_config().optimizer
  opt.learning_rate, opt.clip_norm, opt.weight_decay, opt.schedule = 1e-2, clip_norm, weight_decay, "cosine"
  tx = optim.make_optimizer(opt, 10)
  graphdef, state = step_lib.init_state(RecGPT(cfg, rngs=nnx.Rngs(0)), tx, 0)
  loss_cfg = step_lib.LossConfig(kind=loss, num_negatives=8, head=head)
  prompt_cfg = None
  if prompt is not None:
    prompt_cfg = step_lib.PromptConfig(mode=prompt[0], width=prompt[1], head=head, hard_negative_weight=prompt[2])
  batches = _batches(None if prompt is None else prompt[0], 1 if prompt is None else prompt[1])
  steps = {
    sparse: jax.jit(
      step_lib.make_train_step(graphdef, tx, loss_cfg, prompt_cfg, adam=optim.adam_spec(opt, 10) if sparse else None)
    )
    for sparse in (True, False)
  }
  expected_tables = 1 if loss == "ce" else 2
  assert len(rows.row_tables(cfg.user_module, loss, head)) == expected_tables
  states = {True: state, False: state}
  for batch in batches:
    before_last = states[True]
    metrics = {}
    for sparse in (True, False):
      states[sparse], metrics[sparse] = steps[sparse](states[sparse], batch)
    for key in metrics[False]:
      np.testing.assert_allclose(float(metrics[True][key]), float(metrics[False][key]), rtol=metrics_rtol, err_msg=key)
    if clip_norm:
      assert float(metrics[False]["grad_norm"]) > clip_norm  # clipping is active
  tree_a, tree_b = (states[True].params, states[True].opt_state), (states[False].params, states[False].opt_state)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(tree_a), jax.tree.leaves(tree_b), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))
    assert a.dtype == b.dtype and (a.dtype == jnp.float32 or a.ndim == 0)  # parameters and moments stay float32
  # Rows the last batch did not touch still moved in the last step (Adam's momentum): the zero-gradient pass
  # over the whole table is exercised, not only the gathered rows.
  user_rows = lambda st: np.asarray(st.params["user_embed"]["embedding"])  # noqa: E731
  moved = np.abs(user_rows(states[True]) - user_rows(before_last)).max(axis=1) > 0
  untouched = np.setdiff1d(np.arange(NUM_USERS + 1), np.asarray(batches[-1]["users"]))
  assert moved[untouched].any()


def _scatters_into_zeros(jaxpr, shape) -> int:
  """How many scatter-adds in ``jaxpr`` (nested ones included) add into a fresh zero array of ``shape``:
  the transpose of a gather, i.e. a table-sized gradient."""
  made_by = {}
  count = 0
  for eqn in jaxpr.eqns:
    for out in eqn.outvars:
      made_by[out] = eqn
    if eqn.primitive.name == "scatter-add" and tuple(eqn.outvars[0].aval.shape) == shape:
      producer = made_by.get(eqn.invars[0])
      count += producer is not None and producer.primitive.name == "broadcast_in_dim"
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      count += _scatters_into_zeros(sub, shape)
  return count


def test_row_sparse_step_builds_no_table_sized_gradient():
  """The dense step scatter-adds the gathered rows' gradient into a zero table; the row-sparse one does not."""
  cfg = ModelConfig(num_items=NUM_ITEMS, num_users=NUM_USERS, max_len=24, hidden=HIDDEN, num_layers=1, num_heads=2)
  tx, adam = optim.make_optimizer(base_config().optimizer, 10), optim.adam_spec(base_config().optimizer, 10)
  graphdef, state = step_lib.init_state(RecGPT(cfg, rngs=nnx.Rngs(0)), tx, 0)
  batch = _batches(None, 1, 1)[0]
  loss_cfg = step_lib.LossConfig(kind="bce")
  for table_shape in ((NUM_USERS + 1, HIDDEN), (NUM_ITEMS + 1, HIDDEN)):
    counts = {
      sparse: _scatters_into_zeros(
        jax.make_jaxpr(step_lib.make_train_step(graphdef, tx, loss_cfg, adam=adam if sparse else None))(
          state, batch
        ).jaxpr,
        table_shape,
      )
      for sparse in (True, False)
    }
    assert counts[False] >= 1 and counts[True] == 0, (table_shape, counts)


def test_take_rows_keeps_zero_order_and_equality():
  table = jnp.arange(10 * 3, dtype=jnp.float32).reshape(10, 3)
  params = {"t": {"embedding": table}, "other": jnp.ones(2)}
  batch = {"users": jnp.array([[7, 7, 0], [3, 9, 0]], jnp.int32), "seq_ids": jnp.ones((2, 3), jnp.int32)}
  spec = rows.RowTable(("t", "embedding"), ("users", "missing"))
  new_params, new_batch, (ids,) = rows.take_rows(params, batch, (spec,))
  np.testing.assert_array_equal(np.asarray(ids), [0, 3, 7, 9, 10, 10, 10])  # 0 first, padded with 10 rows
  np.testing.assert_array_equal(np.asarray(new_batch["users"]), [[2, 2, 0], [1, 3, 0]])
  np.testing.assert_array_equal(np.asarray(new_batch["seq_ids"]), np.asarray(batch["seq_ids"]))
  sub = new_params["t"]["embedding"]
  np.testing.assert_array_equal(np.asarray(sub[new_batch["users"]]), np.asarray(table[batch["users"]]))
  assert new_params["other"] is params["other"]
