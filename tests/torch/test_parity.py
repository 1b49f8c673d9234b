"""Parity of the PyTorch implementation (experiments/torch_recgpt) with the JAX one.

Identical weights are loaded into both models; forward hidden states and logits, losses, gradients,
generated prompts and parameters after one Adam step must agree, for both attention kinds, post- and
pre-LN, tied and untied heads, with and without the user module, in both training stages (prompt modes
``last`` and ``interleave``). Everything is float32 with dropout 0 (the two frameworks draw different
random numbers); JAX matmuls run at full precision (tests/conftest.py).

Tolerances (float32; "seen" = the largest difference over these tests and 6 init seeds of each case):

* hidden states and logits: 1e-5 absolute (seen 7e-7, on values up to ~3);
* losses: 2e-6 relative (seen 3.5e-7);
* gradients: 1e-6 absolute + 1e-4 relative (seen 6e-8 absolute);
* parameters after one Adam step (lr = 1e-3): 1e-6 absolute + 1e-5 relative, plus, only where the gradient
  is near or below Adam's eps, an allowance for the first Adam update's sensitivity to gradient rounding
  (``assert_first_step_close``); seen: 1.2e-7 (one float32 ulp at 1) typically, up to 3.7e-6 on an element
  whose gradient was 1e-9, at most 0.32 of the bound;
* generated prompt items: exactly equal (also where a user exhausts a tiny catalogue).

The torch.compile test compiles with inductor on the CPU: ~30 s with a cold cache, ~5 s warm.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed; the JAX/PyTorch parity tests need it")

from flax import nnx  # noqa: E402

from experiments.torch_recgpt import convert, steps  # noqa: E402
from experiments.torch_recgpt.model import TorchRecGPT, dropout  # noqa: E402
from recgpt_jax.config import base_config  # noqa: E402
from recgpt_jax.data import io, pipeline, tfds_builder  # noqa: E402
from recgpt_jax.model.transformer import ModelConfig, RecGPT  # noqa: E402
from recgpt_jax.train import losses, optim  # noqa: E402
from recgpt_jax.train import prompts as jax_prompts  # noqa: E402
from recgpt_jax.train import step as step_lib  # noqa: E402
from tests.helpers import write_cyclic_dataset  # noqa: E402

HIDDEN_ATOL = 1e-5
LOSS_RTOL = 2e-6
GRAD_ATOL, GRAD_RTOL = 1e-6, 1e-4
PARAM_ATOL, PARAM_RTOL = 1e-6, 1e-5
GRAD_NOISE = 1e-9  # allowed float32 rounding difference of a gradient element (see assert_first_step_close)
LEARNING_RATE = 1e-3
ADAM_EPS = 1e-8  # the default config's Adam eps (optimizer.eps)
MAX_LEN, ROW_LEN, ROWS = 12, 16, 8

# (attention, norm, untied_head, user_module): every attention kind with the reference post-LN tied model,
# and with pre-LN + an untied head, once with and once without the user module.
VARIANTS = [
  ("softmax", "post", False, True),
  ("flow", "post", False, True),
  ("softmax", "pre", True, True),
  ("flow", "pre", True, False),
]


def variant_id(v):
  attention, norm, untied, user = v
  return f"{attention}-{norm}{'-untied' if untied else ''}{'' if user else '-nouser'}"


@pytest.fixture(autouse=True)
def _torch_setup():
  torch.set_num_threads(2)
  torch.manual_seed(0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  path = write_cyclic_dataset(tmp_path_factory.mktemp("data") / "cyclic.txt")
  return io.load_dataset(str(path))


def model_config(data, attention="softmax", norm="post", untied_head=False, user_module=True) -> ModelConfig:
  return ModelConfig(
    num_items=data.num_items,
    num_users=data.num_users,
    max_len=MAX_LEN,
    hidden=16,
    num_layers=2,
    num_heads=2,
    ffn=32,
    attention=attention,
    norm=norm,
    untied_head=untied_head,
    user_module=user_module,
    vocab_multiple=8,  # 30 items + padding -> 32 rows: two vocabulary-padding columns
  )


def train_batch(data, prompt_mode=None, width=1) -> dict[str, np.ndarray]:
  source = tfds_builder.InMemorySource.from_data(data)
  ti = pipeline.TrainInput(
    source,
    max_len=MAX_LEN,
    row_len=ROW_LEN,
    rows_per_batch=ROWS,
    seed=0,
    prompt_mode=prompt_mode,
    prompt_width=width,
  )
  return next(iter(ti.epoch_iterator(0)))


def optimizer_config(**overrides):
  opt = base_config().optimizer
  opt.learning_rate = LEARNING_RATE
  assert opt.eps == ADAM_EPS
  opt.update(overrides)
  return opt


def build(cfg: ModelConfig, seed: int = 0, **opt_overrides):
  """A JAX model + train state and a torch model carrying the same weights."""
  tx = optim.make_optimizer(optimizer_config(**opt_overrides), 10)
  graphdef, state = step_lib.init_state(RecGPT(cfg, rngs=nnx.Rngs(seed)), tx, seed)
  model = TorchRecGPT(cfg)
  convert.load_jax_params(model, state.params)
  return graphdef, tx, state, model


def assert_trees_close(jax_tree, torch_tree, atol, rtol=0.0, what=""):
  """Asserts every leaf is close; returns the largest absolute difference."""
  flat_j = jax.tree_util.tree_flatten_with_path(jax_tree)[0]
  flat_t = dict(jax.tree_util.tree_flatten_with_path(torch_tree)[0])
  assert len(flat_j) == len(flat_t)
  worst = 0.0
  for path, a in flat_j:
    a, b = np.asarray(a), np.asarray(flat_t[path])
    np.testing.assert_allclose(b, a, atol=atol, rtol=rtol, err_msg=f"{what} {jax.tree_util.keystr(path)}")
    worst = max(worst, float(np.max(np.abs(a - b))))
  return worst


def assert_first_step_close(before, want, got, what="param"):
  """Parameters after one Adam step from ``before``: ``got`` is close to ``want``.

  The first Adam update is ``-lr * g / (|g| + eps)`` (bias-corrected moments ``g`` and ``g^2``). Where
  ``|g| >> eps`` it is ``-lr * sign(g)`` and insensitive to rounding; where ``|g|`` is near ``eps`` or below
  (a gradient of 1e-9 from cancellation), a rounding difference ``dg`` of the gradient moves it by
  ``lr * dg * (1 - |r|)^2 / eps`` with ``r = update / lr``: float32 noise of ``dg ~ 4e-11`` then shifts a
  parameter by ~4e-6 (seen). The bound allows ``dg = GRAD_NOISE`` there, and ``PARAM_ATOL + PARAM_RTOL * |p|``
  everywhere.
  """
  flat_b = dict(jax.tree_util.tree_flatten_with_path(before)[0])
  flat_g = dict(jax.tree_util.tree_flatten_with_path(got)[0])
  assert len(flat_b) == len(flat_g)
  for path, w in jax.tree_util.tree_flatten_with_path(want)[0]:
    w, g, b = np.asarray(w), np.asarray(flat_g[path]), np.asarray(flat_b[path])
    r = np.clip((w - b) / LEARNING_RATE, -1.0, 1.0)
    tol = PARAM_ATOL + PARAM_RTOL * np.abs(w) + LEARNING_RATE * GRAD_NOISE / ADAM_EPS * (1.0 - np.abs(r)) ** 2
    excess = np.abs(g - w) - tol
    i = np.unravel_index(np.argmax(excess), w.shape)
    assert excess[i] <= 0, (
      f"{what} {jax.tree_util.keystr(path)}{list(i)}: {g[i]} vs {w[i]} (before {b[i]}), tolerance {tol[i]:.3g}"
    )


def test_optimizer_config_is_plain_adam():
  """The parity tests use the repo's default optimizer: constant lr, no decay, no clipping."""
  opt = base_config().optimizer
  assert opt.schedule == "constant" and not opt.warmup_steps and not opt.clip_norm and opt.weight_decay == 0


