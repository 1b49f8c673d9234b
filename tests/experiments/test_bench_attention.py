"""The pure helpers of experiments/bench_attention.py: synthetic packed rows, ratios, the results page."""

import functools
import importlib
from unittest import mock

import numpy as np
import pytest
from absl import flags


def _import_with_own_flags(name: str):
  """Imports a benchmark module with its absl flags on a private registry.

  ``experiments/profile_train_step.py``, which another test imports into this process, defines flags of the same
  names (``--steps``, ``--out``, ``--allocator``); absl refuses a second definition in one registry.
  """
  private = flags.FlagValues()
  defines = {n: functools.partial(getattr(flags, n), flag_values=private) for n in dir(flags) if n.startswith("DEFINE")}
  with mock.patch.multiple(flags, **defines):
    return importlib.import_module(name)


ba = _import_with_own_flags("experiments.bench_attention")


@pytest.mark.parametrize("length", [1, 7, 64, 1000, 8192])
def test_user_lengths_fill_the_row_within_the_range(length):
  rng = np.random.default_rng(0)
  for _ in range(20):
    lengths = ba.user_lengths(length, rng)
    assert sum(lengths) == length
    hi = max(1, int(length * ba.USER_LEN_FRACTION[1]))
    assert all(1 <= n <= hi for n in lengths)
    lo = max(1, int(length * ba.USER_LEN_FRACTION[0]))
    assert all(n >= lo for n in lengths[:-1])  # only the last is cut


def test_synthetic_rows_are_packed_users_with_next_item_targets():
  batch = ba.synthetic_rows(256, 3, num_items=50, num_users=1000, seed=1)
  assert set(batch) == {"items", "positions", "segments", "seq_ids", "users", "targets"}
  assert all(x.shape == (3, 256) and x.dtype == np.int32 for x in batch.values())
  assert (batch["seq_ids"] > 0).all() and (batch["targets"] > 0).all() and (batch["segments"] == 0).all()
  assert batch["items"].min() >= 1 and max(batch["items"].max(), batch["targets"].max()) <= 50
  users_seen = []
  for r in range(3):
    ids = batch["seq_ids"][r]
    assert ids[0] == 1 and (np.diff(ids) >= 0).all() and (np.diff(ids) <= 1).all()  # contiguous 1, 2, ...
    for s in np.unique(ids):
      span = np.flatnonzero(ids == s)
      np.testing.assert_array_equal(batch["positions"][r, span], np.arange(len(span)))
      np.testing.assert_array_equal(batch["items"][r, span[1:]], batch["targets"][r, span[:-1]])  # next item
      assert len(np.unique(batch["users"][r, span])) == 1
      users_seen.append(batch["users"][r, span[0]])
  assert len(set(users_seen)) == len(users_seen)  # distinct users across the batch


def test_model_config_variants():
  for variant, (kind, impl) in ba.VARIANTS.items():
    cfg = ba.model_config(variant, 512, 64, 100, 200)
    assert (cfg.attention, cfg.attention_impl, cfg.max_len, cfg.flow_chunk) == (kind, impl, 512, 64)
    assert cfg.attn_dropout == 0.0 and cfg.hidden_dropout == 0.1 and cfg.user_module
  assert ba.model_config(ba.ABLATION, 64, 128, 100, 200).attention_impl == "chunked"


def _point(part, variant, length, t, temp=100, status="ok"):
  mem = {"temp": temp, "argument": 1000, "output": 1000, "alias": 1000, "compiled": temp + 2000}
  cost = {"flops": 1e9 * temp, "bytes_accessed": 1.0}
  r = {"part": part, "variant": variant, "length": length, "status": status, "memory": mem, "cost": cost}
  if status == "ok":
    r |= {"median_s": t, "min_s": t * 0.9, "max_s": t * 1.1, "timed": 3, "tokens_per_s": length / t, "rss_mib": 1.0}
  else:
    r["reason"] = "over budget"
  return r


def _results():
  out = []
  for length, quad, chunk in ((512, 1.0, 2.0), (1024, 4.0, 1.0), (2048, 16.0, 2.0), (4096, 64.0, 4.0)):
    out += [
      _point("step", "softmax", length, quad / 2),
      _point("step", ba.QUADRATIC, length, quad, temp=length**2),
      _point("step", ba.CHUNKED, length, chunk, temp=length),
      _point("kernel", ba.QUADRATIC, length, quad / 4, temp=length**2),
      _point("kernel", ba.CHUNKED, length, chunk / 8, temp=length),
      _point("sampler", "sampler", length, chunk / 4),
    ]
  out.append(_point("step", ba.QUADRATIC, 8192, None, status="skipped"))
  out.append(_point("step", ba.CHUNKED, 8192, 8.0, temp=8192))
  return out


