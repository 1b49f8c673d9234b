"""The pure helpers of experiments/profile_train_step.py: trace self times, HLO parsing, categories."""

import pytest

from experiments import profile_train_step as pts


def op(name, ts, dur, tid=1, run="r1", module="jit_train_step"):
  return {
    "ph": "X",
    "pid": 7,
    "tid": tid,
    "ts": ts,
    "dur": dur,
    "name": name,
    "args": {"hlo_op": name, "hlo_module": module, "run_id": run},
  }


FAKE_TRACE = [
  {"ph": "M", "pid": 7, "tid": 1, "name": "thread_name", "args": {"name": "tf_XLAEigen/1"}},
  # Bookkeeping (no hlo_op): skipped.
  {"ph": "X", "pid": 7, "tid": 1, "ts": 0.0, "dur": 500.0, "name": "ThunkExecutor::Execute", "args": {}},
  {"ph": "X", "pid": 7, "tid": 3, "ts": 0.0, "dur": 900.0, "name": "PjitFunction(train_step)"},
  {"ph": "X", "pid": 7, "tid": 1, "ts": 31.0, "dur": 0.5, "name": "end: ynn_fusion.1", "args": {}},
  # Run r1: a while (100) enclosing two body ops (20 + 30) on thread 1; a matmul on thread 2.
  op("while.3", 0.0, 100.0),
  op("copy.5", 10.0, 20.0),
  op("add.6", 40.0, 30.0),
  op("ynn_fusion.1", 5.0, 25.0, tid=2),
  # Run r2: the same ops, different durations; ynn_fusion.1 on thread 1 this time, after the while.
  op("while.3", 1000.0, 60.0, run="r2"),
  op("copy.5", 1000.0, 10.0, run="r2"),  # starts with the while: still nested
  op("ynn_fusion.1", 1060.0, 15.0, run="r2"),  # starts as the while ends: not nested
  # Another module: ignored when the module is given.
  op("ynn_fusion.1", 2000.0, 1000.0, run="r3", module="jit_other"),
]


def test_op_self_times_subtracts_nested_ops_and_counts_runs():
  times, runs = pts.op_self_times(FAKE_TRACE, "jit_train_step")
  assert runs == 2
  assert times == pytest.approx(
    {"while.3": (100 - 20 - 30) + (60 - 10), "copy.5": 30.0, "add.6": 30.0, "ynn_fusion.1": 40.0}
  )


def test_op_self_times_without_module_filter():
  times, runs = pts.op_self_times(FAKE_TRACE)
  assert runs == 3
  assert times["ynn_fusion.1"] == pytest.approx(1040.0)


FAKE_HLO = """HloModule jit_train_step, is_scheduled=true

%fused_computation.1 (param_0.1: f32[1500,256], param_1.1: f32[256,768]) -> f32[1500,768] {
  %param_0.1 = f32[1500,256]{1,0} parameter(0)
  %param_1.1 = f32[256,768]{1,0} parameter(1)
  ROOT %dot.2 = f32[1500,768]{1,0} dot(%param_0.1, %param_1.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_computation.2 (param_0.2: f32[1500,256]) -> f32[] {
  %param_0.2 = f32[1500,256]{1,0} parameter(0)
  ROOT %reduce.1 = f32[] reduce(%param_0.2, %c), dimensions={0,1}, to_apply=%add_f32
}

ENTRY %main.9 (p.1: f32[1500,256]) -> (f32[22364,256], u32[30,50]) {
  %p.1 = f32[1500,256]{1,0} parameter(0)
  %ynn_fusion.1 = f32[1500,768]{1,0} fusion(%p.1), calls=%fused_computation.1, metadata={op_name="jvp()/dot_general"}
  %ynn_fusion.2 = f32[] fusion(%p.1), kind=kCustom, calls=%fused_computation.2, metadata={op_name="reduce_sum"}
  %while.3 = (s32[], u32[30,50]{1,0}, /*index=2*/u32[4]{0}) while(%t), metadata={op_name="jit(_uniform)/while"}
  %copy.5 = f32[22364,256]{1,0} copy(%x), metadata={op_name="transpose(jvp(jit(_take)))/broadcast_in_dim"}
  %add.6 = f32[30,100,100]{2,1,0} add(%a, %b), metadata={op_name="jvp()/add"}
  %sort.7 = (s32[4501]{0}, s32[4501]{0}) sort(%i, %j), to_apply=%lt, metadata={op_name="jit(lexsort)/sort"}
  %custom-call = (f32[1500,32]{1,0}, s32[1500,32]{1,0}) custom-call(%s), metadata={op_name="top_k"}
  %exp.8 = f32[30,50,12102]{2,1,0} exponential(%l)
  %multiply.9 = f32[12102,256]{1,0} multiply(%g, %g)
  %add.10 = f32[256,768]{1,0} add(%w, %u)
  ROOT %tuple.11 = (f32[22364,256]{1,0}, u32[30,50]{1,0}) tuple(%copy.5, %v)
}
"""