def test_param_round_trip(data):
  cfg = model_config(data, "flow", "pre", True, True)
  _, _, state, model = build(cfg)
  assert assert_trees_close(state.params, convert.torch_params_as_jax(model), atol=0.0) == 0.0
  with pytest.raises(ValueError, match="without a torch counterpart"):
    convert.load_jax_params(TorchRecGPT(model_config(data, "flow", "pre", False, True)), state.params)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_forward_matches(data, variant):
  cfg = model_config(data, *variant)
  graphdef, _, state, model = build(cfg)
  batch = train_batch(data)
  jax_model = nnx.merge(graphdef, state.params)
  hidden_j = jax_model(*(batch[k] for k in step_lib.MODEL_INPUTS))
  tb = steps.to_torch_batch(batch)
  hidden_t = steps.make_forward(model)(tb)
  # All positions, padding included (padding queries give zero attention output in both).
  np.testing.assert_allclose(hidden_t.numpy(), np.asarray(hidden_j), atol=HIDDEN_ATOL)
  heads = ("tied", "untied") if cfg.untied_head else ("tied",)
  for head in heads:
    logits_j = np.asarray(jax_model.logits(hidden_j, head))
    with torch.no_grad():
      logits_t = model.logits(hidden_t, head).numpy()
    assert np.all(logits_t[..., cfg.num_items + 1 :] == np.finfo(np.float32).min)
    np.testing.assert_allclose(logits_t, logits_j, atol=HIDDEN_ATOL)


