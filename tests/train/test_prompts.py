"""Prompt layout and on-device generation on a hand-built case with known answers."""

import jax.numpy as jnp
import numpy as np
import pytest

from recgpt_jax.data import pipeline, tfds_builder
from recgpt_jax.train import prompts

# Two users; train inputs are items[:-3], targets items[1:-2]:
#   user 1: inputs [10, 8, 3], targets [8, 3, 4];  user 2: inputs [9, 7], targets [7, 6].
SEQUENCES = {1: [10, 8, 3, 4, 1, 2], 2: [9, 7, 6, 1, 2]}
NUM_ITEMS = 10


def _batch(mode, width, max_len=12):
  source = tfds_builder.InMemorySource(list(SEQUENCES), [np.array(s) for s in SEQUENCES.values()])
  ti = pipeline.TrainInput(
    source, max_len=max_len, row_len=16, rows_per_batch=1, seed=0, prompt_mode=mode, prompt_width=width
  )
  batches = list(ti.epoch_iterator(0))
  assert len(batches) == 1
  return batches[0]


def _user_view(batch, p_items, user):
  """The prompted view of ``user``: (items, targets, segments, positions)."""
  sel = (batch["users"][0] == user) & (batch["p_seq_ids"][0] > 0)
  return (
    np.asarray(p_items)[0][sel].tolist(),
    batch["p_targets"][0][sel].tolist(),
    batch["p_segments"][0][sel].tolist(),
    batch["p_positions"][0][sel].tolist(),
  )


def _generate(batch, mode, width):
  # Every position scores item v as v: the model "prefers" high ids; exclusion decides the rest.
  scores = jnp.broadcast_to(jnp.arange(NUM_ITEMS + 1, dtype=jnp.float32), (*batch["items"].shape, NUM_ITEMS + 1))
  jb = {k: jnp.asarray(v) for k, v in batch.items()}
  picks = prompts.pick_prompt_items(scores, jb, mode, width)
  return prompts.fill_prompts(picks, jb)


# (mode, width, max_len) -> expected prompted view per user: (items, targets, segments, positions)
CASES = {
  # Slot replaces the last input, generated from the true prefix: user 1 from {10, 8} -> 9.
  ("last", 1, 12): {
    1: ([10, 8, 9], [8, 3, 4], [0, 0, 1], [0, 1, 2]),
    2: ([9, 10], [7, 6], [0, 1], [0, 1]),
  },
  # Two slots: slot 1 from {10} -> 9; slot 2 from {10, 9 (generated)} -> 8 (the replaced real 8 is not
  # in the prompted prefix). User 2 has one real context item, so only one slot.
  ("last", 2, 12): {
    1: ([10, 9, 8], [8, 3, 4], [0, 1, 1], [0, 1, 2]),
    2: ([9, 10], [7, 6], [0, 1], [0, 1]),
  },
  # After 10: best not in {10} -> 9; after 8: best not in {10, 9, 8} -> 7. Slots carry no target.
  ("interleave", 1, 12): {
    1: ([10, 9, 8, 7, 3], [8, 0, 3, 0, 4], [0, 1, 0, 1, 0], [0, 1, 2, 3, 4]),
    2: ([9, 10, 7], [7, 0, 6], [0, 1, 0], [0, 1, 2]),
  },
  ("interleave", 2, 12): {
    1: ([10, 9, 8, 8, 7, 6, 3], [8, 0, 0, 3, 0, 0, 4], [0, 1, 1, 0, 1, 1, 0], list(range(7))),
    2: ([9, 10, 8, 7], [7, 0, 0, 6], [0, 1, 1, 0], [0, 1, 2, 3]),
  },
  # Keep the last max_len=4 positions: user 1 starts with the slot after 10 (still generated from 10).
  ("interleave", 1, 4): {
    1: ([9, 8, 7, 3], [0, 3, 0, 4], [1, 0, 1, 0], [0, 1, 2, 3]),
    2: ([9, 10, 7], [7, 0, 6], [0, 1, 0], [0, 1, 2]),
  },
}


