"""The jitted train steps: prompt generation inside the step uses current parameters and no gradient."""

import jax
import numpy as np
import pytest
from flax import nnx

from recgpt_jax.config import base_config
from recgpt_jax.data import pipeline, tfds_builder
from recgpt_jax.model.transformer import ModelConfig, RecGPT
from recgpt_jax.train import losses, optim
from recgpt_jax.train import step as step_lib

NUM_ITEMS = 80


def _setup(mode, width, dropout=0.0, **model_kwargs):
  rng = np.random.default_rng(0)
  seqs = [rng.choice(np.arange(1, NUM_ITEMS + 1), size=rng.integers(5, 15), replace=False) for _ in range(30)]
  source = tfds_builder.InMemorySource(np.arange(1, 31), seqs)
  ti = pipeline.TrainInput(
    source, max_len=12, row_len=24, rows_per_batch=4, seed=0, prompt_mode=mode, prompt_width=width
  )
  batch = next(iter(ti.epoch_iterator(0)))
  cfg = ModelConfig(
    num_items=NUM_ITEMS,
    num_users=30,
    max_len=24,
    hidden=16,
    num_layers=1,
    num_heads=2,
    ffn=32,
    hidden_dropout=dropout,
    **model_kwargs,
  )
  opt = base_config().optimizer
  tx = optim.make_optimizer(opt, 10)
  graphdef, state = step_lib.init_state(RecGPT(cfg, rngs=nnx.Rngs(0)), tx, 0)
  return graphdef, tx, state, batch


def _gen_key(state):
  """The key a prompt-tuning step generates with: its step key folded with GEN_KEY_SALT."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  return jax.random.fold_in(key, step_lib.GEN_KEY_SALT)


COUNTS = np.r_[0, np.arange(1, NUM_ITEMS + 1) % 7]  # some items never drawn by 'popularity'

# (mode, width, PromptConfig overrides)
STEP_CASES = [
  ("last", 1, {}),
  ("interleave", 2, {}),
  ("last", 1, {"source": "sample", "temperature": 0.5, "gen_dropout": True}),
  ("interleave", 2, {"source": "popularity", "aligned": True}),
  ("last", 2, {"source": "uniform", "aligned": True, "hard_negative_weight": 0.5}),
]


@pytest.mark.parametrize(("mode", "width", "overrides"), STEP_CASES)
def test_prompt_step_equals_plain_step_on_pregenerated_prompts(mode, width, overrides):
  """Prompts generated outside the step from the same (current) parameters and the step's generation key,
  then a plain step on them (which draws the same dropout as a pre-training step), give the same update."""
  graphdef, tx, state, batch = _setup(mode, width, dropout=0.2)
  loss_cfg = step_lib.LossConfig(kind="ce")
  prompt_cfg = step_lib.PromptConfig(mode=mode, width=width, **overrides)
  prompted = step_lib.prompted_batch(
    nnx.merge(graphdef, state.params), batch, prompt_cfg, key=_gen_key(state), item_counts=COUNTS
  )
  plain = jax.jit(step_lib.make_train_step(graphdef, tx, loss_cfg))
  inside = jax.jit(step_lib.make_train_step(graphdef, tx, loss_cfg, prompt_cfg, item_counts=COUNTS))
  state_a, metrics_a = plain(state, prompted)
  state_b, metrics_b = inside(state, batch)
  # Equal updates mean the step generated from the current parameters and no gradient flowed through
  # generation (a gradient through the prompt scores would change the update).
  loss_a = float(metrics_a["loss"]) + prompt_cfg.hard_negative_weight * float(metrics_b.get("hard_negative_loss", 0))
  np.testing.assert_allclose(loss_a, float(metrics_b["loss"]), rtol=1e-6)
  if not prompt_cfg.hard_negative_weight:
    for a, b in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params), strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def _ce_by_hand(logits, targets, exclude):
  """Mean over real targets of ``-log softmax`` over items 1.. minus the position's excluded items (NumPy)."""
  per = []
  for r, t in zip(*np.nonzero(targets), strict=True):
    allowed = np.setdiff1d(np.arange(1, logits.shape[-1]), exclude[r, t])
    assert targets[r, t] in allowed
    row = logits[r, t, allowed].astype(np.float64)
    per.append(np.log(np.exp(row - row.max()).sum()) + row.max() - logits[r, t, targets[r, t]])
  return np.mean(per)