def jax_step(graphdef, tx, state, batch, head="tied", prompt_cfg=None, with_grads=False):
  """One jitted JAX train step ``(state, metrics, extra)``, all in one compile: ``extra`` is the pre-training
  loss gradients with ``with_grads``, else with ``prompt_cfg`` the prompted view the step trains on."""
  train_step = step_lib.make_train_step(graphdef, tx, step_lib.LossConfig(kind="ce", head=head), prompt_cfg)

  def loss_fn(params, batch):
    model = nnx.merge(graphdef, params)
    hidden = model(*(batch[k] for k in step_lib.MODEL_INPUTS))
    return losses.full_softmax_ce(model.logits(hidden, head), batch["targets"])

  def run(state, batch):
    if with_grads:
      extra = jax.grad(loss_fn)(state.params, batch)
    elif prompt_cfg is not None:
      extra = step_lib.prompted_batch(nnx.merge(graphdef, state.params), batch, prompt_cfg)
    else:
      extra = None
    return *train_step(state, batch), extra

  return jax.jit(run)(state, batch)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_pretrain_step_matches(data, variant):
  cfg = model_config(data, *variant)
  head = "untied" if cfg.untied_head else "tied"
  graphdef, tx, state, model = build(cfg)
  batch = train_batch(data)
  new_state, metrics, grads_j = jax_step(graphdef, tx, state, batch, head, with_grads=True)

  step = steps.make_step(model, steps.make_optimizer(model, LEARNING_RATE), stage="pretrain", head=head)
  out = step(steps.to_torch_batch(batch))
  np.testing.assert_allclose(float(out["loss"]), float(metrics["loss"]), rtol=LOSS_RTOL)
  assert int(out["tokens"]) == int(metrics["tokens"])
  np.testing.assert_allclose(float(out["grad_norm"]), float(metrics["grad_norm"]), rtol=GRAD_RTOL)
  assert_trees_close(grads_j, convert.torch_grads_as_jax(model), GRAD_ATOL, GRAD_RTOL, "grad")
  assert_first_step_close(state.params, new_state.params, convert.torch_params_as_jax(model))


