"""Ahead-of-time compiles of the real steps for a TPU topology (libtpu, no TPU attached): what the design promises.

The prompt-tuning step (full-softmax CE over the vocabulary-sharded item table, prompts from the two-stage top-k)
and the evaluation step (two-step multi-interest recall over the sharded table) are compiled for ``v5e:2x2`` with
the item table split over ``model`` (mesh data=2 x model=2), and the per-device programs are checked: no
all-gather assembles the item table (or anything as large as one device's shard of it), the top-k gathers only
``k x shards`` candidates per query, the arguments are exactly the device's shards, and the temporaries stay
under a bound computed from the shapes. Also: bad targets are one-line errors with exit code 2.
"""

import os
import subprocess
import sys

import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu's (real-TPU) lockfile

import jax  # noqa: E402
import numpy as np  # noqa: E402

from recgpt_jax.config import base_config  # noqa: E402
from recgpt_jax.errors import ConfigError  # noqa: E402
from recgpt_jax.parallel import aot  # noqa: E402
from recgpt_jax.train import prompts  # noqa: E402

NUM_ITEMS, NUM_USERS = 4000, 50  # 4001 rows padded to 4008 (vocab_multiple 8): 2004 rows per model shard
HIDDEN, ROWS, ROW_LEN, USERS, HISTORY = 16, 4, 16, 8, 16
QUOTAS = (18, 2)


def tiny_config():
  c = base_config()
  c.max_len = 12
  c.model.hidden = HIDDEN
  c.model.num_layers = 1
  c.model.num_heads = 2
  c.model.ffn = 32
  c.model.vocab_multiple = 8
  c.model.attn_dropout = 0.0
  c.model.hidden_dropout = 0.1
  c.train.loss = "ce"
  c.train.row_len = ROW_LEN
  c.train.rows_per_batch = ROWS
  c.eval.rows_per_batch = ROWS
  c.eval.users_per_batch = USERS
  c.recall.quotas = QUOTAS
  c.mesh.data = 2
  c.mesh.model = 2
  return c


def test_parse_target():
  t = aot.parse_target("tpu:v5e:16x16")
  assert (t.platform, t.chip, t.topology, t.num_devices) == ("tpu", "v5e", "16x16", 256)
  assert aot.parse_target("GPU:H100:1x1x8").name == "gpu:h100:1x1x8"
  assert aot.parse_target("gpu:h200:1x1x8").memory_limit == int(aot.CHIPS["h200"].hbm_bytes * 0.75)
  # TPU v4's topologies list each of a chip's 2 TensorCores as a device: per-device figures are half a chip's.
  v4 = aot.parse_target("tpu:v4:2x2x1").with_devices([None] * 8)
  assert v4.devices_per_chip == 2 and v4.spec.hbm_bytes == 16 * 2**30 and v4.spec.peak_flops == 137.5e12
  for bad in ("tpu:v5e", "tpu:v9:2x2", "gpu:a100:1x1x8", "cpu:v5e:2x2", "tpu:v5e:2by4", "gpu:h100:8"):
    with pytest.raises(ConfigError):
      aot.parse_target(bad)


def test_roofline_is_the_max_of_compute_and_memory_time():
  chip = aot.CHIPS["v5e"]
  r = aot.roofline(chip.peak_flops * 2e-3, chip.hbm_bytes_per_s * 1e-3, chip)
  assert r["step_s_estimate"] == pytest.approx(2e-3) and r["bound"] == "compute"
  assert "estimate" in r["note"]


def test_largest_fitting_doubles_then_bisects():
  limit, per_row = 1000, 7  # fits while 100 + 7 * rows <= 1000: rows <= 128 (multiples of 2)

  class Fake:
    def __init__(self, rows):
      self.rows = rows

    def memory_analysis(self):
      fields = ("argument", "output", "alias", "temp", "generated_code")
      sizes = dict.fromkeys(fields, 0) | {"temp": 100 + per_row * self.rows}
      return type("M", (), {f"{k}_size_in_bytes": v for k, v in sizes.items()})()

  def try_rows(rows):
    return aot.Compiled(aot.Program("p", None, (), rows, 1), Fake(rows), 0.0)

  best, result, trail = aot.largest_fitting(try_rows, limit, step=2, max_rows=4096, refine=8)
  assert best == 128 and result.compiled.rows == 128
  assert [t["rows"] for t in trail][:8] == [2, 4, 8, 16, 32, 64, 128, 256]
  best, _, trail = aot.largest_fitting(try_rows, limit, step=2, max_rows=4096, start=512, refine=0)
  assert best == 128 and [t["rows"] for t in trail] == [512, 256, 128]


def test_bad_target_is_one_line_and_exit_2():
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.aot_compile",
      "--config=experiments/configs/aot_reference.py",
      "--target=tpu:v5e:2x4,tpu:v9x:2x2",
      "--out=",
    ],
    cwd=root,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: unknown tpu chip 'v9x'"), proc.stderr
  assert not proc.stdout  # every target is checked before anything compiles


@pytest.fixture(scope="module")
def v5e_2x2():
  pytest.importorskip("libtpu", reason="libtpu (jax[tpu]) compiles for TPU topologies")
  return aot.target_devices(aot.parse_target("tpu:v5e:2x2"))


def test_unknown_topology_is_a_config_error(v5e_2x2):
  with pytest.raises(ConfigError, match="cannot compile for tpu:v5e:3x3"):
    aot.target_devices(aot.parse_target("tpu:v5e:3x3"))