@pytest.mark.parametrize(("mode", "width", "max_len"), list(CASES))
def test_prompted_sequences_by_hand(mode, width, max_len):
  batch = _batch(mode, width, max_len)
  p_items = _generate(batch, mode, width)
  for user, expected in CASES[(mode, width, max_len)].items():
    assert _user_view(batch, p_items, user) == expected, (mode, width, user)
  # The real view is the untouched true window (generation context).
  sel = batch["users"][0] == 1
  assert batch["items"][0][sel & (batch["seq_ids"][0] > 0)].tolist() == [10, 8, 3]


def test_generated_items_never_repeat_the_prefix():
  rng = np.random.default_rng(0)
  # A catalogue of 60 items: larger than any prefix plus its picks (16 real + 15 x 2 generated), so there
  # is always an unused item; the loop refuses catalogues too small for the prompt width.
  seqs = {u: rng.choice(np.arange(1, 61), size=rng.integers(5, 20), replace=False) for u in range(1, 40)}
  source = tfds_builder.InMemorySource(list(seqs), list(seqs.values()))
  for mode, width in (("last", 3), ("interleave", 2)):
    ti = pipeline.TrainInput(
      source, max_len=16, row_len=24, rows_per_batch=6, seed=0, prompt_mode=mode, prompt_width=width
    )
    for batch in ti.epoch_iterator(0):
      scores = jnp.asarray(rng.normal(size=(*batch["items"].shape, 61)), jnp.float32)
      jb = {k: jnp.asarray(v) for k, v in batch.items()}
      p_items = np.asarray(prompts.fill_prompts(prompts.pick_prompt_items(scores, jb, mode, width), jb))
      for r in range(p_items.shape[0]):
        for s in np.unique(batch["p_seq_ids"][r][batch["p_seq_ids"][r] > 0]):
          seq = p_items[r][batch["p_seq_ids"][r] == s]
          segs = batch["p_segments"][r][batch["p_seq_ids"][r] == s]
          for i in np.nonzero(segs)[0]:
            assert 1 <= seq[i] <= 60
            assert seq[i] not in seq[:i], (mode, seq, i)


def _reference_picks(scores, batch, mode, width):
  """A direct implementation: per column, a full used-set over the catalogue and argmax (NumPy)."""
  rows, length, vocab = scores.shape
  scores = np.array(scores, dtype=np.float64)
  scores[..., 0] = -np.inf
  num_picks = width if mode == "interleave" else 1
  slot = np.zeros((rows, length), bool)
  if mode == "last":
    for r, c in zip(*np.nonzero(batch["gen_col"] >= 0), strict=True):
      slot[r, batch["gen_col"][r, c] + 1] = True
  out = np.zeros((rows, length, num_picks), np.int32)
  for r in range(rows):
    used, prev = set(), 0
    for t in range(length):
      if batch["positions"][r, t] == 0 and batch["seq_ids"][r, t] > 0:
        used = set()
      used.add(int(prev if slot[r, t] else batch["items"][r, t]))
      for j in range(num_picks):
        s = scores[r, t].copy()
        s[list(used)] = -np.inf
        out[r, t, j] = int(np.argmax(s))
        if mode == "interleave":
          used.add(int(out[r, t, j]))
      prev = out[r, t, 0]
  return out


@pytest.mark.parametrize(("mode", "width"), [("last", 1), ("last", 3), ("interleave", 1), ("interleave", 3)])
def test_candidate_scan_equals_direct_used_set(mode, width):
  # A 45-item catalogue: long users use up the 32 candidates of a column, exercising the exact fallback.
  rng = np.random.default_rng(1)
  seqs = {u: rng.choice(np.arange(1, 46), size=rng.integers(5, 22), replace=False) for u in range(1, 30)}
  source = tfds_builder.InMemorySource(list(seqs), list(seqs.values()))
  ti = pipeline.TrainInput(
    source, max_len=16, row_len=24, rows_per_batch=5, seed=0, prompt_mode=mode, prompt_width=width
  )
  for batch in ti.epoch_iterator(0):
    scores = rng.normal(size=(*batch["items"].shape, 46)).astype(np.float32)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    got = np.asarray(prompts.pick_prompt_items(jnp.asarray(scores), jb, mode, width))
    np.testing.assert_array_equal(got, _reference_picks(scores, batch, mode, width))