def test_ratios_growth_and_crossover():
  rat = ba.ratios(_results(), [512, 1024, 2048, 4096, 8192])
  row = {r["length"]: r for r in rat["by_length"]}
  assert row[4096]["step_time_quadratic_over_chunked"] == pytest.approx(16.0)
  assert row[4096]["step_min_time_quadratic_over_chunked"] == pytest.approx(16.0)
  assert row[4096]["kernel_flops_quadratic_over_chunked"] == pytest.approx(4096.0)
  assert row[4096]["kernel_time_quadratic_over_chunked"] == pytest.approx(32.0)
  assert row[4096]["step_temp_memory_quadratic_over_chunked"] == pytest.approx(4096.0)
  assert row[4096]["step_time_softmax_over_chunked"] == pytest.approx(8.0)
  assert row[4096]["sampler_time_over_chunked_step"] == pytest.approx(0.25)
  assert row[8192]["step_time_quadratic_over_chunked"] is None  # quadratic skipped
  chunked = rat["growth"][f"step/{ba.CHUNKED}"]
  assert chunked == pytest.approx(
    {"from": 1024, "to": 8192, "time_ratio": 8.0, "time_ratio_min": 8.0, "flops_ratio": 8.0, "linear": 8.0}
  )
  assert rat["growth"][f"step/{ba.QUADRATIC}"]["to"] == 4096  # its longest measured length
  assert rat["growth"][f"step/{ba.QUADRATIC}"]["time_ratio"] == pytest.approx(16.0)
  assert rat["step_crossover_length"] == 1024  # chunked slower at 512, faster from 1024 on
  acc = ba.acceptance(rat)
  assert acc["step_time_ratio"] == pytest.approx(16.0) and acc["chunked_step_growth"] == pytest.approx(8.0)
  assert acc["kernel_min_time_ratio"] == pytest.approx(32.0) and acc["chunked_step_growth_flops"] == pytest.approx(8.0)
  assert acc["chunked_uniform_negatives_step_growth"] is None


def test_crossover_is_none_when_chunked_loses_at_the_longest_length():
  results = [_point("step", ba.QUADRATIC, 64, 1.0), _point("step", ba.CHUNKED, 64, 2.0)]
  assert ba.ratios(results, [64])["step_crossover_length"] is None


def test_markdown_page():
  lengths = [512, 1024, 2048, 4096, 8192]
  record = {
    "command": "python -m experiments.bench_attention",
    "date": "today",
    "machine": "cpu",
    "allocator": "glibc",
    "jax_version": "0",
    "git_commit": "abc",
    "load_average_start": (1.0, 1.0, 1.0),
    "load_average_end": (2.0, 1.0, 1.0),
    "flow_chunked_min_len": 256,
    "config": {
      "lengths": lengths,
      "hidden": 256,
      "layers": 1,
      "heads": 2,
      "ffn": 512,
      "hidden_dropout": 0.1,
      "loss": "bce",
      "num_items": 12000,
      "num_users": 22000,
      "rows": 1,
      "users": "users",
      "flow_chunk": 128,
      "warmup": 2,
    },
    "results": _results(),
  }
  record["ratios"] = ba.ratios(record["results"], lengths)
  record["acceptance"] = ba.acceptance(record["ratios"])
  page = ba.markdown(record)
  assert "| 8192 | flow-quadratic | skipped: over budget |" in page
  assert "| 4096 | flow-chunked | 4,000.0 (3,600.0) | 3 | 1,024 | 4,096.00 | 0 | 0.0 | 1 |" in page
  assert "| 4096 | 16.00x (16.00x) | 32.00x (32.00x) | 4096.00x / 4096.00x |" in page
  assert f"| step/{ba.CHUNKED} | 1024 -> 8192 | 8.0 | 8.0 | 8.0 | 8 |" in page
  assert "at every L >= 1024 of this sweep" in page
  assert "full step 16.0x (16.0x), kernel alone 32.0x (32.0x)" in page