@pytest.fixture(scope="module")
def compiled(v5e_2x2):
  built = aot.build(tiny_config(), num_items=NUM_ITEMS, num_users=NUM_USERS, devices=v5e_2x2)
  out = {"built": built}
  for name in ("prompt_tune_step", "eval_step"):
    program = aot.make_program(built, name, history=HISTORY)
    result = aot.compile_program(program)
    assert result.compiled is not None, result.error
    out[name] = (program, result.compiled, aot.collectives(result.compiled.as_text())["all"])
  return out


def shard_bytes(tree) -> int:
  """Bytes of one device's shards of the abstract arrays of ``tree`` (every leaf carries its sharding)."""
  leaves = jax.tree.leaves(tree)
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in leaves)


def test_mesh_splits_the_item_table(compiled):
  built = compiled["built"]
  assert dict(built.mesh.shape) == {"data": 2, "model": 2}
  table = built.abstract_state.params["item_embed"]["embedding"]
  assert table.shape == (4008, HIDDEN)
  assert table.sharding.shard_shape(table.shape) == (2004, HIDDEN)


@pytest.mark.parametrize("name", ["prompt_tune_step", "eval_step"])
def test_no_all_gather_of_the_item_table(compiled, name):
  shard_elements = 2004 * HIDDEN  # one device's rows of the item table
  _, _, found = compiled[name]
  assert not aot.large_all_gathers(found, shard_elements), [c for c in found if c["op"] == "all-gather"]


def _gathered(found) -> dict[str, set[int]]:
  """Element counts of the all-gather results by dtype (the TPU compiler may re-lay ``[u, k * s]`` as
  ``[., ., s]``, so shapes are compared by size)."""
  out: dict[str, set[int]] = {}
  for c in found:
    if c["op"] == "all-gather":
      for shape in c["result"]:
        out.setdefault(shape.split("[")[0], set()).add(aot.result_elements(shape))
  return out


def test_prompt_candidates_are_k_times_shards(compiled):
  # The generator's two-stage top-k over this device's tokens: min(NUM_CANDIDATES, rows per shard) candidates
  # from each of the 2 shards, a float32 score and an int32 id each.
  tokens = ROWS * ROW_LEN // 2
  k = min(prompts.NUM_CANDIDATES, 2004)
  _, _, found = compiled["prompt_tune_step"]
  gathered = _gathered(found)
  assert tokens * 2 * k in gathered.get("f32", set()) and tokens * 2 * k in gathered.get("s32", set()), found


def test_recall_candidates_are_k_times_shards(compiled):
  # Each interest step of the recall of this device's 4 user slots: its quota from each of the 2 shards.
  users = USERS // 2
  _, _, found = compiled["eval_step"]
  gathered = _gathered(found)
  for k in QUOTAS:
    assert users * 2 * k in gathered.get("f32", set()) and users * 2 * k in gathered.get("s32", set()), found
  assert max(max(v) for v in gathered.values()) <= users * 2 * max(QUOTAS), found


def test_memory_is_the_shards_plus_bounded_temporaries(compiled):
  program, result, _ = compiled["prompt_tune_step"]
  m = aot.memory(result, aot.CHIPS["v5e"].hbm_bytes)
  state, batch = program.args
  # Arguments: this device's shards of the state and the batch, plus the TPU's layout padding; well below what
  # a replicated table would add (its other half, and the other halves of its two Adam moments).
  shards = shard_bytes(state) + shard_bytes(batch)
  table_half = 2004 * HIDDEN * 4
  assert shards <= m["argument_bytes"] < shards + 3 * table_half, (m, shards)
  # Temporaries: a sanity bound (the collective checks above are what catch a gathered table): 4 copies of the
  # device's [tokens, rows per shard] float32 logits and of its state (gradients, Adam's update), plus 8 MiB for
  # the TPU's (8, 128) tiles of the step's many small buffers (about 6 MiB of the ~6 MiB measured here).
  tokens = ROWS * ROW_LEN // 2
  logits = tokens * 2004 * 4
  bound = 8 * 2**20 + 4 * logits + 4 * shard_bytes(state)
  assert m["temp_bytes"] < bound, (m, bound)
  assert m["fits"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_splash_attention_training_step_compiles_for_tpu(v5e_2x2, dtype):
  """The real pre-training step with Pallas splash attention: the Mosaic kernel runs under shard_map over `data`
  (the compiler cannot partition it) and the item table is still never gathered."""
  c = tiny_config()
  c.model.attention_impl = "splash"
  c.model.dtype = dtype
  built = aot.build(c, num_items=NUM_ITEMS, num_users=NUM_USERS, devices=v5e_2x2)
  # conftest asks for 'highest' matmul precision everywhere; Mosaic cannot lower a bf16 matmul at fp32 contract
  # precision, so the kernels compile at the default precision, as in a real run.
  with jax.default_matmul_precision("default"):
    result = aot.compile_program(aot.make_program(built, "pretrain_step", history=HISTORY))
  assert result.compiled is not None, result.error
  text = result.compiled.as_text()
  assert "tpu_custom_call" in text  # the splash kernel, not an XLA fallback
  found = aot.collectives(text)["all"]
  assert not aot.large_all_gathers(found, 2004 * HIDDEN), [c for c in found if c["op"] == "all-gather"]