@pytest.mark.parametrize(("mode", "width"), [("last", 1), ("interleave", 2)])
def test_picks_from_hidden_states_equal_picks_from_full_scores(monkeypatch, mode, width):
  """The training step keeps only the candidates and re-scores a column from its hidden states when they run
  out; that must pick exactly what the full score array picks. Two candidates per column make the fallback
  frequent (checked: some picks are not among their column's candidates)."""
  import jax
  from flax import nnx

  from recgpt_jax.model.transformer import ModelConfig, RecGPT

  monkeypatch.setattr(prompts, "NUM_CANDIDATES", 2)
  rng = np.random.default_rng(0)
  seqs = [rng.choice(np.arange(1, 21), size=rng.integers(6, 12), replace=False) for _ in range(12)]
  source = tfds_builder.InMemorySource(np.arange(1, 13), seqs)
  ti = pipeline.TrainInput(
    source, max_len=12, row_len=24, rows_per_batch=3, seed=0, prompt_mode=mode, prompt_width=width
  )
  jb = {k: jnp.asarray(v) for k, v in next(iter(ti.epoch_iterator(0))).items()}
  cfg = ModelConfig(num_items=20, num_users=12, max_len=24, hidden=8, num_layers=1, num_heads=2, ffn=16)
  model = RecGPT(cfg, rngs=nnx.Rngs(0))
  hidden = model(*(jb[k] for k in ("items", "positions", "segments", "seq_ids", "users")))
  want = np.asarray(prompts.pick_prompt_items(model.logits(hidden), jb, mode, width))
  candidates = prompts.top_candidates(model.logits(hidden))
  column_scores = lambda hidden_rd, _: model.logits(hidden_rd)  # noqa: E731
  got = np.asarray(
    jax.jit(prompts.pick_from_candidates, static_argnums=(2, 3, 5))(candidates, jb, mode, width, hidden, column_scores)
  )
  np.testing.assert_array_equal(got, want)
  real = np.asarray(jb["seq_ids"]) > 0
  outside = ~np.any(got[..., :, None] == np.asarray(candidates)[..., None, :], axis=-1)
  assert outside[real].any()


def _aligned(batch, mode, width, boost=None):
  """Aligned targets and exclusions with the scores of ``_generate`` (item ``boost`` scored above all)."""
  scores = jnp.broadcast_to(jnp.arange(NUM_ITEMS + 1, dtype=jnp.float32), (*batch["items"].shape, NUM_ITEMS + 1))
  if boost is not None:
    scores = scores.at[..., boost].set(100.0)
  jb = {k: jnp.asarray(v) for k, v in batch.items()}
  picks = prompts.pick_prompt_items(scores, jb, mode, width)
  targets, exclude = prompts.aligned_targets(picks, jb, prompts.feedback(jb))
  return prompts.fill_prompts(picks, jb), targets, exclude