def test_adamw_weight_decay_matches(data):
  """AdamW: decoupled decay on weight matrices only. The decay is exaggerated (lr * wd = 1e-2) so that
  decaying an embedding or bias by mistake moves it by ~2e-4, far above the tolerance."""
  cfg = model_config(data, "softmax", "pre", True, True)
  graphdef, tx, state, model = build(cfg, weight_decay=10.0)
  batch = train_batch(data)
  new_state, _, _ = jax_step(graphdef, tx, state, batch, "untied")
  optimizer = steps.optimizer_from_config(model, optimizer_config(weight_decay=10.0))
  steps.make_step(model, optimizer, head="untied")(steps.to_torch_batch(batch))
  # The decay moves weight matrices by lr * wd * p on top of Adam's step: undo it to reuse the bound.
  decay = jax.tree_util.tree_map_with_path(
    lambda path, p: np.asarray(p) * (LEARNING_RATE * 10.0 if path[-1].key == "kernel" else 0.0), state.params
  )
  want = jax.tree.map(lambda w, d: np.asarray(w) + d, new_state.params, decay)
  got = jax.tree.map(lambda g, d: g + d, convert.torch_params_as_jax(model), decay)
  assert_first_step_close(state.params, want, got, "adamw")


@pytest.mark.parametrize("impl", ["foreach", "loop"])
def test_adam_implementations_agree(data, impl):
  """torch's multi-tensor and per-parameter Adam give the fused Adam's step (the default, checked above)."""
  cfg = model_config(data, "flow", "post")
  _, _, state, fused_model = build(cfg)
  other_model = TorchRecGPT(cfg)
  convert.load_jax_params(other_model, state.params)
  batch = steps.to_torch_batch(train_batch(data))
  steps.make_step(fused_model, steps.make_optimizer(fused_model, LEARNING_RATE, impl="fused"))(batch)
  steps.make_step(other_model, steps.make_optimizer(other_model, LEARNING_RATE, impl=impl))(batch)
  want, got = convert.torch_params_as_jax(fused_model), convert.torch_params_as_jax(other_model)
  assert_first_step_close(state.params, want, got, impl)


# (variant, mode, width, hard_negative_weight): both attention kinds in both prompt modes; the pre-LN
# variants score prompts and the loss with their untied head (or tied, without a user module) and one case
# adds the hard-negative term.
PROMPT_CASES = [
  (VARIANTS[0], "last", 1, 0.0),
  (VARIANTS[1], "interleave", 2, 0.0),
  (VARIANTS[2], "interleave", 2, 0.0),
  (VARIANTS[3], "last", 2, 0.5),
  (VARIANTS[1], "interleave", 2, 0.5),
]


@pytest.mark.parametrize(
  ("variant", "mode", "width", "hard_negative_weight"),
  PROMPT_CASES,
  ids=[f"{variant_id(v)}-{m}{w}{'-hardneg' if h else ''}" for v, m, w, h in PROMPT_CASES],
)
def test_prompt_tune_step_matches(data, variant, mode, width, hard_negative_weight):
  cfg = model_config(data, *variant)
  head = "untied" if cfg.untied_head else "tied"
  prompt_cfg = step_lib.PromptConfig(mode=mode, width=width, head=head, hard_negative_weight=hard_negative_weight)
  graphdef, tx, state, model = build(cfg)
  batch = train_batch(data, mode, width)

  new_state, metrics, prompted_j = jax_step(graphdef, tx, state, batch, head, prompt_cfg)

  # The generated prompts: exactly the same items in every slot.
  tb = steps.to_torch_batch(batch)
  prompted_t = steps.prompted_batch(model, tb, mode, width, head)
  assert (batch["gen_col"] >= 0).sum() > 0
  np.testing.assert_array_equal(prompted_t["items"].numpy(), np.asarray(prompted_j["items"]))
  for key in ("positions", "segments", "seq_ids", "users", "targets"):
    np.testing.assert_array_equal(prompted_t[key].numpy(), np.asarray(prompted_j[key]))

  step = steps.make_step(
    model,
    steps.make_optimizer(model, LEARNING_RATE),
    stage="prompt_tune",
    head=head,
    prompt_mode=mode,
    prompt_width=width,
    prompt_head=head,
    hard_negative_weight=hard_negative_weight,
  )
  out = step(tb)
  np.testing.assert_allclose(float(out["loss"]), float(metrics["loss"]), rtol=LOSS_RTOL)
  assert int(out["tokens"]) == int(metrics["tokens"])
  if hard_negative_weight:
    assert float(metrics["hard_negative_loss"]) > 0
    np.testing.assert_allclose(float(out["hard_negative_loss"]), float(metrics["hard_negative_loss"]), rtol=LOSS_RTOL)
  assert_first_step_close(state.params, new_state.params, convert.torch_params_as_jax(model))


