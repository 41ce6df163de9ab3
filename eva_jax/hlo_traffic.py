"""Memory traffic of a compiled program's loops, read from its optimized HLO text.

A decode step is bound by the bytes it moves, not its FLOPs, so the bytes each iteration of
the decode loop reads and writes say how close to the memory roofline it can get, before any
device runs it. XLA's own `cost_analysis()` counts a loop body once and gives only totals,
so this walks the HLO itself: every instruction of a loop body (and of loops nested in it,
times their known trip counts) is charged the bytes of its operands and outputs, with the
rules XLA's cost model uses for the cases that matter here:

* a fusion's parameter that is only sliced inside it (dynamic-slice, slice, gather; through
  bitcasts, elementwise ops and nested fusions) costs the slices' bytes, not the whole
  operand's; one that is only the buffer a dynamic-update-slice writes into costs nothing
  (the update happens in place), and such a fusion's output costs the update's bytes;
* parameters, constants, tuples, get-tuple-element and bitcasts are free, and so are arrays
  XLA:TPU placed in VMEM (memory space 1): what moves them there is the copy-start that
  reads them from HBM;
* a loop nested in the body counts its trip count times: XLA:GPU's `known_trip_count`, or
  for XLA:TPU, which does not record it, the `fori_loop` pattern (`counter < N` from a
  constant start);
* custom calls (cuBLAS gemms, Triton and Pallas kernels) are charged their whole operands:
  a kernel that reads only part of an operand (the decode kernel reads the cache up to its
  slot) is over-counted, and the report says how many bytes such calls account for.

So the figure is an estimate of HBM traffic under perfect fusion boundaries as XLA chose
them (no cache effects, no L2 reuse), good for comparing programs and for finding bytes a
program should not move (a weight transposed every step, a cache copied): the instructions
are grouped by the op name XLA kept in their metadata, layer numbers removed.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Optional

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "s4": 0.5, "u4": 0.5, "s2": 0.25, "u2": 0.25, "token": 0}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9]\w*)?)\[([\d,]*)\](\{[^}]*\})?")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_OPERAND_NAME = re.compile(r"%([\w.\-]+)\s*$")
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
         "partition-id", "replica-id", "opt-barrier", "add-dependency", "copy-done",
         "async-done", "all-reduce-done", "all-gather-done", "collective-permute-done",
         "send-done", "recv-done"}
_SLICES = {"dynamic-slice", "slice", "gather"}
# Elementwise ops: inside a fusion they are computed only where their result is read, so a
# parameter that reaches a slice through them costs the slice.
_ELEMENTWISE = {"add", "subtract", "multiply", "divide", "maximum", "minimum", "negate",
                "abs", "exponential", "log", "tanh", "convert", "compare", "select", "and",
                "or", "not", "clamp", "sqrt", "rsqrt", "power", "sign", "floor", "ceil"}
_CALLS = {"call", "async-start"}
_LAYER = re.compile(r"(layer|block)_\d+")


def _dtype_bytes(dtype: str) -> float:
  if dtype.startswith("f8") or dtype.startswith("f4"):
    return 1 if dtype.startswith("f8") else 0.5
  return _DTYPE_BYTES.get(dtype, 4)


def _dims(shape: str) -> Optional[str]:
  """The dimensions of an array shape ("f32[4,8]{1,0}" -> "4,8"), None for a tuple."""
  m = _ARRAY.match(shape.strip())  # a tuple starts with "(": no match
  return m.group(2) if m else None


def shape_bytes(shape: str) -> float:
  """HBM bytes of an HLO shape string (an array or a tuple of them). Arrays placed in memory
  space 1 (`S(1)` in their layout: a TPU's on-chip VMEM) move no HBM bytes."""
  total = 0.0
  for dtype, dims, layout in _ARRAY.findall(shape):
    if "S(1)" in layout:
      continue
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _dtype_bytes(dtype)
  return total


def _balanced(text: str, start: int) -> int:
  """Index just past the bracket group opening at text[start]."""
  depth, pairs = 0, {"(": ")", "[": "]", "{": "}"}
  closing = set(pairs.values())
  for i in range(start, len(text)):
    c = text[i]
    if c in pairs:
      depth += 1
    elif c in closing:
      depth -= 1
      if depth == 0:
        return i + 1
  raise ValueError(f"unbalanced HLO text: {text[start:start + 80]!r}")


def _split_top(text: str) -> list[str]:
  """Splits on commas outside brackets."""
  parts, depth, cur = [], 0, []
  for c in text:
    if c in "([{":
      depth += 1
    elif c in ")]}":
      depth -= 1
    if c == "," and depth == 0:
      parts.append("".join(cur))
      cur = []
    else:
      cur.append(c)
  if "".join(cur).strip():
    parts.append("".join(cur))
  return parts


@dataclasses.dataclass
class Instr:
  name: str
  shape: str
  opcode: str
  operands: list[str]
  args: str  # the text between the opcode's parentheses
  attrs: str
  root: bool

  def attr(self, key: str) -> Optional[str]:
    m = re.search(rf"\b{key}=%?([\w.\-]+)", self.attrs)
    return m.group(1) if m else None

  @property
  def op_name(self) -> str:
    m = re.search(r'op_name="([^"]*)"', self.attrs)
    return m.group(1) if m else ""

  @property
  def trip_count(self) -> Optional[int]:
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', self.attrs)
    return int(m.group(1)) if m else None


def _parse_instr(line: str) -> Optional[Instr]:
  m = _INSTR.match(line)
  if not m:
    return None
  pos = m.end()
  if line[pos] == "(":
    end = _balanced(line, pos)
  else:
    end = line.index(" ", pos)
  shape = line[pos:end]
  rest = line[end:].lstrip()
  paren = rest.index("(")
  opcode = rest[:paren].strip()
  close = _balanced(rest, paren)
  operands, args = [], rest[paren + 1:close - 1]
  for part in _split_top(args):
    name = _OPERAND_NAME.search(part.strip())
    if name:
      operands.append(name.group(1))
  return Instr(m.group(2), shape, opcode, operands, args, rest[close:], bool(m.group(1)))


def parse_module(hlo_text: str) -> tuple[dict[str, list[Instr]], str]:
  """{computation name: its instructions}, and the entry computation's name."""
  comps, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header and not line.startswith(" "):
      current = header.group(2)
      comps[current] = []
      if header.group(1):
        entry = current
      continue
    if line.startswith("}"):
      current = None
      continue
    if current is not None:
      instr = _parse_instr(line)
      if instr is not None:
        comps[current].append(instr)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return comps, entry


@dataclasses.dataclass
class LoopTraffic:
  """One top-level while loop of a program: bytes moved per iteration."""
  name: str
  trip_count: Optional[int]
  carried_shapes: str
  bytes_per_iteration: float
  # op name (layer numbers removed) -> bytes per iteration, largest first
  by_op_name: list[tuple[str, float]]
  # opcode (fusion kind for fusions) -> bytes per iteration
  by_kind: dict[str, float]
  # custom calls charged their whole operands (Triton / Pallas kernels may read less)
  custom_call_bytes: float


class _Walker:
  def __init__(self, comps: dict[str, list[Instr]]):
    self.comps = comps
    self._user_cache: dict[str, dict] = {}
    self._comp_bytes: dict[str, float] = {}
    self._read_cache: dict[tuple, float] = {}
    self.shapes = {c: {i.name: i.shape for i in instrs} for c, instrs in comps.items()}

  def _users(self, comp: str) -> dict[str, list[tuple[Instr, int]]]:
    if comp not in self._user_cache:
      users = collections.defaultdict(list)
      for i in self.comps[comp]:
        for k, o in enumerate(i.operands):
          users[o].append((i, k))
      self._user_cache[comp] = users
    return self._user_cache[comp]

  def _uses(self, comp: str, name: str) -> list[tuple[Instr, int]]:
    """The users of `name` in `comp`, looking through bitcasts."""
    out = []
    for user, k in self._users(comp).get(name, []):
      if user.opcode == "bitcast":
        out.extend(self._uses(comp, user.name))
      else:
        out.append((user, k))
    return out

  def _reaches_root(self, comp: str, instr: Instr) -> bool:
    if instr.root:
      return True
    return any(user.opcode == "bitcast" and self._reaches_root(comp, user)
               for user, _ in self._users(comp).get(instr.name, []))

  def _param(self, comp: str, number: int) -> Optional[Instr]:
    return next((i for i in self.comps.get(comp, ())
                 if i.opcode == "parameter" and i.args.strip() == str(number)), None)

  def _value_read_bytes(self, comp: str, value: Instr, full: float) -> float:
    """Bytes the rest of fused computation `comp` reads of `value` (whole size `full`)."""
    key = (comp, value.name, full)  # elementwise chains fan out and meet again: walk once
    if key not in self._read_cache:
      self._read_cache[key] = self._walk_reads(comp, value, full)
    return self._read_cache[key]

  def _walk_reads(self, comp: str, value: Instr, full: float) -> float:
    if self._reaches_root(comp, value):
      return full  # the fusion writes it out whole, so it reads it whole
    uses = self._uses(comp, value.name)
    if uses and all(user.opcode == "dynamic-update-slice" and k == 0 and
                    all(r.root or r.opcode == "tuple" for r, _ in self._uses(comp, user.name))
                    for user, k in uses):
      return 0.0  # the buffer a dynamic-update-slice writes in place, not read here
    read = 0.0
    for user, k in uses:
      if user.opcode in _SLICES and k == 0:
        read += shape_bytes(user.shape)  # reads what it slices
      elif user.opcode in _ELEMENTWISE and _dims(user.shape) == _dims(value.shape):
        # e.g. the logits times the soft-cap, then the picked token's gathered: what is read
        # of the result is what is read of the value.
        read += self._value_read_bytes(comp, user, full)
      elif user.opcode == "fusion":
        nested = user.attr("calls")
        param = self._param(nested, k)
        if param is not None and self._reaches_root(nested, param):
          # A nested fusion passing it on (XLA:TPU's bitcast fusions): what reads that.
          read += self._value_read_bytes(comp, user, full)
        else:
          read += self._param_read_bytes(nested, k, full)
      else:
        return full
    return min(full, read)

  def _param_read_bytes(self, comp: str, number: int, full: float) -> float:
    """Bytes a fused computation reads of its parameter `number` (whole size `full`)."""
    param = self._param(comp, number)
    if param is None:
      return full
    return self._value_read_bytes(comp, param, full)

  def fusion_bytes(self, comp: str, instr: Instr) -> float:
    called = instr.attr("calls")
    shapes = self.shapes[comp]
    body = self.comps.get(called)
    if not body:
      return sum(shape_bytes(shapes.get(o, "")) for o in instr.operands) + shape_bytes(
          instr.shape)
    total = sum(self._param_read_bytes(called, k, shape_bytes(shapes.get(o, "")))
                for k, o in enumerate(instr.operands))
    by_name = {i.name: i for i in body}
    root = next((i for i in body if i.root), body[-1])
    # The fusion's own output shape says where it lives (VMEM outputs move no HBM bytes).
    return total + min(self._output_bytes(root, by_name), shape_bytes(instr.shape))

  def _output_bytes(self, root: Instr, by_name: dict[str, Instr]) -> float:
    if root.opcode == "tuple":
      return sum(self._output_bytes(by_name[o], by_name) for o in root.operands
                 if o in by_name)
    if root.opcode == "bitcast" and root.operands and root.operands[0] in by_name:
      return self._output_bytes(by_name[root.operands[0]], by_name)
    if root.opcode == "dynamic-update-slice" and len(root.operands) > 1:
      update = by_name.get(root.operands[1])
      return shape_bytes(update.shape) if update is not None else 0.0
    return shape_bytes(root.shape)

  def trip_count(self, comp: str, instr: Instr) -> Optional[int]:
    """A while loop's trip count: XLA's `known_trip_count` (XLA:GPU records it), else read
    off a `fori_loop`'s shape (XLA:TPU): the condition `counter < N` with the counter's
    initial value a constant."""
    if instr.trip_count is not None:
      return instr.trip_count
    cond = self.comps.get(instr.attr("condition") or "", [])
    root = next((i for i in cond if i.root), None)
    if root is None or root.opcode != "compare" or "direction=LT" not in root.attrs:
      return None
    in_cond = {i.name: i for i in cond}
    counter, limit = (in_cond.get(o) for o in root.operands)
    if (counter is None or limit is None or counter.opcode != "get-tuple-element"
        or limit.opcode != "constant"):
      return None
    index = re.search(r"index=(\d+)", counter.attrs)
    in_comp = {i.name: i for i in self.comps[comp]}
    init = in_comp.get(instr.operands[0]) if instr.operands else None
    if index is None or init is None or init.opcode != "tuple":
      return None
    start = in_comp.get(init.operands[int(index.group(1))])
    while start is not None and start.opcode in ("copy", "bitcast"):
      start = in_comp.get(start.operands[0])
    try:
      first, last = int(start.args), int(limit.args)
    except (AttributeError, ValueError):
      return None
    return max(last - first, 0)

  def computation_bytes(self, comp: Optional[str]) -> float:
    """Bytes one run of computation `comp` moves (memoized)."""
    if comp is None or comp not in self.comps:
      return 0.0
    if comp not in self._comp_bytes:
      self._comp_bytes[comp] = sum(self.instr_bytes(comp, i) for i in self.comps[comp])
    return self._comp_bytes[comp]

  def instr_bytes(self, comp: str, instr: Instr) -> float:
    shapes = self.shapes[comp]
    op = instr.opcode
    if op in _FREE:
      return 0.0
    if op == "while":
      body, cond = instr.attr("body"), instr.attr("condition")
      trips = self.trip_count(comp, instr) or 1
      return trips * self.computation_bytes(body) + (trips + 1) * self.computation_bytes(cond)
    if op == "conditional":
      branches = re.search(r"branch_computations=\{([^}]*)\}", instr.attrs)
      names = ([b.strip().lstrip("%") for b in branches.group(1).split(",")] if branches
               else [instr.attr("true_computation"), instr.attr("false_computation")])
      return max((self.computation_bytes(b) for b in names if b), default=0.0)
    if op in _CALLS:
      return self.computation_bytes(_called(instr))
    if op == "fusion":
      return self.fusion_bytes(comp, instr)
    if op == "dynamic-update-slice":
      return 2 * shape_bytes(shapes.get(instr.operands[1], ""))
    if op in _SLICES:
      return 2 * shape_bytes(instr.shape)
    return sum(shape_bytes(shapes.get(o, "")) for o in instr.operands) + shape_bytes(
        instr.shape)


def _called(instr: Instr) -> Optional[str]:
  """The computation a call or async-start runs."""
  return instr.attr("to_apply") or instr.attr("calls")


def _kind(instr: Instr) -> str:
  if instr.opcode == "fusion":
    m = re.search(r"kind=(\w+)", instr.attrs)
    return f"fusion:{m.group(1) if m else '?'}"
  if instr.opcode == "custom-call":
    m = re.search(r'custom_call_target="([^"]*)"', instr.attrs)
    return f"custom-call:{m.group(1) if m else '?'}"
  return instr.opcode


def loop_traffic(hlo_text: str, top: int = 12) -> list[LoopTraffic]:
  """Bytes per iteration of each while loop the program runs at its top level (loops nested
  in a body count inside it, times their trip counts), largest first."""
  comps, entry = parse_module(hlo_text)
  walker = _Walker(comps)

  def attribute(comp: str, scale: float, by_op, by_kind, custom):
    for instr in comps.get(comp, []):
      if instr.opcode == "while":
        trips = walker.trip_count(comp, instr) or 1
        attribute(instr.attr("body"), scale * trips, by_op, by_kind, custom)
        continue
      if instr.opcode in _CALLS:
        attribute(_called(instr), scale, by_op, by_kind, custom)
        continue
      b = walker.instr_bytes(comp, instr) * scale
      if not b:
        continue
      name = (_LAYER.sub(r"\1_N", instr.op_name.split("/while/body/")[-1])
              or re.sub(r"\.\d+$", "", instr.name))
      by_op[name] += b
      by_kind[_kind(instr)] += b
      if instr.opcode == "custom-call":
        custom[0] += b

  def outer_loops(comp: str):
    """The while loops the program runs at its top level: in the entry computation or in
    computations it calls (XLA:CPU wraps a loop in a call), not those inside loop bodies."""
    for instr in comps.get(comp, []):
      if instr.opcode == "while":
        yield comp, instr
      elif instr.opcode in _CALLS:
        yield from outer_loops(_called(instr))

  loops = []
  for comp, instr in outer_loops(entry):
    by_op, by_kind, custom = collections.Counter(), collections.Counter(), [0.0]
    attribute(instr.attr("body"), 1.0, by_op, by_kind, custom)
    loops.append(LoopTraffic(
        name=instr.name, trip_count=walker.trip_count(comp, instr), carried_shapes=instr.shape,
        bytes_per_iteration=walker.computation_bytes(instr.attr("body")),
        by_op_name=by_op.most_common(top), by_kind=dict(by_kind.most_common()),
        custom_call_bytes=custom[0]))
  return sorted(loops, key=lambda l: -l.bytes_per_iteration)
