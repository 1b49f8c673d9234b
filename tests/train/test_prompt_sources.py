"""Where generated prompts come from (``PromptConfig.source``), on hand-built scores with known distributions.

Most tests use ``FixedScores``, a stand-in generation model whose item scores are given, so the picks of
every source can be compared with the distribution they must follow. Frequencies are checked over a few
thousand independent first picks (a fixed set of keys, so the tests are deterministic) with a max-abs
tolerance of 0.03 per item: about 5 standard deviations of a frequency near 0.2 estimated from 3000 draws.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recgpt_jax.data import pipeline, tfds_builder
from recgpt_jax.model.transformer import ModelConfig, RecGPT
from recgpt_jax.train import prompts
from recgpt_jax.train import step as step_lib

NUM_ITEMS = 7  # a tiny catalogue (ids 1..7, 0 = padding): vocabulary 8, divisible by the meshes' model axes
SCORES = np.array([0.0, 1.0, 0.5, 2.0, -1.0, 0.3, 1.5, 0.0], np.float32)  # item v's score (index 0 unused)
TOLERANCE = 0.03


class FixedScores:
  """A generation model whose hidden state at every position is ``scores`` (``[vocab]`` or ``[rows, len,
  vocab]``) and whose head is the identity, so its logits are exactly the given scores on any mesh."""

  def __init__(self, scores, num_items=NUM_ITEMS):
    self.scores = jnp.asarray(scores, jnp.float32)
    self.cfg = types.SimpleNamespace(num_items=num_items, vocab_size=self.scores.shape[-1])
    self.calls = 0

  def __call__(self, items, positions, segments, seq_ids, users, *, dropout_key=None):
    self.calls += 1
    return jnp.broadcast_to(self.scores, (*items.shape, self.scores.shape[-1]))

  def head_weights(self, head="tied"):
    return jnp.eye(self.cfg.vocab_size, dtype=jnp.float32), None

  def logits(self, hidden, head="tied"):
    return hidden


def _batch(sequences, mode="last", width=1, max_len=8, row_len=16, rows=8):
  """One prompt-tuning batch of ``sequences`` (train inputs are each sequence's items[:-3])."""
  source = tfds_builder.InMemorySource(np.arange(1, len(sequences) + 1), [np.asarray(s) for s in sequences])
  ti = pipeline.TrainInput(
    source, max_len=max_len, row_len=row_len, rows_per_batch=rows, seed=0, prompt_mode=mode, prompt_width=width
  )
  batches = list(ti.epoch_iterator(0))
  assert len(batches) == 1
  return {k: jnp.asarray(v) for k, v in batches[0].items()}


# 48 users whose train input is [3, x] with target x: in 'last' mode (width 1) the slot replacing x is
# generated from the prefix {3}, so each user gives one independent first pick with item 3 used.
FIRST_PICK_USERS = [[3, 1 + u % 2, 4, 5, 6] for u in range(48)]


def _first_picks(source, keys, scores=SCORES, **kwargs):
  """The items of all prompt slots of the FIRST_PICK_USERS batch, over ``keys``: ``[draws]``."""
  batch = _batch(FIRST_PICK_USERS, row_len=16, rows=8)
  cfg = step_lib.PromptConfig(source=source, **{k: v for k, v in kwargs.items() if k != "item_counts"})
  model = FixedScores(scores)

  @jax.jit
  def picks(key):
    out = step_lib.prompted_batch(model, batch, cfg, key=key, item_counts=kwargs.get("item_counts"))
    return out["items"]

  slot = np.asarray(batch["gen_col"]) >= 0
  assert slot.sum() == len(FIRST_PICK_USERS)
  return np.concatenate([np.asarray(picks(k))[slot] for k in keys])


def _frequencies(draws):
  return np.bincount(draws, minlength=NUM_ITEMS + 1) / len(draws)


def _restricted(weights, used):
  """``weights`` (``[NUM_ITEMS + 1]``) normalised over the items that are neither padding nor ``used``."""
  w = np.array(weights, np.float64)
  w[0] = 0
  w[list(used)] = 0
  return w / w.sum()


KEYS = [jax.random.key(i) for i in range(64)]  # 64 x 48 = 3072 draws


def test_sample_first_pick_follows_the_tempered_softmax():
  temperature = 0.7
  freq = _frequencies(_first_picks("sample", KEYS, temperature=temperature))
  want = _restricted(np.exp(SCORES / temperature), used={3})
  np.testing.assert_allclose(freq, want, atol=TOLERANCE)
  assert freq[[0, 3]].sum() == 0  # padding and the prefix item are never picked


def test_sample_at_a_very_low_temperature_is_the_top_source():
  rng = np.random.default_rng(0)
  batch = _batch([rng.choice(np.arange(1, 41), size=9, replace=False) for _ in range(12)], "interleave", 2, 6)
  scores = jnp.asarray(rng.normal(size=(*batch["items"].shape, 41)), jnp.float32)  # distinct per position
  model = FixedScores(scores, num_items=40)
  top = step_lib.prompted_batch(model, batch, step_lib.PromptConfig(mode="interleave", width=2))["items"]
  cold = step_lib.PromptConfig(mode="interleave", width=2, source="sample", temperature=1e-6)
  for key in KEYS[:3]:
    np.testing.assert_array_equal(step_lib.prompted_batch(model, batch, cold, key=key)["items"], top)
  warm = step_lib.PromptConfig(mode="interleave", width=2, source="sample", temperature=1.0)
  assert (np.asarray(step_lib.prompted_batch(model, batch, warm, key=KEYS[0])["items"]) != np.asarray(top)).any()


def test_uniform_first_pick_is_uniform_over_the_unused_items():
  freq = _frequencies(_first_picks("uniform", KEYS))
  np.testing.assert_allclose(freq, _restricted(np.ones(NUM_ITEMS + 1), used={3}), atol=TOLERANCE)
  assert freq[[0, 3]].sum() == 0


COUNTS = np.array([0, 5, 0, 40, 10, 0, 20, 25])  # item 3 (in every prefix) is the most popular


def test_popularity_first_pick_follows_the_counts():
  freq = _frequencies(_first_picks("popularity", KEYS, item_counts=COUNTS))
  np.testing.assert_allclose(freq, _restricted(COUNTS, used={3}), atol=TOLERANCE)
  assert freq[[0, 2, 3, 5]].sum() == 0  # padding, zero-count items and the prefix item


def test_model_free_sources_through_the_exact_fallback(monkeypatch):
  """One candidate per column: item 3 (in every prefix) holds 40% of the popularity, so the fallback (fresh
  noise over the restricted weights) makes about 40% of the picks; the distribution must not change."""
  monkeypatch.setattr(prompts, "NUM_CANDIDATES", 1)
  freq = _frequencies(_first_picks("popularity", KEYS, item_counts=COUNTS))
  np.testing.assert_allclose(freq, _restricted(COUNTS, used={3}), atol=TOLERANCE)
  assert freq[[0, 2, 3, 5]].sum() == 0
  freq = _frequencies(_first_picks("uniform", KEYS))
  np.testing.assert_allclose(freq, _restricted(np.ones(NUM_ITEMS + 1), used={3}), atol=TOLERANCE)


def test_drawn_candidates_never_draw_zero_weights():
  weights = jnp.asarray(COUNTS)
  draws = np.asarray(prompts.drawn_candidates(jax.random.key(0), weights, (50, 40))).ravel()
  np.testing.assert_allclose(_frequencies(draws), COUNTS / COUNTS.sum(), atol=0.01)  # 64000 draws
  assert draws.dtype == np.int32 and np.isin(draws, [1, 3, 4, 6, 7]).all()


def test_sample_fallback_applies_the_same_noise(monkeypatch):
  """With two candidates per column the exact fallback runs often; it must rank with the column's own
  Gumbel noise, so the picks equal those of 32 candidates (no fallback) for the same key."""
  rng = np.random.default_rng(1)
  batch = _batch([rng.choice(np.arange(1, 21), size=11, replace=False) for _ in range(10)], "interleave", 2, 8)
  model = FixedScores(jnp.asarray(rng.normal(size=(*batch["items"].shape, 21)), jnp.float32), num_items=20)
  cfg = step_lib.PromptConfig(mode="interleave", width=2, source="sample", temperature=2.0)
  want = np.asarray(step_lib.prompted_batch(model, batch, cfg, key=KEYS[5])["items"])
  monkeypatch.setattr(prompts, "NUM_CANDIDATES", 2)
  got = np.asarray(step_lib.prompted_batch(model, batch, cfg, key=KEYS[5])["items"])
  np.testing.assert_array_equal(got, want)
  # The fallback ran: some pick is not among the two best perturbed items of its column.
  scores = np.asarray(model.scores) + 2.0 * np.asarray(
    prompts.gumbel_noise(jax.random.split(KEYS[5], 3)[0], *batch["items"].shape, 21)
  )
  scores[..., 0] = -np.inf
  top2 = np.argsort(-scores, axis=-1)[..., :2]
  rows = np.arange(got.shape[0])[:, None]
  gen_col = np.asarray(batch["gen_col"])
  slot = gen_col >= 0
  assert (~np.any(top2[rows, np.maximum(gen_col, 0)] == got[..., None], axis=-1))[slot].any()


@pytest.mark.parametrize("source", prompts.SOURCES)
@pytest.mark.parametrize(("mode", "width"), [("last", 1), ("last", 3), ("interleave", 2)])
def test_no_source_repeats_the_prefix(monkeypatch, source, mode, width):
  """Items 1..8 score highest and are by far the most popular, and every user starts with all of them, so
  late prompts find every top item in their prefix. No source may pick a prefix item (nor padding, nor a
  zero-count item for 'popularity'), through the candidate scan and, with two candidates per column, the
  exact fallback."""
  monkeypatch.setattr(prompts, "NUM_CANDIDATES", 2)
  num_items = 30
  rng = np.random.default_rng(2)
  sequences = [np.r_[rng.permutation(8) + 1, rng.choice(np.arange(9, 31), size=4, replace=False)] for _ in range(10)]
  batch = _batch(sequences, mode, width, max_len=12, row_len=24, rows=8)
  scores = np.full(num_items + 1, -1.0, np.float32)
  scores[1:9] = 5.0 + np.arange(8)
  scores[9:] = rng.normal(size=num_items - 8)
  counts = np.r_[0, np.full(8, 1000), rng.integers(0, 3, size=num_items - 8)]
  cfg = step_lib.PromptConfig(mode=mode, width=width, source=source, temperature=0.5)
  for key in KEYS[:4]:
    out = step_lib.prompted_batch(FixedScores(scores, num_items), batch, cfg, key=key, item_counts=counts)
    items, seq_ids, segments = (np.asarray(out[k]) for k in ("items", "seq_ids", "segments"))
    for r in range(items.shape[0]):
      for s in np.unique(seq_ids[r][seq_ids[r] > 0]):
        seq, seg = items[r][seq_ids[r] == s], segments[r][seq_ids[r] == s]
        for i in np.nonzero(seg)[0]:
          assert 1 <= seq[i] <= num_items and seq[i] not in seq[:i], (source, seq, i)
          if source == "popularity":
            assert counts[seq[i]] > 0
          if mode == "last" and width == 1:  # the prefix holds all of 1..8
            assert seq[i] >= 9


@pytest.mark.parametrize("source", ["uniform", "popularity"])
def test_model_free_sources_skip_the_forward_pass(source):
  batch = _batch(FIRST_PICK_USERS[:8])
  model = FixedScores(SCORES)
  step_lib.prompted_batch(model, batch, step_lib.PromptConfig(source=source), key=KEYS[0], item_counts=COUNTS)
  assert model.calls == 0


def test_random_sources_need_their_inputs():
  batch = _batch(FIRST_PICK_USERS[:8])
  model = FixedScores(SCORES)
  with pytest.raises(ValueError, match="needs a random key"):
    step_lib.prompted_batch(model, batch, step_lib.PromptConfig(source="sample"))
  with pytest.raises(ValueError, match="needs a random key"):
    step_lib.prompted_batch(model, batch, step_lib.PromptConfig(gen_dropout=True))
  with pytest.raises(ValueError, match="needs item_counts"):
    step_lib.prompted_batch(model, batch, step_lib.PromptConfig(source="popularity"), key=KEYS[0])
  with pytest.raises(ValueError, match="expected \\(8,\\)"):
    step_lib.prompted_batch(
      model, batch, step_lib.PromptConfig(source="popularity"), key=KEYS[0], item_counts=COUNTS[:5]
    )
  graphdef, _ = nnx.split(
    RecGPT(
      ModelConfig(num_items=7, num_users=4, max_len=8, hidden=8, num_layers=1, num_heads=2, ffn=8), rngs=nnx.Rngs(0)
    )
  )
  with pytest.raises(ValueError, match="needs item_counts"):
    step_lib.make_train_step(graphdef, None, step_lib.LossConfig(), step_lib.PromptConfig(source="popularity"))
  with pytest.raises(ValueError, match="sum"):
    step_lib.make_train_step(
      graphdef, None, step_lib.LossConfig(), step_lib.PromptConfig(source="popularity"), item_counts=np.zeros(8)
    )


def test_gen_dropout_changes_the_prompts_only():
  rng = np.random.default_rng(3)
  batch = _batch([rng.choice(np.arange(1, 61), size=10, replace=False) for _ in range(12)], "interleave", 2, 8)
  cfg = ModelConfig(
    num_items=60, num_users=12, max_len=16, hidden=16, num_layers=1, num_heads=2, ffn=32, hidden_dropout=0.5
  )
  model = RecGPT(cfg, rngs=nnx.Rngs(0))
  plain = step_lib.PromptConfig(mode="interleave", width=2)
  dropped = step_lib.PromptConfig(mode="interleave", width=2, gen_dropout=True)
  a = step_lib.prompted_batch(model, batch, plain, key=KEYS[0])
  b = step_lib.prompted_batch(model, batch, dropped, key=KEYS[0])
  slot = np.asarray(batch["gen_col"]) >= 0
  items_a, items_b = np.asarray(a["items"]), np.asarray(b["items"])
  assert (items_a != items_b)[slot].any()  # dropout changed some prompts...
  np.testing.assert_array_equal(items_a[~slot], items_b[~slot])  # ...and nothing of the real items
  for k in ("positions", "segments", "seq_ids", "users", "targets"):
    np.testing.assert_array_equal(a[k], b[k])
  # Without gen_dropout the 'top' source ignores the key; with it, the key decides the dropout mask.
  np.testing.assert_array_equal(step_lib.prompted_batch(model, batch, plain, key=KEYS[1])["items"], items_a)
  np.testing.assert_array_equal(step_lib.prompted_batch(model, batch, plain)["items"], items_a)
  assert (np.asarray(step_lib.prompted_batch(model, batch, dropped, key=KEYS[1])["items"]) != items_b).any()


def _mesh(data, model):
  devices = jax.devices()[: data * model]
  return jax.make_mesh((data, model), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)


@pytest.mark.parametrize(("data", "model"), [(1, 4), (2, 2)])
@pytest.mark.parametrize("source", prompts.SOURCES)
def test_vocabulary_sharded_picks_equal_one_device(monkeypatch, source, data, model):
  """On a mesh splitting the vocabulary the 'sample' noise is added per shard before the two-stage top-k;
  the picks equal the one-device picks for the same key (two candidates per column: fallbacks included)."""
  monkeypatch.setattr(prompts, "NUM_CANDIDATES", 2)
  rng = np.random.default_rng(4)
  batch = _batch([rng.choice(np.arange(1, 24), size=10, replace=False) for _ in range(8)], "interleave", 2, 8)
  gen = FixedScores(jnp.asarray(rng.normal(size=(*batch["items"].shape, 24)), jnp.float32), num_items=23)
  counts = rng.integers(0, 5, size=24)
  cfg = step_lib.PromptConfig(mode="interleave", width=2, source=source, temperature=0.8)
  mesh = _mesh(data, model)

  def items(mesh, key):
    return step_lib.prompted_batch(gen, batch, cfg, mesh, key=key, item_counts=counts)["items"]

  for key in KEYS[:2]:
    np.testing.assert_array_equal(jax.jit(items, static_argnums=0)(mesh, key), items(None, key))


def test_sharded_sample_noise_is_never_gathered():
  """The compiled 1x4 generation of a real model holds the scores and the noise as [tokens, vocab / 4] per
  device only (the exact fallback scores one column: [rows, vocab])."""
  rows, length, vocab = 8, 16, 256  # 32 candidates of 64 local items: the gathered ones are no vocab-sized array
  batch = _batch([np.arange(1, 11) + u for u in range(12)], "interleave", 2, 8, row_len=length, rows=rows)
  cfg = ModelConfig(num_items=vocab - 1, num_users=12, max_len=16, hidden=8, num_layers=1, num_heads=2, ffn=8)
  graphdef, params = nnx.split(RecGPT(cfg, rngs=nnx.Rngs(0)))
  prompt_cfg = step_lib.PromptConfig(mode="interleave", width=2, source="sample")
  mesh = _mesh(1, 4)

  def items(params, batch, key):
    return step_lib.prompted_batch(nnx.merge(graphdef, params), batch, prompt_cfg, mesh, key=key)["items"]

  hlo = jax.jit(items).lower(params, batch, KEYS[0]).compile().as_text()
  assert f"f32[{rows * length},{vocab // 4}]" in hlo
  for shape in ((rows * length, vocab), (rows, length, vocab), (length, rows, vocab)):  # the noise, in any layout
    assert f"f32[{','.join(map(str, shape))}]" not in hlo
