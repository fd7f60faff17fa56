"""What a compiled XLA program does, read from its optimized HLO text.

``program_stats(compiled.as_text(), threshold)`` walks the program from its
entry computation along the path that runs and adds up, for every executed
instruction:

* **traffic**: the bytes of its operands and results whose size is at least
  ``threshold`` (the arrays that live in HBM and matter: logits, their
  tiles, weights, gradients). Bookkeeping instructions (parameter, tuple,
  get-tuple-element, bitcast, constant, ...) move nothing. A fusion counts
  at its boundary (its operands and results), except that an operand the
  fusion only gathers or slices from is read for just what it picks, and a
  buffer updated in place (dynamic-update-slice, scatter) is written for
  just the update. Arrays in a TPU's on-chip memory (``S(1)``) are not HBM
  traffic;
* **flops**: ``2·M·N·K`` of every dot and convolution (and a GPU program's
  cuBLAS matmul custom-calls), inside fusions too;
* **collectives**: the count and result bytes of every all-reduce,
  all-gather, reduce-scatter, all-to-all and collective-permute.

A while loop's body counts times its trip count (the
``known_trip_count`` the GPU compiler records, else the constant that the
condition compares the counter with, from 0 in steps of 1, or under x64 on
a TPU the low word's bound of a counter split in two 32-bit words; XLA's own
``cost_analysis`` counts a body once). A loop whose condition is a carried
boolean is jxent's in-place redo (at most one trip, when a check failed, as
a conditional's fallback): it counts no trip, its body goes to
``worst_traffic``. A conditional counts its cheapest
branch, the one with the least traffic (on a tie, the fewest collectives:
on sharded logits neither branch may move a large array): in these programs
every conditional is a check with a fallback (jxent's "a logit overflowed,
redo the batch with the row maximum" and "the fast smoothing sum lost digits,
sum term by term"), and the fallback is the branch that reads the logits
again. The dearest branch is kept as ``worst_traffic`` so that a reader can
see what was left out.

Pure text processing: no jax import, so the tests run without any compiler.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
    "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
    "f64": 8, "c64": 8, "c128": 16, "token": 0,
}  # fmt: skip
ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9]\w*)?)\[([0-9,]*)\](\{[^}]*\})?")
# A TPU layout's memory space S(1) is the core's VMEM, not HBM.
ON_CHIP = re.compile(r"S\([1-9]\)")
COLLECTIVES = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
    "ragged-all-to-all",
)
# Instructions that name, group or alias buffers without moving their bytes.
NO_TRAFFIC = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast",
    "after-all", "partition-id", "replica-id", "opt-barrier",
    "add-dependency", "copy-done", "send-done", "recv-done", "async-done",
    "async-update", "all-reduce-done", "all-gather-done",
    "collective-permute-done", "domain", "get-dimension-size",
}  # fmt: skip
# The custom-call targets of the GPU's library matmuls (the GPU compiler
# rewrites a dot into one once it has autotuned on the device).
LIBRARY_GEMM = re.compile(r'custom_call_target="__cublas\$(gemm|lt\$matmul)')
PICKS = {"gather", "slice", "dynamic-slice"}
# Write their last operand into their first, in place (XLA aliases the two).
IN_PLACE = {"dynamic-update-slice", "scatter"}
ELEMENTWISE_OR_RENAME = {
    "select", "convert", "add", "subtract", "multiply", "divide", "negate",
    "maximum", "minimum", "exponential", "log", "abs", "compare", "and", "or",
    "not", "is-finite", "copy", "bitcast", "clamp",
}  # fmt: skip
HEADER = re.compile(r"^(ENTRY\s+)?%(\S+)\s+\(.*\{\s*$")
INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%(\S+)\s+=\s+(.*)$")


@dataclass
class Instruction:
    """One HLO instruction: result type, opcode, operand names, attributes."""

    name: str
    type: str
    opcode: str
    operands: list[str]
    attrs: str
    root: bool = False
    args: str = ""  # the text inside the parentheses (a constant's value)


@dataclass
class Computation:
    """A named list of instructions, looked up by name."""

    name: str
    instructions: list[Instruction] = field(default_factory=list)
    entry: bool = False

    def __post_init__(self):
        self.by_name: dict[str, Instruction] = {}

    def add(self, instruction: Instruction) -> None:
        self.instructions.append(instruction)
        self.by_name[instruction.name] = instruction

    @property
    def root(self) -> Instruction:
        return next(i for i in self.instructions if i.root)


@dataclass
class Stats:
    """What the path that runs does (see the module's docstring)."""

    traffic: float = 0.0
    flops: float = 0.0
    collectives: dict[str, int] = field(default_factory=dict)
    collective_bytes: float = 0.0
    max_collective_bytes: float = 0.0
    worst_traffic: float = 0.0  # with each conditional's dearest branch
    loops: list[int] = field(default_factory=list)  # trip counts met

    def add(self, other: Stats, times: float = 1.0) -> None:
        self.traffic += times * other.traffic
        self.flops += times * other.flops
        self.collective_bytes += times * other.collective_bytes
        self.max_collective_bytes = max(
            self.max_collective_bytes, other.max_collective_bytes
        )
        self.worst_traffic += times * other.worst_traffic
        for kind, count in other.collectives.items():
            self.collectives[kind] = self.collectives.get(kind, 0) + round(
                times * count
            )
        self.loops += other.loops

    def to_dict(self) -> dict:
        return {
            "traffic_bytes": self.traffic,
            "worst_traffic_bytes": self.worst_traffic,
            "flops": self.flops,
            "collectives": dict(sorted(self.collectives.items())),
            "collective_count": sum(self.collectives.values()),
            "collective_bytes": self.collective_bytes,
            "max_collective_bytes": self.max_collective_bytes,
            "loop_trip_counts": self.loops,
        }


# ---------------------------------------------------------------- parsing


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group that opens at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "([{":
            depth += 1
        elif text[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced: {text[start : start + 80]}")


def parse_instruction(line: str) -> Instruction | None:
    """``%name = TYPE opcode(operands), attrs`` (comments removed)."""
    match = INSTRUCTION.match(re.sub(r"/\*.*?\*/", "", line))
    if not match:
        return None
    root, name, rest = match.groups()
    if rest.startswith("("):
        end = _balanced(rest, 0)
    else:
        end = rest.index(" ")
    type_, rest = rest[:end], rest[end:].lstrip()
    opcode = re.match(r"[\w-]+", rest).group(0)
    close = _balanced(rest, len(opcode))
    operands = re.findall(r"%([\w.\-]+)", rest[len(opcode) : close])
    attrs = rest[close:].lstrip(", ")
    args = rest[len(opcode) + 1 : close - 1]
    return Instruction(name, type_, opcode, operands, attrs, bool(root), args)


def parse_module(text: str) -> dict[str, Computation]:
    """Computations by name; the entry one has ``entry=True``."""
    computations: dict[str, Computation] = {}
    current = None
    for line in text.splitlines():
        header = HEADER.match(line)
        if header:
            current = Computation(header.group(2), entry=bool(header.group(1)))
            computations[current.name] = current
        elif line.startswith("}"):
            current = None
        elif current is not None:
            instruction = parse_instruction(line)
            if instruction is not None:
                current.add(instruction)
    return computations


def array_sizes(type_: str, hbm: bool = False) -> list[float]:
    """Bytes of each array in an HLO type (a tuple gives several).

    With ``hbm``, arrays placed in on-chip memory (a TPU's VMEM, ``S(1)`` in
    the layout) count 0: moving them is not HBM traffic.
    """
    sizes = []
    for dtype, dims, layout in ARRAY.findall(type_):
        if dtype not in DTYPE_BYTES and not dtype.startswith("f8"):
            continue
        count = math.prod(int(d) for d in dims.split(",") if d)
        on_chip = hbm and ON_CHIP.search(layout)
        sizes.append(0.0 if on_chip else count * DTYPE_BYTES.get(dtype, 1))
    return sizes


def array_shape(type_: str) -> tuple[int, ...]:
    """The dimensions of the (first) array in an HLO type."""
    dims = ARRAY.search(type_).group(2)
    return tuple(int(d) for d in dims.split(",") if d)


def called(instruction: Instruction, key: str) -> list[str]:
    """Computation names in ``key=%c`` or ``key={%a, %b}``."""
    match = re.search(rf"\b{key}=(\{{[^}}]*\}}|%[\w.\-]+)", instruction.attrs)
    return re.findall(r"%([\w.\-]+)", match.group(1)) if match else []


# ------------------------------------------------------------- trip counts


def trip_count(instruction: Instruction, computations: dict) -> int:
    """Iterations of a while loop (see the module's docstring)."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', instruction.attrs)
    if known:
        return int(known.group(1))
    condition = computations[called(instruction, "condition")[0]]
    root = operands_of = _low_word_compare(condition) or condition.root
    if root.opcode == "fusion":  # the compare wrapped in a fusion (the CPU's)
        root = computations[called(root, "calls")[0]].root
    direction = re.search(r"direction=(\w+)", root.attrs)
    if root.opcode != "compare" or not direction:
        raise ValueError(f"unknown loop condition in {condition.name}")
    if operands_of is not root:  # the fusion's parameters, in order
        fused = computations[called(operands_of, "calls")[0]]
        order = [int(fused.by_name[o].args) for o in root.operands]
        operands = [operands_of.operands[i] for i in order]
    else:
        operands = root.operands
    values = [_constant(condition.by_name[o]) for o in operands]
    if values.count(None) != 1:
        raise ValueError(f"no constant bound in {condition.name}")
    op = direction.group(1)
    if values[0] is not None:  # bound OP counter: read it as counter OP' bound
        op = {"GT": "LT", "GE": "LE", "LT": "GT", "LE": "GE"}.get(op, op)
    bound = next(v for v in values if v is not None)
    if op not in ("LT", "LE", "NE"):
        raise ValueError(f"loop condition {op} in {condition.name}")
    return bound + 1 if op == "LE" else bound


def _low_word_compare(condition: Computation) -> Instruction | None:
    """The low word's compare of a 64-bit counter split in two 32-bit words.

    Under x64 a TPU program's loop counter is an ``s64`` held as two ``u32``
    words, and ``counter < bound`` becomes ``bitcast(high) < 0 or (high == 0
    and low < bound)``. From 0 in steps of 1 (the high word stays 0 for fewer
    than 2³² trips), the loop runs as long as ``low < bound``: that compare,
    or None for any other condition.
    """
    root = condition.root
    if root.opcode != "or" or len(root.operands) != 2:
        return None
    parts = [condition.by_name[o] for o in root.operands]
    if sorted(p.opcode for p in parts) != ["and", "compare"]:
        return None
    negative, both = sorted(parts, key=lambda p: p.opcode != "compare")
    words = [condition.by_name[o] for o in both.operands]
    if len(words) != 2 or any(w.opcode != "compare" for w in words):
        return None

    def direction(c: Instruction) -> str:
        found = re.search(r"direction=(\w+)", c.attrs)
        return found.group(1) if found else ""

    def zero_bound(c: Instruction) -> bool:
        return any(_constant(condition.by_name[o]) == 0 for o in c.operands)

    def variable(c: Instruction) -> Instruction | None:
        rest = [condition.by_name[o] for o in c.operands]
        rest = [r for r in rest if _constant(r) is None]
        return rest[0] if len(rest) == 1 else None

    high = [w for w in words if direction(w) == "EQ" and zero_bound(w)]
    low = [w for w in words if w not in high]
    if len(high) != 1 or len(low) != 1:
        return None
    signed, word = variable(negative), variable(high[0])
    if direction(negative) != "LT" or not zero_bound(negative):
        return None
    if None in (signed, word) or signed.opcode != "bitcast-convert":
        return None
    return low[0] if signed.operands == [word.name] else None


def is_redo(instruction: Instruction, computations: dict) -> bool:
    """Whether a while loop runs while a boolean of its carry says so.

    jxent's ``_redone_if``: a loop of at most one trip that recomputes a
    large carried array in place when a check failed.
    """
    condition = computations[called(instruction, "condition")[0]]
    root = condition.root
    return root.opcode == "get-tuple-element" and root.type.startswith("pred[]")


def _constant(instruction: Instruction) -> int | None:
    """The value of an integer scalar constant, else None."""
    if instruction.opcode != "constant" or not re.fullmatch(r"-?\d+", instruction.args):
        return None
    return int(instruction.args)


# ------------------------------------------------------------------ flops


def matmul_flops(instruction: Instruction, computation: Computation) -> float:
    """``2·M·N·K`` of a dot or convolution (0 for anything else)."""
    if instruction.opcode == "dot":
        lhs = array_shape(computation.by_name[instruction.operands[0]].type)
        match = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instruction.attrs)
        contracted = [int(d) for d in match.group(1).split(",") if d] if match else []
        k = math.prod(lhs[d] for d in contracted)
        return 2.0 * math.prod(array_shape(instruction.type)) * k
    attrs = instruction.attrs
    if instruction.opcode == "custom-call" and LIBRARY_GEMM.search(attrs):
        # A GPU program's library matmul (cuBLAS, cuBLASLt): its contracting
        # dimensions are in the backend config, its result is the first array.
        lhs = array_shape(computation.by_name[instruction.operands[0]].type)
        match = re.search(
            r'"lhs_contracting_dimensions":\[([^\]]*)\]', instruction.attrs
        )
        contracted = (
            [int(d) for d in re.findall(r"\d+", match.group(1))] if match else []
        )
        k = math.prod(lhs[d] for d in contracted)
        return 2.0 * math.prod(array_shape(instruction.type)) * k
    if instruction.opcode == "convolution":
        rhs = array_shape(computation.by_name[instruction.operands[1]].type)
        labels = re.search(r"dim_labels=\w+_(\w+)->", instruction.attrs).group(1)
        per_output = math.prod(rhs) / rhs[labels.index("o")]
        return 2.0 * math.prod(array_shape(instruction.type)) * per_output
    return 0.0


def nested_flops(name: str, computations: dict) -> float:
    """Matmul flops inside a fused computation (and fusions nested in it)."""
    computation = computations[name]
    total = 0.0
    for instruction in computation.instructions:
        total += matmul_flops(instruction, computation)
        for inner in called(instruction, "calls"):
            total += nested_flops(inner, computations)
    return total


# ---------------------------------------------------------------- traffic


def _big(sizes, threshold: float) -> float:
    return sum(s for s in sizes if s >= threshold)


def _operand_sizes(instruction: Instruction, computation: Computation) -> list:
    return [
        sum(array_sizes(computation.by_name[o].type, hbm=True))
        for o in instruction.operands
        if o in computation.by_name
    ]


def fusion_traffic(instruction, computation, computations, threshold) -> float:
    """A fusion's big-array bytes at its boundary (module docstring)."""
    fused = computations[called(instruction, "calls")[0]]
    reads = 0.0
    for index, size in enumerate(_operand_sizes(instruction, computation)):
        if size < threshold:
            continue
        picks = _picks(_parameter(fused, index), fused, computations)
        reads += size if picks is None else picks
    return reads + _fusion_writes(fused, threshold)


def _parameter(computation: Computation, index: int) -> str:
    return next(
        i.name
        for i in computation.instructions
        if i.opcode == "parameter" and i.args == str(index)
    )


def _users(computation: Computation) -> dict[str, list[Instruction]]:
    if not hasattr(computation, "users"):
        computation.users = {}
        for inner in computation.instructions:
            for operand in inner.operands:
                computation.users.setdefault(operand, []).append(inner)
    return computation.users


def _picks(name: str, fused: Computation, computations: dict) -> float | None:
    """Bytes picked from ``name`` if it is only gathered or sliced, else None.

    Elementwise steps between it and the picks (a select, a convert: the same
    shape in and out) and fusions nested in the fusion are followed: XLA
    evaluates them at the picked positions only. A buffer updated in place
    (``dynamic-update-slice``'s first operand) is not read; the update is
    counted as the write.
    """
    shape = array_shape(fused.by_name[name].type)
    consumers = _users(fused).get(name, [])
    if not consumers:
        return None
    picked = 0.0
    for user in consumers:
        if user.opcode in PICKS and user.operands[0] == name:
            inner = sum(array_sizes(user.type))
        elif user.opcode in IN_PLACE and user.operands[0] == name:
            inner = 0.0
        elif user.opcode == "fusion" and user.operands.count(name) == 1:
            nested = computations[called(user, "calls")[0]]
            index = user.operands.index(name)
            inner = _picks(_parameter(nested, index), nested, computations)
        elif user.opcode in ELEMENTWISE_OR_RENAME and (
            array_shape(user.type) == shape or user.opcode == "bitcast"
        ):
            inner = _picks(user.name, fused, computations)
        else:
            inner = None
        if inner is None:
            return None
        picked += inner
    return picked


def _fusion_writes(fused: Computation, threshold: float) -> float:
    """Bytes a fusion writes: its outputs, an in-place update's update only."""
    root = fused.root
    outputs = (
        [fused.by_name[o] for o in root.operands] if root.opcode == "tuple" else [root]
    )
    total = 0.0
    for output in outputs:
        size = sum(array_sizes(output.type, hbm=True))
        while output.opcode == "bitcast":
            output = fused.by_name[output.operands[0]]
        if size < threshold:
            continue
        if output.opcode in IN_PLACE:
            size = _update_size(output, fused)
        total += size
    return total


def _update_size(instruction: Instruction, computation: Computation) -> float:
    """Bytes an in-place update writes: a dynamic-update-slice's update, a
    scatter's updates (read, combined and written back: counted once)."""
    index = 1 if instruction.opcode == "dynamic-update-slice" else -1
    update = computation.by_name[instruction.operands[index]]
    return sum(array_sizes(update.type))


def instruction_traffic(instruction, computation, computations, threshold) -> float:
    """Big-array bytes one executed (non-control-flow) instruction moves."""
    op = instruction.opcode
    if op in NO_TRAFFIC or op.endswith("-done"):
        return 0.0
    if op == "custom-call" and "AllocateBuffer" in instruction.attrs:
        return 0.0
    if op == "fusion":
        return fusion_traffic(instruction, computation, computations, threshold)
    result = array_sizes(instruction.type, hbm=True)
    if op in PICKS:
        return 2 * _big(result, threshold)  # reads what it picks, writes it
    if op in IN_PLACE:
        update = _update_size(instruction, computation)
        return update if max(result, default=0) >= threshold else 0.0
    if op == "copy-start":  # (destination, source, context): read + write
        return _big(result[:2], threshold)
    return _big(_operand_sizes(instruction, computation), threshold) + _big(
        result, threshold
    )


# ------------------------------------------------------------------- walk


def computation_stats(name: str, computations: dict, threshold: float) -> Stats:
    """Stats of one run of a computation, loops and branches included."""
    computation = computations[name]
    stats = Stats()
    for instruction in computation.instructions:
        op = instruction.opcode
        if op == "while":
            redo = is_redo(instruction, computations)
            trips = 0 if redo else trip_count(instruction, computations)
            body = called(instruction, "body")[0]
            body_stats = computation_stats(body, computations, threshold)
            stats.add(body_stats, trips)
            stats.loops.append(trips)
            if redo:  # the fallback, like a conditional's dearest branch
                stats.worst_traffic += body_stats.worst_traffic
        elif op == "conditional":
            branches = called(instruction, "branch_computations") or (
                called(instruction, "true_computation")
                + called(instruction, "false_computation")
            )
            options = [computation_stats(b, computations, threshold) for b in branches]
            # Ties (branches that move no large array) go to the branch with
            # fewer collectives: the fast path passes values through, the
            # fallback recomputes them.
            cheapest = min(
                options, key=lambda s: (s.traffic, sum(s.collectives.values()))
            )
            worst = max(s.worst_traffic for s in options)
            stats.add(cheapest)
            stats.worst_traffic += worst - cheapest.worst_traffic
        elif op in ("call", "async-start") or (
            op == "custom-call" and called(instruction, "called_computations")
        ):
            for inner in (
                called(instruction, "to_apply")
                + called(instruction, "calls")
                + called(instruction, "called_computations")
            ):
                stats.add(computation_stats(inner, computations, threshold))
        else:
            bytes_ = instruction_traffic(
                instruction, computation, computations, threshold
            )
            stats.traffic += bytes_
            stats.worst_traffic += bytes_
            stats.flops += matmul_flops(instruction, computation)
            if op == "fusion":
                fused = called(instruction, "calls")[0]
                stats.flops += nested_flops(fused, computations)
            kind = op.removesuffix("-start")
            if kind in COLLECTIVES:
                stats.collectives[kind] = stats.collectives.get(kind, 0) + 1
                size = sum(array_sizes(instruction.type))
                stats.collective_bytes += size
                stats.max_collective_bytes = max(stats.max_collective_bytes, size)
    return stats


def program_stats(hlo_text: str, threshold: float) -> Stats:
    """Stats of the entry computation of an optimized HLO module's text."""
    computations = parse_module(hlo_text)
    entry = next(c.name for c in computations.values() if c.entry)
    return computation_stats(entry, computations, threshold)


# ---------------------------------------------------------- largest array


def largest_array(hlo_text: str, exclude=()) -> tuple[int, str]:
    """The most elements of any one array in the module, and its type.

    Every instruction of every computation counts (parameters, loop carries,
    fused intermediates, the arrays in a tuple), whether or not it runs: a
    program holds no ``(N, V)`` array when this is below ``N·V``. Arrays
    whose dimensions are in ``exclude`` (tuples: the arguments' shapes, say)
    are left out.
    """
    skip = {tuple(shape) for shape in exclude}
    best, where = 0, ""
    for computation in parse_module(hlo_text).values():
        for instruction in computation.instructions:
            for dtype, dims, _ in ARRAY.findall(instruction.type):
                shape = tuple(int(d) for d in dims.split(",") if d)
                count = math.prod(shape)
                if count > best and shape not in skip:
                    best, where = count, f"{dtype}[{dims}]"
    return best, where