@pytest.mark.parametrize(("mode", "width"), [("last", 1), ("interleave", 2)])
@pytest.mark.parametrize("mesh_shape", [None, (2, 2)])
def test_aligned_step_loss_equals_hand_assembled_loss(mode, width, mesh_shape):
  """The aligned step trains slots on their feedback with the shown items out of the softmax: its loss is
  the hand-computed CE over the aligned targets and exclusions, on one device and with the vocabulary split
  over a 2x2 mesh (84 table rows)."""
  graphdef, tx, state, batch = _setup(mode, width, vocab_multiple=4)
  prompt_cfg = step_lib.PromptConfig(mode=mode, width=width, aligned=True)
  model = nnx.merge(graphdef, state.params)
  prompted = step_lib.prompted_batch(model, batch, prompt_cfg)
  slot = np.asarray(batch["gen_col"]) >= 0
  targets, exclude = np.asarray(prompted["targets"]), np.asarray(prompted["exclude"])
  assert (targets[slot] > 0).any() and (exclude[slot][:, 0] > 0).all() and (exclude[~slot] == 0).all()
  np.testing.assert_array_equal(targets[~slot], batch["p_targets"][~slot])  # real positions keep theirs
  logits = np.asarray(model.logits(model(*(prompted[k] for k in step_lib.MODEL_INPUTS))))
  want = _ce_by_hand(logits[..., : NUM_ITEMS + 1], targets, exclude)
  mesh = None
  if mesh_shape is not None:
    axis_types = (jax.sharding.AxisType.Auto,) * 2
    mesh = jax.make_mesh(mesh_shape, ("data", "model"), axis_types=axis_types, devices=jax.devices()[:4])
  train_step = jax.jit(step_lib.make_train_step(graphdef, tx, step_lib.LossConfig(kind="ce"), prompt_cfg, mesh))
  _, metrics = train_step(state, batch)
  np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)
  assert int(metrics["tokens"]) == (targets > 0).sum()