def test_picker_matches_when_the_catalogue_is_exhausted():
  """Users longer than the catalogue: the candidate list runs out and the exact fallback picks (JAX then
  picks the padding item 0 and vocabulary-padding ids, which must be reproduced too)."""
  rng = np.random.default_rng(1)
  num_items, rows, length, width = 6, 4, 10, 2
  items = np.zeros((rows, length), np.int32)
  positions = np.zeros_like(items)
  seq_ids = np.zeros_like(items)
  for r in range(rows):
    n = 4 + r
    items[r, :n] = rng.integers(1, num_items + 1, n)
    positions[r, :n] = np.arange(n)
    seq_ids[r, :n] = 1
    if r == rows - 1:  # a second user in the row
      items[r, n:] = rng.integers(1, num_items + 1, length - n)
      positions[r, n:] = np.arange(length - n)
      seq_ids[r, n:] = 2
  scores = rng.normal(size=(rows, length, 8)).astype(np.float32)
  scores[..., num_items + 1 :] = np.finfo(np.float32).min  # vocabulary padding
  gen_col = np.where(seq_ids > 0, np.arange(length)[None, :] - 1, -1).astype(np.int32)
  batch = {"items": items, "positions": positions, "seq_ids": seq_ids, "gen_col": gen_col}
  scores_t = torch.from_numpy(scores[..., 1 : num_items + 1].copy())  # item_scores: real items only
  for mode in ("last", "interleave"):
    want = np.asarray(jax_prompts.pick_prompt_items(jnp.asarray(scores), jax.tree.map(jnp.asarray, batch), mode, width))
    got = steps.pick_prompt_items(scores_t, steps.to_torch_batch(batch), mode, width, vocab_size=8)
    np.testing.assert_array_equal(got.numpy(), want)
    if mode == "interleave":
      assert (want[seq_ids > 0] == 0).any() or (want[seq_ids > 0] > num_items).any()


def test_sampled_losses_match_on_the_same_negatives(data):
  cfg = model_config(data, "softmax", "post")
  graphdef, _, state, model = build(cfg)
  batch = train_batch(data)
  hidden_j = nnx.merge(graphdef, state.params)(*(batch[k] for k in step_lib.MODEL_INPUTS))
  table_j = state.params["item_embed"]["embedding"]
  tb = steps.to_torch_batch(batch)
  hidden_t = steps.make_forward(model)(tb)
  table_t = model.item_embed.weight.detach()
  negatives = np.array(
    losses.sample_negatives(jax.random.key(0), batch["items"], batch["targets"], batch["seq_ids"], cfg.num_items)
  )
  want = float(losses.bce_loss(hidden_j, table_j, batch["targets"], negatives))
  got = float(steps.bce_loss(hidden_t, table_t, tb["targets"], torch.from_numpy(negatives).long()))
  np.testing.assert_allclose(got, want, rtol=LOSS_RTOL)
  shared = np.array([1, 5, 7, 30, 12], np.int32)  # includes targets of some tokens (masked out)
  want = float(losses.sampled_softmax(hidden_j, table_j, batch["targets"], shared))
  got = float(steps.sampled_softmax(hidden_t, table_t, tb["targets"], torch.from_numpy(shared).long()))
  np.testing.assert_allclose(got, want, rtol=LOSS_RTOL)
  # torch's own negatives follow the same rule: never an item of the user's row, always a real item.
  neg = steps.sample_negatives(tb["items"], tb["targets"], tb["seq_ids"], cfg.num_items).numpy()
  for r in range(batch["items"].shape[0]):
    for i in np.flatnonzero(batch["seq_ids"][r]):
      user = batch["seq_ids"][r] == batch["seq_ids"][r, i]
      owned = set(batch["items"][r][user]) | set(batch["targets"][r][user])
      assert 1 <= neg[r, i] <= cfg.num_items and neg[r, i] not in owned


