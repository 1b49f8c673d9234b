"""Reads the cross-device collectives off compiled HLO text (``jax.jit(f).lower(...).compile().as_text()``).

The compiled text of an SPMD program is the program of one device, so the sizes are per device. A collective
inside a loop body is counted once, not once per iteration.
"""

from __future__ import annotations

import dataclasses
import math
import re

COLLECTIVE_OPS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

_BYTES = {
  "pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
  "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8\w*)\[([\d,]*)\]")
# `%name = TYPE opcode(operands), attributes`; TYPE may be a tuple `(f32[3,80]{0,1}, s32[3,80]{0,1})`.
_INSTRUCTION = re.compile(
  r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.*?)\s(?P<op>[a-z][\w\-]*)\((?P<args>.*)$"
)
_OPERAND = re.compile(r"%([\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction of a compiled HLO module.

  Attributes:
    op: base op name, e.g. ``'all-gather'`` (``-start``/``-done`` of async pairs folded into one).
    name: instruction name.
    result_shapes: array shapes of the result, e.g. ``('f32[3,80]', 's32[3,80]')``.
    result_bytes: bytes of the result on one device.
    operand_bytes: bytes of the operands on one device (0 if their definitions were not found).
  """

  op: str
  name: str
  result_shapes: tuple[str, ...]
  result_bytes: int
  operand_bytes: int


def _shapes(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _SHAPE.findall(type_text)]


def _nbytes(shapes: list[tuple[str, tuple[int, ...]]]) -> int:
  return sum(_BYTES.get(dt, 1) * math.prod(dims) for dt, dims in shapes)


def collectives(hlo_text: str) -> list[Collective]:
  """All collective instructions of ``hlo_text``, in order of appearance.

  An async pair (``all-gather-start`` / ``all-gather-done``) is reported once, at its ``-done`` with the
  ``-done`` result (the start's result also holds the operands) and the start's operands.
  """
  types: dict[str, str] = {}
  operands_of: dict[str, list[str]] = {}
  found = []
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, op = m["name"], m["op"]
    types[name] = m["type"]
    operands = _OPERAND.findall(m["args"].split(")", 1)[0])
    operands_of[name] = operands
    base = op.removesuffix("-start").removesuffix("-done")
    if base not in COLLECTIVE_OPS or op.endswith("-start"):
      continue
    if op.endswith("-done"):
      operands = [o for start in operands for o in operands_of.get(start, [])]
    result = _shapes(m["type"])
    found.append(
      Collective(
        op=base,
        name=name,
        result_shapes=tuple(f"{dt}[{','.join(map(str, dims))}]" for dt, dims in result),
        result_bytes=_nbytes(result),
        operand_bytes=sum(_nbytes(_shapes(types.get(o, ""))) for o in operands),
      )
    )
  return found


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """Total result bytes per collective op on one device, e.g. ``{'all-gather': 1920}``; absent ops are omitted."""
  out: dict[str, int] = {}
  for c in collectives(hlo_text):
    out[c.op] = out.get(c.op, 0) + c.result_bytes
  return out