@pytest.mark.parametrize(("kind", "negatives"), [("bce", "uniform"), ("sampled_softmax", "mixed")])
def test_aligned_row_sparse_step_equals_dense_step(kind, negatives):
  """Under a sampled loss the item table is updated by row and the batch's ids renumbered: the exclusions
  and the slots' feedback (hard-negative term) must be renumbered with them, and the logQ correction of the
  (in-batch and uniform) negatives taken from their global ids."""
  graphdef, tx, state, batch = _setup("interleave", 2)
  loss_cfg = step_lib.LossConfig(kind=kind, num_negatives=16, negatives=negatives)
  prompt_cfg = step_lib.PromptConfig(mode="interleave", width=2, aligned=True, hard_negative_weight=0.5)
  adam = optim.adam_spec(base_config().optimizer, 10)
  counts = {"item_counts": COUNTS}
  sparse = jax.jit(step_lib.make_train_step(graphdef, tx, loss_cfg, prompt_cfg, adam=adam, **counts))
  dense = jax.jit(step_lib.make_train_step(graphdef, tx, loss_cfg, prompt_cfg, **counts))
  (state_a, metrics_a), (state_b, metrics_b) = sparse(state, batch), dense(state, batch)
  for key in metrics_b:
    np.testing.assert_allclose(float(metrics_a[key]), float(metrics_b[key]), rtol=1e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_hard_negative_pairs_stay_within_a_user():
  """Interleaved windows cut by max_len can start with a slot; its showing position would be the previous
  user's last token in the packed row. Only slots whose showing token is their own user's count."""
  graphdef, _, state, batch = _setup("interleave", 2)
  model = nnx.merge(graphdef, state.params)
  prompted = step_lib.prompted_batch(model, batch, step_lib.PromptConfig(mode="interleave", width=2))
  hidden = jax.random.normal(jax.random.key(0), (*batch["items"].shape, 16))
  got = float(step_lib.hard_negative_loss(model, hidden, prompted))
  h, table = np.asarray(hidden, np.float64), np.asarray(model.item_table(), np.float64)
  items, targets = np.asarray(prompted["items"]), np.asarray(prompted["targets"])
  terms, cut = [], 0
  for r, c in zip(*np.nonzero(batch["gen_col"] >= 0), strict=True):
    at = c - 1 - batch["gen_rank"][r, c]
    if batch["p_positions"][r, c] - 1 - batch["gen_rank"][r, c] < 0:  # the showing token was cut off
      cut += 1
      continue
    assert batch["p_seq_ids"][r, at] == batch["p_seq_ids"][r, c] and batch["p_segments"][r, at] == 0
    shown, clicked = items[r, c], targets[r, at]
    if clicked > 0 and shown != clicked:
      terms.append(np.logaddexp(0.0, h[r, at] @ (table[shown] - table[clicked])))
  assert cut > 0 and terms
  np.testing.assert_allclose(got, np.mean(terms), rtol=1e-5)


def test_hard_negative_term_changes_the_update():
  graphdef, tx, state, batch = _setup("last", 1)
  loss_cfg = step_lib.LossConfig(kind="ce")
  plain = jax.jit(step_lib.make_train_step(graphdef, tx, loss_cfg, step_lib.PromptConfig()))
  hard = jax.jit(step_lib.make_train_step(graphdef, tx, loss_cfg, step_lib.PromptConfig(hard_negative_weight=1.0)))
  (_, m_plain), (_, m_hard) = plain(state, batch), hard(state, batch)
  assert float(m_hard["hard_negative_loss"]) > 0
  np.testing.assert_allclose(
    float(m_hard["loss"]), float(m_plain["loss"]) + float(m_hard["hard_negative_loss"]), rtol=1e-5
  )


def test_prompted_batch_excludes_the_first_list():
  """Through the step's prompting: the slot's extra exclusions are the generating column's best items."""
  graphdef, _, state, batch = _setup("last", 1)
  model = nnx.merge(graphdef, state.params)
  cfg = step_lib.PromptConfig(mode="last", width=1, aligned=True, aligned_top=4)
  out = step_lib.prompted_batch(model, batch, cfg)
  base = step_lib.prompted_batch(model, batch, step_lib.PromptConfig(mode="last", width=1, aligned=True))
  scores = np.array(model.logits(model(*(batch[k] for k in step_lib.MODEL_INPUTS)), "tied"))
  scores[..., 0] = -np.inf
  slot = np.asarray(batch["gen_col"]) >= 0
  assert slot.any()
  for r, c in zip(*np.nonzero(slot), strict=True):
    col = int(batch["gen_col"][r, c])
    top4 = np.argsort(-scores[r, col], kind="stable")[:4]
    extra = np.asarray(out["exclude"])[r, c, 1:]
    assert sorted(extra.tolist()) == sorted(top4.tolist())
    feedback = int(out["feedback"][r, c])
    want = 0 if feedback in top4 else int(base["targets"][r, c])
    assert int(out["targets"][r, c]) == want
  np.testing.assert_array_equal(np.asarray(out["targets"])[~slot], np.asarray(base["targets"])[~slot])
  with pytest.raises(ValueError, match="aligned_top needs prompt.source='top'"):
    step_lib.prompted_batch(
      model, batch, step_lib.PromptConfig(source="uniform", aligned=True, aligned_top=2), key=jax.random.key(0)
    )


@pytest.mark.parametrize(("head", "mesh_shape"), [("untied", (2, 2))])
def test_blocked_ce_step_equals_materialised_step(head, mesh_shape):
  """``train.ce_block``: the aligned prompt-tuning step (exclusions in the softmax) with the item table swept in
  blocks of 16 rows (84 rows: the last block shifted back) gives the materialised step's loss and update, with
  the untied head (a bias) on a 2x2 mesh with the vocabulary split (one device: tests/train/test_blocked_ce.py)."""
  graphdef, tx, state, batch = _setup("interleave", 2, vocab_multiple=4, untied_head=head == "untied")
  prompt_cfg = step_lib.PromptConfig(mode="interleave", width=2, aligned=True)
  mesh = None
  if mesh_shape is not None:
    axis_types = (jax.sharding.AxisType.Auto,) * 2
    mesh = jax.make_mesh(mesh_shape, ("data", "model"), axis_types=axis_types, devices=jax.devices()[:4])
  steps = [
    jax.jit(
      step_lib.make_train_step(graphdef, tx, step_lib.LossConfig(kind="ce", head=head, ce_block=b), prompt_cfg, mesh)
    )
    for b in (0, 16)
  ]
  (state_a, metrics_a), (state_b, metrics_b) = (s(state, batch) for s in steps)
  np.testing.assert_allclose(float(metrics_b["loss"]), float(metrics_a["loss"]), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params), strict=True):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_contrastive_term_adds_the_two_view_loss():
  """``cl_weight``: the step's loss is CE plus the weight times the contrastive loss of two dropout views, the
  second drawn with the dropout key folded with CL_KEY_SALT (recomputed here outside the step); the term
  changes the update; weight 0 is the plain step."""
  graphdef, tx, state, batch = _setup("last", 1, dropout=0.3)
  batch = {k: batch[k] for k in (*step_lib.MODEL_INPUTS, "targets")}
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  drop_key, _ = jax.random.split(key)
  model = nnx.merge(graphdef, state.params)
  inputs = [batch[k] for k in step_lib.MODEL_INPUTS]
  h1 = model(*inputs, dropout_key=drop_key)
  h2 = model(*inputs, dropout_key=jax.random.fold_in(drop_key, step_lib.CL_KEY_SALT))
  real = np.asarray(batch["targets"]) > 0
  ce = float(losses.full_softmax_ce(model.logits(h1), batch["targets"]))
  cl = float(losses.view_contrastive(h1, h2, batch["seq_ids"], real, 0.5))
  assert cl > 0
  steps = {
    w: jax.jit(step_lib.make_train_step(graphdef, tx, step_lib.LossConfig(cl_weight=w, cl_temperature=0.5)))
    for w in (0.0, 0.2)
  }
  (plain, m0), (with_cl, m1) = steps[0.0](state, batch), steps[0.2](state, batch)
  np.testing.assert_allclose(float(m0["loss"]), ce, rtol=1e-5)
  np.testing.assert_allclose(float(m1["contrastive_loss"]), cl, rtol=1e-5)
  np.testing.assert_allclose(float(m1["loss"]), ce + 0.2 * cl, rtol=1e-5)
  assert "contrastive_loss" not in m0
  leaves = zip(jax.tree.leaves(plain.params), jax.tree.leaves(with_cl.params), strict=True)
  diff = max(float(np.abs(a - b).max()) for a, b in leaves)
  assert diff > 1e-6