@pytest.mark.parametrize("attention", ["softmax", "flow"])
def test_eval_step_matches(data, attention):
  from recgpt_jax.eval import metrics as metrics_lib

  cfg = model_config(data, attention, "post")
  graphdef, _, state, model = build(cfg)
  batches = pipeline.eval_batches(
    tfds_builder.InMemorySource.from_data(data),
    "test",
    max_len=MAX_LEN,
    row_len=ROW_LEN,
    rows_per_batch=48,
    users_per_batch=64,
  )
  eval_j = metrics_lib.make_eval_step(graphdef)
  eval_t = steps.make_eval_step(model)
  for batch in batches:
    want = jax.device_get(eval_j(state.params, batch))
    got = eval_t(steps.to_torch_batch(batch))
    for name, value in want.items():
      np.testing.assert_allclose(float(got[name]), float(value), atol=1e-5, err_msg=name)


def test_compiled_steps_match_eager(data):
  """torch.compile (inductor, CPU) of the prompt-tuning step gives the loss and parameters of the eager
  step (itself checked against JAX above). One small flow case: compiling takes tens of seconds here."""
  mode, width = "interleave", 2
  cfg = model_config(data, "flow", "post")
  _, _, state, eager_model = build(cfg)
  compiled_model = TorchRecGPT(cfg)
  convert.load_jax_params(compiled_model, state.params)
  batch = train_batch(data, mode, width)
  tb = steps.to_torch_batch(batch)
  kwargs = dict(stage="prompt_tune", prompt_mode=mode, prompt_width=width)
  eager = steps.make_step(eager_model, steps.make_optimizer(eager_model, LEARNING_RATE), **kwargs)
  compiled = steps.make_step(
    compiled_model, steps.make_optimizer(compiled_model, LEARNING_RATE), compile=True, **kwargs
  )
  start = time.perf_counter()
  out_c = compiled(tb)
  print(f"torch.compile: first compiled prompt-tuning step took {time.perf_counter() - start:.1f}s")
  out_e = eager(tb)
  np.testing.assert_allclose(float(out_c["loss"]), float(out_e["loss"]), rtol=LOSS_RTOL)
  params_c = convert.torch_params_as_jax(compiled_model)
  assert_first_step_close(state.params, convert.torch_params_as_jax(eager_model), params_c, "compiled vs eager")
  # A second step reuses the compiled graphs and still tracks eager.
  out_c, out_e = compiled(tb), eager(tb)
  np.testing.assert_allclose(float(out_c["loss"]), float(out_e["loss"]), rtol=LOSS_RTOL)


@pytest.mark.parametrize("attention", ["softmax", "flow"])
def test_dropout_trains_and_evaluation_is_deterministic(data, attention):
  """Dropout (hidden, attention weights, user vector) cannot match JAX's random draws; check it is active in
  training only, keeps the expectation, and that a step with it stays finite."""
  cfg = dataclasses.replace(model_config(data, attention), attn_dropout=0.5, hidden_dropout=0.1, user_dropout=0.2)
  model = TorchRecGPT(cfg)
  batch = steps.to_torch_batch(train_batch(data))
  forward = steps.make_forward(model)
  np.testing.assert_array_equal(forward(batch).numpy(), forward(batch).numpy())
  model.train()
  with torch.no_grad():
    train_hidden = model(*(batch[k] for k in steps.MODEL_INPUTS))
  assert not np.allclose(train_hidden.numpy(), forward(batch).numpy())
  kept = dropout(torch.ones(100_000), 0.3)
  assert abs(float(kept.mean()) - 1.0) < 0.02
  np.testing.assert_allclose(np.unique(kept.numpy()), [0.0, 1 / 0.7], rtol=1e-6)
  metrics = steps.make_step(model, steps.make_optimizer(model), loss="bce")(batch)
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
