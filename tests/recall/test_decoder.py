"""Multi-interest recall: quota layout, exclusions, and equality with a naive re-encoding decoder."""

import jax
import numpy as np
import pytest

from recgpt_jax.data import packing
from recgpt_jax.eval import metrics
from recgpt_jax.eval.metrics import exclude_items
from recgpt_jax.recall import decoder
from tests.data.test_packing import eval_set_with, histories_of
from tests.model.test_decode import HISTORIES, eval_batch, full_model_outputs, noisy_model

KINDS = ["flow", "softmax"]


def naive_recall(model, histories, quotas):
  """Re-encodes every user's full extended sequence with the model (no cache) at each interest step."""
  n = len(histories)
  appended = [[] for _ in range(n)]
  recalled = [[] for _ in range(n)]
  scores = [[] for _ in range(n)]
  for m in quotas:
    hidden = np.stack([h[-1] for h in full_model_outputs(model, histories, appended)])  # [n, hidden]
    width = max(len(h) + len(r) for h, r in zip(histories, recalled, strict=True))
    exclude = np.zeros((n, width), np.int32)
    for u in range(n):
      seen = list(histories[u]) + recalled[u]
      exclude[u, : len(seen)] = seen
    scores_uv = np.asarray(exclude_items(model.logits(hidden), exclude))
    for u in range(n):
      top = np.argsort(-scores_uv[u], kind="stable")[:m]
      recalled[u] += top.tolist()
      scores[u] += scores_uv[u, top].tolist()
      appended[u].append(int(top[0]))
  return np.asarray(recalled), np.asarray(scores)


@pytest.mark.parametrize("kind", KINDS)
def test_quota_layout_and_exclusions(kind):
  _, graphdef, params = noisy_model(kind, "post")
  quotas = (3, 2, 4)
  batch = eval_batch(HISTORIES)
  out = decoder.recall_all(decoder.make_recall_fn(graphdef, quotas), params, [batch])
  n, k = len(HISTORIES), sum(quotas)
  assert out["items"].shape == out["scores"].shape == out["steps"].shape == (n, k)
  np.testing.assert_array_equal(out["users"], np.arange(1, n + 1))  # eval_batch numbers users 1..n
  np.testing.assert_array_equal(out["answer"], np.full(n, 29))
  np.testing.assert_array_equal(out["steps"], np.broadcast_to([0, 0, 0, 1, 1, 2, 2, 2, 2], (n, k)))
  for u, hist in enumerate(HISTORIES):
    items = out["items"][u]
    assert len(set(items.tolist())) == k
    assert np.all(items > 0) and np.all(items <= 30)
    assert not set(items.tolist()) & set(hist)
    for s in range(3):  # within a step, items come in score order
      step_scores = out["scores"][u][out["steps"][u] == s]
      assert np.all(np.diff(step_scores) <= 0)


@pytest.mark.parametrize("kind", KINDS)
def test_one_step_is_plain_top_k(kind):
  model, graphdef, params = noisy_model(kind, "pre")
  batch = eval_batch(HISTORIES)
  out = decoder.make_recall_fn(graphdef, (6,))(params, batch)
  hidden = model(*(batch[k] for k in ("items", "positions", "segments", "seq_ids", "users")))
  user_hidden = hidden[batch["last_row"], batch["last_col"]]
  want_scores, want_items = jax.lax.top_k(exclude_items(model.logits(user_hidden), batch["history"]), 6)
  real = slice(0, len(HISTORIES))
  np.testing.assert_array_equal(np.asarray(out["items"])[real], np.asarray(want_items)[real])
  np.testing.assert_allclose(np.asarray(out["scores"])[real], np.asarray(want_scores)[real], atol=1e-5, rtol=1e-5)
  assert np.all(np.asarray(out["steps"]) == 0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("quotas", [(4, 3), (2, 1, 3)])
def test_matches_naive_reencoding(kind, quotas):
  model, graphdef, params = noisy_model(kind, "post")
  out = decoder.recall_all(decoder.make_recall_fn(graphdef, quotas), params, [eval_batch(HISTORIES)])
  want_items, want_scores = naive_recall(model, HISTORIES, quotas)
  np.testing.assert_array_equal(out["items"], want_items)
  np.testing.assert_allclose(out["scores"], want_scores, atol=1e-5, rtol=1e-5)


def test_bad_quotas():
  _, graphdef, _ = noisy_model("flow", "post", num_layers=1)
  for quotas in [(), (3, 0)]:
    with pytest.raises(ValueError, match="quotas"):
      decoder.make_recall_fn(graphdef, quotas)


def test_per_batch_history_width_keeps_results():
  """Evaluation batches each as wide as their own longest history (one user has 500 items) give the metrics and
  recalled items of the same batches all padded to the widest, exactly."""
  _, graphdef, params = noisy_model("softmax", "post")
  batches = packing.pack_eval_batches(
    eval_set_with(histories_of(long_user=13)), row_len=16, rows_per_batch=4, users_per_batch=8
  )
  widest = max(b["history"].shape[1] for b in batches)
  padded = [{**b, "history": np.pad(b["history"], ((0, 0), (0, widest - b["history"].shape[1])))} for b in batches]
  assert len({b["history"].shape for b in batches}) == 2
  step = metrics.make_eval_step(graphdef, (5, 10), per_user=True)
  got, want = metrics.evaluate_per_user(step, params, batches), metrics.evaluate_per_user(step, params, padded)
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  recall_fn = decoder.make_recall_fn(graphdef, (4, 3))
  got, want = decoder.recall_all(recall_fn, params, batches), decoder.recall_all(recall_fn, params, padded)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