def test_parse_shape():
  assert pts.parse_shape("(f32[2,3]{1,0}, /*index=1*/u32[], pred[7]{0})") == (
    ("f32", (2, 3)),
    ("u32", ()),
    ("pred", (7,)),
  )


def test_parse_hlo():
  info = pts.parse_hlo(FAKE_HLO)
  assert info["ynn_fusion.1"] == pts.InstrInfo(
    "ynn_fusion.1", "f32[1500,768]{1,0}", (("f32", (1500, 768)),), "fusion", "jvp()/dot_general", True
  )
  assert not info["ynn_fusion.2"].has_dot  # a ynn fusion without a dot (a reduction)
  assert info["dot.2"].has_dot and info["dot.2"].opcode == "dot"
  assert info["while.3"].shape == "(s32[], u32[30,50]{1,0}, /*index=2*/u32[4]{0})"
  assert info["while.3"].leaves == (("s32", ()), ("u32", (30, 50)), ("u32", (4,)))
  assert info["while.3"].opcode == "while" and info["while.3"].op_name == "jit(_uniform)/while"
  assert info["sort.7"].leaves == (("s32", (4501,)), ("s32", (4501,)))
  assert info["exp.8"].op_name == "" and info["exp.8"].opcode == "exponential"
  assert info["tuple.11"].opcode == "tuple"
  assert info["p.1"].opcode == "parameter"


CTX = pts.ShapeContext(
  user_rows=frozenset({22364, 1501}),
  sub_item_rows=frozenset({4501}),
  item_table=(12102, 256),
  other_params=frozenset({(256, 768), (768,)}),
  sampler=frozenset({(30, 100, 100), (30, 50, 100), (30, 100)}),
)


def test_categorise():
  info = pts.parse_hlo(FAKE_HLO)
  cat = {name: pts.categorise(i, CTX) for name, i in info.items()}
  assert cat["ynn_fusion.1"] == "matmul"
  assert cat["dot.2"] == "matmul"
  assert cat["ynn_fusion.2"] == "elementwise/layout"
  assert cat["while.3"] == "RNG"
  assert cat["copy.5"] == "user-table grad + optimizer"
  assert cat["add.6"] == "negative sampler"
  assert cat["sort.7"] == "item-table grad + optimizer"  # the row-sparse unique, not the sampler
  assert cat["custom-call"] == "prompt top-k"
  assert cat["exp.8"] == "softmax/CE over catalogue"
  assert cat["multiply.9"] == "item-table grad + optimizer"
  assert cat["add.10"] == "other params optimizer"
  assert pts.categorise(None, CTX) == "elementwise/layout"
  no_sampler = pts.ShapeContext(CTX.user_rows, frozenset(), CTX.item_table, CTX.other_params, frozenset())
  assert pts.categorise(info["add.6"], no_sampler) == "elementwise/layout"
  assert pts.categorise(info["sort.7"], no_sampler) == "elementwise/layout"


def test_summarise_ops_from_the_fake_trace():
  times, runs = pts.op_self_times(FAKE_TRACE, "jit_train_step")
  s = pts.summarise_ops(times, runs, pts.parse_hlo(FAKE_HLO), CTX, top=2)
  # Per step (2 runs, us -> ms): while.3 0.05 (RNG), copy.5 0.015 (user table), add.6 0.015 (sampler), ynn 0.02.
  cats = {c["category"]: c["ms_per_step"] for c in s["categories"]}
  assert list(cats) == list(pts.CATEGORIES)
  assert cats["RNG"] == pytest.approx(0.05)
  assert cats["user-table grad + optimizer"] == pytest.approx(0.015)
  assert cats["negative sampler"] == pytest.approx(0.015)
  assert cats["matmul"] == pytest.approx(0.02)
  assert sum(cats.values()) == pytest.approx(0.1)
  assert s["op_total_ms_per_step"] == pytest.approx(0.1)
  pct = {c["category"]: c["percent_of_op_total"] for c in s["categories"]}
  assert pct["RNG"] == pytest.approx(50.0) and pct["matmul"] == pytest.approx(20.0)
  assert s["num_ops"] == 4 and s["ops_not_in_hlo"] == []
  assert [o["op"] for o in s["top_ops"]] == ["while.3", "ynn_fusion.1"]
  assert s["top_ops"][1] == {
    "op": "ynn_fusion.1",
    "ms_per_step": pytest.approx(0.02),
    "category": "matmul",
    "shape": "f32[1500,768]{1,0}",
    "op_name": "jvp()/dot_general",
  }


def test_summarise_ops_unknown_op_is_elementwise_and_listed():
  s = pts.summarise_ops({"mystery.1": 3000.0}, 3, {}, CTX)
  assert s["ops_not_in_hlo"] == ["mystery.1"]
  assert s["categories"][-1] == {"category": "elementwise/layout", "ms_per_step": 1.0, "percent_of_op_total": 100.0}
  assert s["top_ops"] == [
    {"op": "mystery.1", "ms_per_step": 1.0, "category": "elementwise/layout", "shape": "?", "op_name": ""}
  ]
