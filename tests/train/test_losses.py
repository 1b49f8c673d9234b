"""Losses against NumPy computations, and negative sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recgpt_jax.train import losses


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_full_softmax_ce_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
  targets = np.array([[1, 6, 0], [2, 0, 0]])
  got = float(losses.full_softmax_ce(jnp.asarray(logits), jnp.asarray(targets)))
  lp = _log_softmax(logits[..., 1:])  # column 0 is padding, never a candidate
  want = -np.mean([lp[0, 0, 0], lp[0, 1, 5], lp[1, 0, 1]])
  np.testing.assert_allclose(got, want, rtol=1e-5)


# [rows=2, len=3, E=2] excluded items (0 = none; a repeat is harmless) and targets outside them.
EXCLUDE = np.array([[[3, 0], [2, 2], [0, 0]], [[6, 1], [0, 5], [4, 0]]])
EXCLUDE_TARGETS = np.array([[1, 6, 0], [2, 3, 5]])


def _excluded_ce_by_hand(logits, targets, exclude):
  """Mean over real targets of ``-log softmax`` over the items 1.. minus the position's excluded ones, one
  position at a time with the candidates listed explicitly (jnp, so that it can be differentiated)."""
  total, count = 0.0, 0
  for r, t in zip(*np.nonzero(targets), strict=True):
    allowed = [v for v in range(1, logits.shape[-1]) if v not in set(exclude[r, t].tolist())]
    row = logits[r, t, jnp.asarray(allowed)]
    total = total - (logits[r, t, targets[r, t]] - jax.nn.logsumexp(row))
    count += 1
  return total / count


def test_full_softmax_ce_with_exclusions_matches_a_hand_computation():
  logits = jnp.asarray(np.random.default_rng(3).normal(size=(2, 3, 7)), jnp.float32)
  targets, exclude = jnp.asarray(EXCLUDE_TARGETS), jnp.asarray(EXCLUDE)
  got, got_grad = jax.value_and_grad(losses.full_softmax_ce)(logits, targets, exclude)
  want, want_grad = jax.value_and_grad(_excluded_ce_by_hand)(logits, EXCLUDE_TARGETS, EXCLUDE)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-7)
  # Excluded items get no gradient at their position, and the exclusions changed the loss.
  for r, t, e in zip(*np.nonzero(EXCLUDE), strict=True):
    assert got_grad[r, t, EXCLUDE[r, t, e]] == 0
  assert abs(float(losses.full_softmax_ce(logits, targets)) - float(got)) > 1e-3


def test_sharded_ce_with_exclusions_equals_one_device():
  """The vocabulary-sharded loss masks each shard's own excluded ids: equal to the one-device loss, value and
  gradients, on 1x4 and 2x2 meshes (a 16-row table: ids 13..15 are vocabulary padding)."""
  from recgpt_jax.parallel import vocab

  rng = np.random.default_rng(4)
  hidden = jnp.asarray(rng.normal(size=(4, 5, 8)), jnp.float32)
  table = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 13, size=(4, 5)))
  exclude = rng.integers(0, 13, size=(4, 5, 3))
  exclude = jnp.asarray(np.where(exclude == np.asarray(targets)[..., None], 0, exclude))

  def full(hidden, table):
    logits = jnp.where(jnp.arange(16) >= 13, jnp.finfo(jnp.float32).min, hidden @ table.T)
    return losses.full_softmax_ce(logits, targets, exclude)

  want, want_grads = jax.value_and_grad(full, argnums=(0, 1))(hidden, table)
  for data, model in ((1, 4), (2, 2)):
    mesh = jax.make_mesh(
      (data, model), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=jax.devices()[:4]
    )

    def sharded(hidden, table, mesh=mesh):
      return vocab.sharded_softmax_ce(hidden, table, targets, mesh=mesh, num_valid=13, exclude_rle=exclude)

    got, got_grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))(hidden, table)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_bce_matches_numpy():
  rng = np.random.default_rng(1)
  h = rng.normal(size=(1, 3, 4)).astype(np.float32)
  table = rng.normal(size=(6, 4)).astype(np.float32)
  targets, negs = np.array([[2, 3, 0]]), np.array([[5, 1, 4]])
  got = float(losses.bce_loss(*map(jnp.asarray, (h, table, targets, negs))))
  sig = lambda x: 1 / (1 + np.exp(-x))
  per = [-np.log(sig(h[0, t] @ table[targets[0, t]])) - np.log(1 - sig(h[0, t] @ table[negs[0, t]])) for t in (0, 1)]
  np.testing.assert_allclose(got, np.mean(per), rtol=1e-5)


def test_sampled_softmax_masks_accidental_hits():
  rng = np.random.default_rng(2)
  h = rng.normal(size=(1, 2, 4)).astype(np.float32)
  table = rng.normal(size=(6, 4)).astype(np.float32)
  targets, negs = np.array([[2, 5]]), np.array([2, 3, 4])
  got = float(losses.sampled_softmax(*map(jnp.asarray, (h, table, targets, negs))))
  s = lambda t, i: h[0, t] @ table[i]
  l0 = -(s(0, 2) - np.log(np.exp([s(0, 2), s(0, 3), s(0, 4)]).sum()))  # negative 2 == target: masked
  l1 = -(s(1, 5) - np.log(np.exp([s(1, 5), s(1, 2), s(1, 3), s(1, 4)]).sum()))
  np.testing.assert_allclose(got, (l0 + l1) / 2, rtol=1e-5)


def test_sampled_losses_drop_excluded_negatives():
  rng = np.random.default_rng(5)
  h = rng.normal(size=(1, 2, 4)).astype(np.float32)
  table = rng.normal(size=(7, 4)).astype(np.float32)
  targets, shared = np.array([[2, 5]]), np.array([3, 4, 6])
  exclude = np.array([[[4, 0], [0, 0]]])  # position 0 excludes negative 4; position 1 nothing
  s = lambda t, i: h[0, t] @ table[i]  # noqa: E731
  got = float(losses.sampled_softmax(*map(jnp.asarray, (h, table, targets, shared, exclude))))
  l0 = -(s(0, 2) - np.log(np.exp([s(0, 2), s(0, 3), s(0, 6)]).sum()))
  l1 = -(s(1, 5) - np.log(np.exp([s(1, 5), s(1, 3), s(1, 4), s(1, 6)]).sum()))
  np.testing.assert_allclose(got, (l0 + l1) / 2, rtol=1e-5)
  # BCE: the negative term of a position whose negative is excluded there is dropped.
  negs = np.array([[4, 4]])
  got = float(losses.bce_loss(*map(jnp.asarray, (h, table, targets, negs, exclude))))
  sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
  per = [-np.log(sig(s(0, 2))), -np.log(sig(s(1, 5))) - np.log(1 - sig(s(1, 4)))]
  np.testing.assert_allclose(got, np.mean(per), rtol=1e-5)


def test_negatives_avoid_users_items():
  # A catalogue of 6 items; user 1 owns items 1..4 (inputs and targets), so its negatives must be 5 or 6.
  items = jnp.array([[1, 2, 3, 5, 0]])
  targets = jnp.array([[2, 3, 4, 6, 0]])
  seq_ids = jnp.array([[1, 1, 1, 2, 0]])
  seen = {0: [], 3: []}
  for seed in range(200):
    neg = np.asarray(losses.sample_negatives(jax.random.key(seed), items, targets, seq_ids, 6))
    assert set(neg[0, :3].tolist()) <= {5, 6}
    assert neg[0, 3] in (1, 2, 3, 4)
    seen[0].append(neg[0, 0])
    seen[3].append(neg[0, 3])
  # Uniform over the complement: every allowed item is drawn, in roughly equal shares.
  assert np.bincount(seen[0], minlength=7)[5:].min() > 70
  assert np.bincount(seen[3], minlength=7)[1:5].min() > 30


def _sort_based_negatives(key, items, targets, seq_ids, num_items):
  """The original sampler (two sorts per position), kept as the reference for the sort-free one."""
  big = num_items + 1
  same_user = seq_ids[:, :, None] == seq_ids[:, None, :]  # [r, i, j]
  owned = jnp.concatenate([items, targets], axis=-1)  # [r, 2l]
  owned = jnp.where(jnp.concatenate([same_user, same_user], axis=-1) & (owned[:, None, :] > 0), owned[:, None, :], big)
  owned = jnp.sort(owned, axis=-1)  # [r, i, 2l]
  dup = jnp.concatenate([jnp.zeros_like(owned[..., :1], bool), owned[..., 1:] == owned[..., :-1]], axis=-1)
  owned = jnp.sort(jnp.where(dup, big, owned), axis=-1)
  valid = owned < big
  num_owned = jnp.sum(valid, axis=-1)
  u = jnp.floor(jax.random.uniform(key, items.shape) * (num_items - num_owned)).astype(jnp.int32)
  rank = jnp.arange(1, owned.shape[-1] + 1, dtype=jnp.int32)
  skip = jnp.sum(valid & (owned - rank <= u[..., None]), axis=-1)
  return jnp.clip(u + 1 + skip, 1, num_items).astype(jnp.int32)


def _packed_batch(rng, rows, length, num_items, max_users, pool, shifted):
  """Rows packed with up to ``max_users`` users, then padding; each user draws from ``pool`` items (repeats).

  Targets are the next inputs when ``shifted``, else drawn independently (so a user owns up to ``2 * len``).
  """
  items = np.zeros((rows, length), np.int32)
  targets = np.zeros((rows, length), np.int32)
  seq_ids = np.zeros((rows, length), np.int32)
  for r in range(rows):
    users = int(rng.integers(1, max_users + 1))
    cuts = np.sort(rng.choice(np.arange(1, length + 1), size=users, replace=False))
    start = 0
    for user, end in enumerate(cuts, start=1):
      if end - start < 1:
        continue
      own = rng.choice(np.arange(1, num_items + 1), size=min(pool, num_items), replace=False)
      seq = rng.choice(own, size=end - start + 1)
      items[r, start:end], targets[r, start:end], seq_ids[r, start:end] = seq[:-1], seq[1:], user
      if not shifted:
        targets[r, start:end] = rng.choice(own, size=end - start)
      if rng.random() < 0.3:
        targets[r, end - 1] = 0  # a last token without a target
      start = end
  return jnp.asarray(items), jnp.asarray(targets), jnp.asarray(seq_ids)


# (rows, len, num_items, max users per row, items per user's pool, targets are the next inputs)
_NEGATIVE_CASES = [
  (6, 20, 12101, 4, 30, True),  # big catalogue, few repeats, padding after the last user
  (6, 20, 40, 5, 6, True),  # many repeats within each user
  (4, 24, 12101, 1, 12101, False),  # one user per row owning up to 48 distinct items
  (4, 24, 60, 2, 60, False),  # users owning a large share of a small catalogue
  (5, 12, 5, 3, 5, True),  # tiny catalogue: users own most or all of it
  (4, 16, 3, 2, 3, False),  # users owning the whole catalogue
  (3, 10, 1, 2, 1, True),  # a single item
]


@pytest.mark.parametrize("case", _NEGATIVE_CASES)
def test_sort_free_negatives_match_sort_based(case):
  rows, length, num_items, max_users, pool, shifted = case
  rng = np.random.default_rng(sum(case))
  fast = jax.jit(losses.sample_negatives, static_argnums=4)
  reference = jax.jit(_sort_based_negatives, static_argnums=4)
  for trial in range(4):
    items, targets, seq_ids = _packed_batch(rng, rows, length, num_items, max_users, pool, shifted)
    for seed in range(3):
      key = jax.random.key(100 * trial + seed)
      want = np.asarray(reference(key, items, targets, seq_ids, num_items))
      got = np.asarray(fast(key, items, targets, seq_ids, num_items))
      assert got.dtype == np.int32
      np.testing.assert_array_equal(got, want)  # every position, padding included
      # Negatives are real items the user never touched in the row (unless the user owns the whole catalogue).
      its, tgs, sids = map(np.asarray, (items, targets, seq_ids))
      for r in range(rows):
        for i in np.flatnonzero(sids[r]):
          user = sids[r] == sids[r, i]
          owned = (set(its[r][user]) | set(tgs[r][user])) - {0}
          assert 1 <= got[r, i] <= num_items
          if len(owned) < num_items:
            assert got[r, i] not in owned


def test_sort_free_negatives_match_with_junk_padding():
  # Padding tokens (seq_id 0) carrying items, and the same item owned by different users of the row.
  items = jnp.array([[3, 4, 3, 7, 4, 9, 2, 0], [5, 5, 5, 1, 8, 8, 0, 6]], jnp.int32)
  targets = jnp.array([[4, 3, 0, 4, 9, 0, 6, 1], [5, 5, 0, 8, 8, 0, 2, 0]], jnp.int32)
  seq_ids = jnp.array([[1, 1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 2, 2, 3, 0, 0]], jnp.int32)
  for num_items in (9, 10, 12101):
    for seed in range(5):  # eagerly, without jit
      key = jax.random.key(seed)
      np.testing.assert_array_equal(
        np.asarray(losses.sample_negatives(key, items, targets, seq_ids, num_items)),
        np.asarray(_sort_based_negatives(key, items, targets, seq_ids, num_items)),
      )


def _with_junk_gaps(rng, items, targets, seq_ids, num_items):
  """Cut padding spans into the middle of rows, carrying junk items (some outside ``1..num_items``), and
  relabel the users with large, unordered ids (so no combined (user, item) key could fit in int32)."""
  items, targets, seq_ids = (np.array(a) for a in (items, targets, seq_ids))
  rows, length = items.shape
  for r in range(rows):
    for _ in range(int(rng.integers(0, 3))):
      start = int(rng.integers(0, length))
      end = min(length, start + int(rng.integers(1, max(2, length // 4))))
      seq_ids[r, start:end] = 0
      items[r, start:end] = rng.integers(0, num_items + 3, size=end - start)
      targets[r, start:end] = rng.integers(0, num_items + 3, size=end - start)
  labels = rng.choice(np.arange(1, 2**31 - 1, 2**20), size=seq_ids.max() + 1, replace=False)
  labels[0] = 0  # padding keeps seq_id 0
  return jnp.asarray(items), jnp.asarray(targets), jnp.asarray(labels[seq_ids].astype(np.int32))


def _assert_outside_user_sets(negatives, items, targets, seq_ids, num_items):
  """Every non-padding negative is a real item its user never touched (unless the user owns the catalogue)."""
  its, tgs, sids = map(np.asarray, (items, targets, seq_ids))
  for r in range(its.shape[0]):
    for user in np.unique(sids[r][sids[r] != 0]):
      mine = sids[r] == user
      owned = np.setdiff1d(np.union1d(its[r][mine], tgs[r][mine]), [0])
      got = negatives[r][mine]
      assert ((got >= 1) & (got <= num_items)).all()
      if len(owned) < num_items:
        assert not np.isin(got, owned).any()


# The cases above, then longer rows (lengths not powers of two) and users owning nearly all of 1-5 items.
_SORTED_CASES = _NEGATIVE_CASES + [
  (3, 37, 4, 3, 4, False),
  (2, 45, 2, 6, 2, True),
  (3, 33, 5, 1, 5, False),
  (2, 300, 700, 12, 80, False),
]


@pytest.mark.parametrize("case", _SORTED_CASES)
def test_sorted_negatives_match_pairwise(case):
  rows, length, num_items, max_users, pool, shifted = case
  rng = np.random.default_rng(sum(case) + 7)
  pairwise = jax.jit(losses._pairwise_negatives, static_argnums=4)
  sorted_form = jax.jit(losses._sorted_negatives, static_argnums=4)
  for trial in range(4):
    batch = _packed_batch(rng, rows, length, num_items, max_users, pool, shifted)
    if trial % 2:
      batch = _with_junk_gaps(rng, *batch, num_items)
    for seed in range(3):
      key = jax.random.key(1000 * trial + seed)
      got = np.asarray(sorted_form(key, *batch, num_items))
      assert got.dtype == np.int32
      np.testing.assert_array_equal(got, np.asarray(pairwise(key, *batch, num_items)))  # padding included
      _assert_outside_user_sets(got, *batch, num_items)


def test_sample_negatives_dispatches_on_row_length():
  calls = []
  with pytest.MonkeyPatch.context() as patch:
    for name in ("_pairwise_negatives", "_sorted_negatives"):
      form = getattr(losses, name)
      patch.setattr(losses, name, lambda *args, _name=name, _form=form: calls.append(_name) or _form(*args))
    for length in (1, losses._SORTED_MIN_LEN - 1, losses._SORTED_MIN_LEN, 3 * losses._SORTED_MIN_LEN + 5):
      tokens = jax.ShapeDtypeStruct((2, length), jnp.int32)
      out = jax.eval_shape(losses.sample_negatives, jax.random.key(0), tokens, tokens, tokens, 50)  # trace only
      assert (out.shape, out.dtype) == ((2, length), jnp.int32)
  # Rows shorter than _SORTED_MIN_LEN (1 and _SORTED_MIN_LEN - 1) run pairwise, the other two sorted.
  assert calls == ["_pairwise_negatives"] * 2 + ["_sorted_negatives"] * 2


def test_sorted_negatives_are_linear_in_memory():
  # At len 4096 a single [2len, 2len] bool comparison of the pairwise form is 64 MiB per row.
  rows, length, num_items = 2, 4096, 700
  batch = _packed_batch(np.random.default_rng(3), rows, length, num_items, 6, 300, False)
  compiled = jax.jit(losses._sorted_negatives, static_argnums=4).lower(jax.random.key(0), *batch, num_items).compile()
  pairwise_bytes = rows * (2 * length) ** 2
  assert compiled.memory_analysis().temp_size_in_bytes < pairwise_bytes // 64
  _assert_outside_user_sets(np.asarray(compiled(jax.random.key(1), *batch)), *batch, num_items)


def _view_contrastive_by_hand(h1, h2, seq_ids, real, temperature):
  """NT-Xent one anchor at a time, candidates listed explicitly (NumPy, float64)."""
  rows, length, _ = h1.shape
  z = np.concatenate([h1.reshape(rows * length, -1), h2.reshape(rows * length, -1)]).astype(np.float64)
  owner = [(r, int(seq_ids[r, t])) for r in range(rows) for t in range(length)] * 2
  ok = np.concatenate([real.reshape(-1), real.reshape(-1)])
  n = rows * length
  per = []
  for i in np.nonzero(ok)[0]:
    partner = (i + n) % (2 * n)
    cands = [partner] + [j for j in range(2 * n) if ok[j] and owner[j] != owner[i]]
    s = np.array([z[i] @ z[j] for j in cands]) / temperature
    per.append(np.log(np.exp(s - s.max()).sum()) + s.max() - s[0])
  return np.mean(per)


def test_view_contrastive_two_users_by_hand():
  """Two users of one position each, identical views a and b: anchor a's candidates are its twin (a.a) and both
  views of b (a.b twice), so its loss is log(e^{a.a} + 2 e^{a.b}) - a.a; likewise for b."""
  a, b = np.array([1.0, 0.5]), np.array([-0.5, 2.0])
  h = np.stack([a, b])[None]  # [1, 2, 2]: one row, users 1 and 2
  seq_ids, real = np.array([[1, 2]]), np.array([[True, True]])
  got = float(losses.view_contrastive(jnp.asarray(h), jnp.asarray(h), jnp.asarray(seq_ids), jnp.asarray(real), 0.5))
  la = np.log(np.exp(a @ a / 0.5) + 2 * np.exp(a @ b / 0.5)) - a @ a / 0.5
  lb = np.log(np.exp(b @ b / 0.5) + 2 * np.exp(a @ b / 0.5)) - b @ b / 0.5
  np.testing.assert_allclose(got, (la + lb) / 2, rtol=1e-6)


def test_view_contrastive_matches_numpy_with_shared_users_and_padding():
  """A user's own other positions are never negatives, padding takes no part, and users are (row, seq_id):
  seq_id 1 of row 0 and seq_id 1 of row 1 are different users."""
  rng = np.random.default_rng(0)
  h1, h2 = (rng.normal(size=(2, 5, 4)).astype(np.float32) for _ in range(2))
  seq_ids = np.array([[1, 1, 2, 2, 0], [1, 1, 1, 2, 0]])
  real = (seq_ids > 0) & np.array([[1, 1, 1, 0, 1], [1, 1, 1, 1, 1]], bool)
  got = float(losses.view_contrastive(*(jnp.asarray(x) for x in (h1, h2, seq_ids, real)), 2.0))
  np.testing.assert_allclose(got, _view_contrastive_by_hand(h1, h2, seq_ids, real, 2.0), rtol=1e-5)
  # One user alone (one row, seq_id 1 throughout) has no negative: every anchor's only candidate is its twin.
  one = np.ones((1, 5), np.int32)
  alone = losses.view_contrastive(jnp.asarray(h1[:1]), jnp.asarray(h2[:1]), jnp.asarray(one), jnp.asarray(one > 0), 2.0)
  assert float(alone) == 0.0