# (mode, width, max_len, boosted item) -> per user: (prompted items, aligned targets, exclusions per position).
# A slot's target is the real target of the column that generated it (the feedback); it excludes the items
# of its prompt group shown so far; a group holding the feedback (a right guess) leaves the slot no loss.
ALIGNED_CASES = {
  # User 1: slot (generated from [10, 8]) shows 9, the user then clicked 3. User 2: shows 10, clicked 7.
  ("last", 1, 12, None): {
    1: ([10, 8, 9], [8, 3, 3], [[0], [0], [9]]),
    2: ([9, 10], [7, 7], [[0], [10]]),
  },
  # Two slots, each generated from its own true prefix: [10] -> 9 (clicked 8), [10, 8] -> 8 (clicked 3).
  ("last", 2, 12, None): {
    1: ([10, 9, 8], [8, 8, 3], [[0], [9], [8]]),
    2: ([9, 10], [7, 7], [[0], [10]]),
  },
  ("interleave", 1, 12, None): {
    1: ([10, 9, 8, 7, 3], [8, 8, 3, 3, 4], [[0], [9], [0], [7], [0]]),
    2: ([9, 10, 7], [7, 7, 6], [[0], [10], [0]]),
  },
  # After 10 the model shows 9 then 8, and the user clicked 8: the second slot (which excludes 9 and 8)
  # guessed right, so it has no target.
  ("interleave", 2, 12, None): {
    1: ([10, 9, 8, 8, 7, 6, 3], [8, 8, 0, 3, 3, 3, 4], [[0, 0], [9, 0], [9, 8], [0, 0], [7, 0], [7, 6], [0, 0]]),
    2: ([9, 10, 8, 7], [7, 7, 7, 6], [[0, 0], [10, 0], [10, 8], [0, 0]]),
  },
  # Cut to 5 positions: user 1 starts with the second slot after 10 (showing 8); the first one (9) is out
  # of the view but still excluded there.
  ("interleave", 2, 5, None): {
    1: ([8, 8, 7, 6, 3], [0, 3, 3, 3, 4], [[9, 8], [0, 0], [7, 0], [7, 6], [0, 0]]),
    2: ([9, 10, 8, 7], [7, 7, 7, 6], [[0, 0], [10, 0], [10, 8], [0, 0]]),
  },
  ("interleave", 1, 4, None): {
    1: ([9, 8, 7, 3], [8, 3, 3, 4], [[9], [0], [7], [0]]),
    2: ([9, 10, 7], [7, 7, 6], [[0], [10], [0]]),
  },
  # Item 7 scores highest: user 2's first prompt after 9 is 7, what the user then clicked, so neither slot
  # of that group has a target. User 1 is shown 7 and 9 after 10 (clicked 8), then 6 and 5 (clicked 3).
  ("interleave", 2, 12, 7): {
    1: ([10, 7, 9, 8, 6, 5, 3], [8, 8, 8, 3, 3, 3, 4], [[0, 0], [7, 0], [7, 9], [0, 0], [6, 0], [6, 5], [0, 0]]),
    2: ([9, 7, 10, 7], [7, 0, 0, 6], [[0, 0], [7, 0], [7, 10], [0, 0]]),
  },
}


@pytest.mark.parametrize(("mode", "width", "max_len", "boost"), list(ALIGNED_CASES))
def test_aligned_targets_by_hand(mode, width, max_len, boost):
  batch = _batch(mode, width, max_len)
  items, targets, exclude = (np.asarray(x) for x in _aligned(batch, mode, width, boost))
  assert exclude.shape == (*targets.shape, width if mode == "interleave" else 1)
  for user, (want_items, want_targets, want_exclude) in ALIGNED_CASES[(mode, width, max_len, boost)].items():
    sel = (batch["users"][0] == user) & (batch["p_seq_ids"][0] > 0)
    assert items[0][sel].tolist() == want_items, user
    assert targets[0][sel].tolist() == want_targets, user
    assert exclude[0][sel].tolist() == want_exclude, user
  # Everything outside the users' prompted views excludes nothing and has no target.
  outside = batch["p_seq_ids"] == 0
  assert (targets[outside] == 0).all() and (exclude[outside] == 0).all()


def test_aligned_against_the_first_list_by_hand():
  """One row, two slots: each slot also excludes the top-2 candidates of its generating column, and a slot
  whose feedback is among them has no loss; real positions are unchanged."""
  batch = {"gen_col": jnp.array([[-1, -1, 1, -1, 3]])}
  targets = jnp.array([[5, 6, 7, 8, 9]])  # slot targets already aligned: 7 and 9 are the feedback items
  exclude = jnp.array([[[0], [0], [11], [0], [12]]])  # the items the slots show
  candidates = jnp.array([[[1, 2, 3], [20, 21, 22], [1, 2, 3], [9, 30, 31], [1, 2, 3]]])
  got_targets, got_exclude = prompts.exclude_first_list(targets, exclude, candidates, batch, 2)
  assert got_targets.tolist() == [[5, 6, 7, 8, 0]]  # column 3's list (9, 30) holds the feedback 9
  assert got_exclude.tolist() == [[[0, 0, 0], [0, 0, 0], [11, 20, 21], [0, 0, 0], [12, 9, 30]]]
