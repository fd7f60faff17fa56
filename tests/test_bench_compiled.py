"""The HLO reading behind benchmarks/bench_compiled.py, on small programs.

Hand-written HLO in the TPU's and GPU's dialects (loop bounds in the
condition or in ``known_trip_count``, conditionals by index or by predicate)
and a CPU-compiled program: no TPU or GPU compiler needed.
"""

import sys

import jax
import jax.numpy as jnp
import pytest
from benchmark_modules import load_benchmark

hlo_stats = load_benchmark("hlo_stats")

MiB = 2**20
# A (1024, 1024) float32 "logits" array is 4 MiB; a row vector is 4 KiB.
THRESHOLD = 512 * 1024

LOOP = """
HloModule m, is_scheduled=true

%fused_exp (p0: f32[1024,1024]) -> f32[1024,1024] {
  %p0 = f32[1024,1024]{1,0} parameter(0)
  ROOT %e = f32[1024,1024]{1,0} exponential(%p0)
}

%fused_dot (a: f32[1024,256], b: f32[256,1024]) -> f32[1024,1024] {
  %a = f32[1024,256]{1,0} parameter(0)
  %b = f32[256,1024]{1,0} parameter(1)
  ROOT %d = f32[1024,1024]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (arg: (s32[], f32[1024,1024], f32[1024,256], f32[256,1024])) -> (s32[], f32[1024,1024], f32[1024,256], f32[256,1024]) {
  %arg = (s32[], f32[1024,1024]{1,0}, f32[1024,256]{1,0}, /*index=3*/f32[256,1024]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %x = f32[1024,1024]{1,0} get-tuple-element(%arg), index=1
  %a = f32[1024,256]{1,0} get-tuple-element(%arg), index=2
  %b = f32[256,1024]{1,0} get-tuple-element(%arg), index=3
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %e = f32[1024,1024]{1,0} fusion(%x), kind=kLoop, calls=%fused_exp
  %d = f32[1024,1024]{1,0} fusion(%a, %b), kind=kOutput, calls=%fused_dot
  ROOT %t = (s32[], f32[1024,1024]{1,0}, f32[1024,256]{1,0}, f32[256,1024]{1,0}) tuple(%next, %e, %a, %b)
}

%cond (arg: (s32[], f32[1024,1024], f32[1024,256], f32[256,1024])) -> pred[] {
  %arg = (s32[], f32[1024,1024]{1,0}, f32[1024,256]{1,0}, f32[256,1024]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %n = s32[] constant(6)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[1024,1024], a: f32[1024,256], b: f32[256,1024]) -> f32[1024,1024] {
  %x = f32[1024,1024]{1,0} parameter(0)
  %a = f32[1024,256]{1,0} parameter(1)
  %b = f32[256,1024]{1,0} parameter(2)
  %zero = s32[] constant(0)
  %init = (s32[], f32[1024,1024]{1,0}, f32[1024,256]{1,0}, f32[256,1024]{1,0}) tuple(%zero, %x, %a, %b)
  %w = (s32[], f32[1024,1024]{1,0}, f32[1024,256]{1,0}, f32[256,1024]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %out = f32[1024,1024]{1,0} get-tuple-element(%w), index=1
}
"""  # noqa: E501

# A GPU-style conditional: the fast branch (true) passes row vectors through,
# the fallback (false) reads the logits again; a fusion only gathers.
CONDITIONAL = """
HloModule m, is_scheduled=true

%fused_gather (p0: f32[1024,1024], p1: s32[1024,2]) -> f32[1024] {
  %p0 = f32[1024,1024]{1,0} parameter(0)
  %p1 = s32[1024,2]{1,0} parameter(1)
  %sel = f32[1024,1024]{1,0} negate(%p0)
  ROOT %g = f32[1024]{0} gather(%sel, %p1), offset_dims={}, collapsed_slice_dims={0,1}, start_index_map={0,1}, index_vector_dim=1, slice_sizes={1,1}
}

%fused_max (p0: f32[1024,1024]) -> f32[1024] {
  %p0 = f32[1024,1024]{1,0} parameter(0)
  %c = f32[] constant(-inf)
  ROOT %m = f32[1024]{0} reduce(%p0, %c), dimensions={1}, to_apply=%max
}

%max (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %m = f32[] maximum(%a, %b)
}

%fast (arg: (f32[1024])) -> f32[1024] {
  %arg = (f32[1024]{0}) parameter(0)
  ROOT %v = f32[1024]{0} get-tuple-element(%arg), index=0
}

%fallback (arg: (f32[1024,1024])) -> f32[1024] {
  %arg = (f32[1024,1024]{1,0}) parameter(0)
  %x = f32[1024,1024]{1,0} get-tuple-element(%arg), index=0
  ROOT %m = f32[1024]{0} fusion(%x), kind=kInput, calls=%fused_max
}

ENTRY %main (x: f32[1024,1024], idx: s32[1024,2], ok: pred[]) -> f32[1024] {
  %x = f32[1024,1024]{1,0} parameter(0)
  %idx = s32[1024,2]{1,0} parameter(1)
  %ok = pred[] parameter(2)
  %g = f32[1024]{0} fusion(%x, %idx), kind=kLoop, calls=%fused_gather
  %t = (f32[1024]{0}) tuple(%g)
  %f = (f32[1024,1024]{1,0}) tuple(%x)
  ROOT %r = f32[1024]{0} conditional(%ok, %t, %f), true_computation=%fast, false_computation=%fallback
}
"""  # noqa: E501


def test_parse_instruction_reads_tuples_comments_and_calls():
    line = (
        "  %w = (s32[], f32[8,4]{1,0:T(8,128)}, /*index=2*/bf16[4]{0}) "
        "while(%init), condition=%c, body=%b, backend_config={}"
    )
    instruction = hlo_stats.parse_instruction(line)
    assert (instruction.name, instruction.opcode) == ("w", "while")
    assert instruction.operands == ["init"]
    assert hlo_stats.array_sizes(instruction.type) == [4, 128, 8]
    assert hlo_stats.called(instruction, "body") == ["b"]


def test_on_chip_arrays_are_not_hbm_traffic():
    assert hlo_stats.array_sizes("f32[1024]{0:T(1024)S(1)}", hbm=True) == [0.0]
    assert hlo_stats.array_sizes("f32[1024]{0:T(1024)}", hbm=True) == [4096]


def test_loop_body_counts_trip_count_times():
    stats = hlo_stats.program_stats(LOOP, THRESHOLD)
    assert stats.loops == [6]
    # Per trip: the exp fusion reads and writes 4 MiB, the dot fusion reads
    # 1 + 1 MiB and writes 4 MiB (all above the threshold).
    assert stats.traffic == 6 * (8 + 6) * MiB
    # 2·M·N·K per trip; XLA's cost_analysis would count one trip.
    assert stats.flops == 6 * 2 * 1024 * 1024 * 256


def test_known_trip_count_wins_over_the_condition():
    text = LOOP.replace(
        "condition=%cond, body=%body",
        'condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}',
    )
    assert hlo_stats.program_stats(text, THRESHOLD).loops == [3]


# Under x64 a TPU loop's s64 counter is two u32 words (low, high) and
# ``counter < 6`` reads ``bitcast(high) < 0 or (high == 0 and low < 6)``.
SPLIT_COUNTER = """
%cond (arg: (u32[], u32[], f32[1024,1024])) -> pred[] {
  %arg = (u32[], u32[], f32[1024,1024]{1,0}) parameter(0)
  %zero = u32[] constant(0)
  %n = u32[] constant(6)
  %szero = s32[] constant(0)
  %high = u32[] get-tuple-element(%arg), index=1
  %high_zero = pred[] compare(%high, %zero), direction=EQ
  %low = u32[] get-tuple-element(%arg), index=0
  %low_below = pred[] compare(%low, %n), direction=LT
  %both = pred[] and(%high_zero, %low_below)
  %signed = s32[] bitcast-convert(%high)
  %negative = pred[] compare(%signed, %szero), direction=LT
  ROOT %go = pred[] or(%negative, %both)
}
"""


def _with_condition(condition: str) -> str:
    start = LOOP.index("%cond (")
    end = LOOP.index("ENTRY")
    return LOOP[:start] + condition.strip() + "\n\n" + LOOP[end:]


def test_a_counter_split_in_two_words_counts_its_low_words_bound():
    assert hlo_stats.program_stats(_with_condition(SPLIT_COUNTER), THRESHOLD).loops == [
        6
    ]


@pytest.mark.parametrize(
    "change",
    [
        ("bitcast-convert(%high)", "bitcast-convert(%low)"),  # not the high word
        ("(%high, %zero), direction=EQ", "(%high, %zero), direction=NE"),
        ("or(%negative, %both)", "and(%negative, %both)"),
    ],
)
def test_other_two_word_conditions_are_not_guessed(change):
    text = _with_condition(SPLIT_COUNTER.replace(*change))
    with pytest.raises(ValueError, match="loop condition"):
        hlo_stats.program_stats(text, THRESHOLD)


def test_bound_on_the_left_and_le():
    text = LOOP.replace("(%i, %n), direction=LT", "(%n, %i), direction=GE")
    assert hlo_stats.program_stats(text, THRESHOLD).loops == [7]


REDO = """
HloModule m, is_scheduled=true

%fused_exp (p0: f32[1024,1024]) -> f32[1024,1024] {
  %p0 = f32[1024,1024]{1,0} parameter(0)
  ROOT %e = f32[1024,1024]{1,0} exponential(%p0)
}

%body (arg: (f32[1024,1024], pred[], f32[1024,1024])) -> (f32[1024,1024], pred[], f32[1024,1024]) {
  %arg = (f32[1024,1024]{1,0}, pred[], f32[1024,1024]{1,0}) parameter(0)
  %x = f32[1024,1024]{1,0} get-tuple-element(%arg), index=2
  %e = f32[1024,1024]{1,0} fusion(%x), kind=kLoop, calls=%fused_exp
  %done = pred[] constant(false)
  ROOT %t = (f32[1024,1024]{1,0}, pred[], f32[1024,1024]{1,0}) tuple(%e, %done, %x)
}

%cond (arg: (f32[1024,1024], pred[], f32[1024,1024])) -> pred[] {
  %arg = (f32[1024,1024]{1,0}, pred[], f32[1024,1024]{1,0}) parameter(0)
  ROOT %todo = pred[] get-tuple-element(%arg), index=1
}

ENTRY %main (kept: f32[1024,1024], todo: pred[], x: f32[1024,1024]) -> f32[1024,1024] {
  %kept = f32[1024,1024]{1,0} parameter(0)
  %todo = pred[] parameter(1)
  %x = f32[1024,1024]{1,0} parameter(2)
  %init = (f32[1024,1024]{1,0}, pred[], f32[1024,1024]{1,0}) tuple(%kept, %todo, %x)
  %w = (f32[1024,1024]{1,0}, pred[], f32[1024,1024]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %out = f32[1024,1024]{1,0} get-tuple-element(%w), index=0
}
"""  # noqa: E501


def test_redo_loop_is_a_fallback():
    """A loop on a carried flag (jxent's in-place redo) runs no trip."""
    stats = hlo_stats.program_stats(REDO, THRESHOLD)
    assert stats.loops == [0]
    assert stats.traffic == 0
    # Redone, the exp fusion would read and write 4 MiB each.
    assert stats.worst_traffic == 8 * MiB


def test_fallback_branch_is_not_counted_and_gathers_read_what_they_pick():
    stats = hlo_stats.program_stats(CONDITIONAL, THRESHOLD)
    # The gather fusion reads 1024 picked floats (not the 4 MiB logits, though
    # an elementwise negate stands between); the fast branch moves nothing.
    assert stats.traffic == 1024 * 4
    # The fallback's row maximum would read the logits once more.
    assert stats.worst_traffic == 1024 * 4 + 4 * MiB


def test_a_tie_between_branches_goes_to_the_one_with_fewer_collectives():
    """On sharded logits no branch may move a large array (each device's part
    is under the threshold): the fallback's all-reduces are still left out."""
    text = CONDITIONAL.replace(
        "  ROOT %m = f32[1024]{0} fusion(%x), kind=kInput, calls=%fused_max\n}",
        "  %l = f32[1024]{0} fusion(%x), kind=kInput, calls=%fused_max\n"
        "  ROOT %m = f32[1024]{0} all-reduce(%l), replica_groups={}, to_apply=%max\n}",
    )
    # By index, the fallback first (as jax lowers lax.cond).
    text = text.replace(
        "%ok = pred[] parameter(2)", "%ok = s32[] parameter(2)"
    ).replace(
        "true_computation=%fast, false_computation=%fallback",
        "branch_computations={%fallback, %fast}",
    )
    assert "all-reduce" in text and "branch_computations" in text
    stats = hlo_stats.program_stats(text, 8 * MiB)
    assert stats.traffic == 0
    assert stats.collectives == {}


def test_threshold_leaves_small_arrays_out():
    assert hlo_stats.program_stats(LOOP, 8 * MiB).traffic == 0


def test_cpu_compiled_loop():
    def f(x, w):
        return jax.lax.fori_loop(0, 5, lambda i, a: a @ w + jnp.tanh(a), x).sum()

    x = jnp.ones((64, 32))
    text = jax.jit(f).lower(x, jnp.ones((32, 32))).compile().as_text()
    stats = hlo_stats.program_stats(text, threshold=1)
    assert stats.loops == [5]
    assert stats.flops == 5 * 2 * 64 * 32 * 32
    assert stats.collectives == {}


def test_unknown_target_exits_2_naming_the_extra(capsys):
    bench = load_benchmark("bench_compiled")
    assert bench.main(["--targets", "no-such-chip"]) == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and "unknown target" in message
    assert '".[aot]"' in message


@pytest.mark.parametrize(
    ("target", "module"), [("tpu-v5e", "libtpu"), ("h100", "jax_plugins.xla_cuda12")]
)
def test_missing_compiler_exits_2_naming_the_extra(target, module, capsys, monkeypatch):
    """As without the ``aot`` extra: importing the compiler fails."""
    bench = load_benchmark("bench_compiled")
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    assert bench.main(["--targets", target, "--quick"]) == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and '".[aot]"' in message
    assert module in message


def test_report_only_without_results_exits_2(tmp_path, capsys):
    bench = load_benchmark("bench_compiled")
    assert bench.main(["--report-only", "--out-dir", str(tmp_path)]) == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and "compiled_results.json" in message


def test_table_rows_pair_jxent_with_its_baseline():
    bench = load_benchmark("bench_compiled")
    common = {"kind": "cross_entropy", "shape": [8, 4], "dtype": "float32"}
    common |= {"target": "tpu-v5e", "fits": True, "collective_count": 0}
    ours = common | {"program": "jxent", "temp_bytes": 0, "passes": 5.0}
    ours |= {"traffic_bytes": 5.0, "flops": 0.0, "roofline_s": 5e-3}
    base = common | {"program": "optax", "temp_bytes": 0, "passes": 4.0}
    base |= {"traffic_bytes": 4.0, "flops": 0.0, "roofline_s": 4e-3}
    (row,) = bench.compare([ours, base])
    assert row["traffic_bytes"] == 1.25 and row["temp_bytes"] is None
    batches = [{"d": 4, "v": 8, "target": "tpu-v5e", "jxent": 64,
                "jxent_fails_at": None, "naive": 8, "naive_fails_at": 16}]  # fmt: skip
    meta = {"jax": "0", "libtpu": "0", "cuda_plugin": "0", "date": "today"}
    table = bench.markdown([row], batches, meta)
    assert "| 5.0 (4.0) |" in table and "| 1.25 |" in table
    assert "| ≥ 64 | 8 | ≥ 8× |" in table


# optax's gradient on a GPU: the one-hot term is a scatter-add into the
# softmax, in place.
SCATTER = """
HloModule m, is_scheduled=true

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%fused_scatter (p0: f32[1024,1024], p1: s32[1024,2], p2: f32[1024]) -> f32[1024,1024] {
  %p0 = f32[1024,1024]{1,0} parameter(0)
  %p1 = s32[1024,2]{1,0} parameter(1)
  %p2 = f32[1024]{0} parameter(2)
  ROOT %s = f32[1024,1024]{1,0} scatter(%p0, %p1, %p2), update_window_dims={}, inserted_window_dims={0,1}, scatter_dims_to_operand_dims={0,1}, index_vector_dim=1, to_apply=%add
}

ENTRY %main (x: f32[1024,1024], idx: s32[1024,2], u: f32[1024]) -> f32[1024,1024] {
  %x = f32[1024,1024]{1,0} parameter(0)
  %idx = s32[1024,2]{1,0} parameter(1)
  %u = f32[1024]{0} parameter(2)
  ROOT %r = f32[1024,1024]{1,0} fusion(%x, %idx, %u), kind=kInput, calls=%fused_scatter
}
"""  # noqa: E501


def test_in_place_scatter_moves_only_its_updates():
    assert hlo_stats.program_stats(SCATTER, THRESHOLD).traffic == 1024 * 4


def test_largest_array_looks_in_loops_fusions_and_tuples():
    # LOOP's largest arrays are the f32[1024,1024] carries and fused results.
    assert hlo_stats.largest_array(LOOP) == (1024 * 1024, "f32[1024,1024]")
    # A bigger array only inside a tuple type still counts.
    text = LOOP.replace(
        "%w = (s32[], f32[1024,1024]{1,0},", "%w = (s32[], f32[2048,1024]{1,0},"
    )
    assert hlo_stats.largest_array(text) == (2048 * 1024, "f32[2048,1024]")
    # Leaving the arguments' shapes out: the (1024, 256) and (256, 1024) only.
    shapes = [(2048, 1024), (1024, 1024)]
    assert hlo_stats.largest_array(LOOP, exclude=shapes) == (
        256 * 1024,
        "f32[1024,256]",
    )


def test_cpu_compiled_heads_hold_no_logits_sized_array(tmp_path):
    # The fused heads' programs hold at most a chunk of the logits; the naive
    # ones the whole (N, V) array (bench_compiled.py --heads, on the CPU).
    bench = load_benchmark("bench_compiled")
    n, d, v = 1024, 32, 8192  # the default chunk: 512 tokens (a 16 MiB tile)
    records = []
    for kind, name, f, args, logits in bench.head_programs(n, d, v, jnp.float32):
        compiled = bench.compile_program(f, args, jax.devices("cpu")[:1])
        record = {"kind": kind, "program": name, "fits": True}
        record |= bench.measure_head(compiled, args, logits, n, v)
        records.append(record)
        assert (record["largest_over_nv"] < 1) == (name == "jxent"), record
    rows = [dict(r, shape=[n, d, v], dtype="float32", target="cpu") for r in records]
    for row in rows:
        row["budget_bytes"] = bench.head_budget(n, d, v)
    bench.write_heads(rows, tmp_path)
    table = (tmp_path / "heads_results.md").read_text()
    assert table.count("| (1024, 32, 8192) | float32 | cpu |") == 6


def test_needed_temporaries_of_a_program_that_does_not_fit():
    bench = load_benchmark("bench_compiled")
    error = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required "
        "for HLO temporaries (19.85G) exceeds available HBM"
    )
    assert bench.needed_temp_bytes({"fits": False, "error": error}) == 19.85 * 2**30
    assert bench.needed_temp_bytes({"fits": False, "error": "other"}) is None
    assert bench.needed_temp_bytes({"fits": True, "temp_bytes": 5}) == 5


# A GPU program compiled on the device: the dots become cuBLASLt custom-calls
# (as the H200 printed them, shapes made small), operands without types, the
# contracting dimensions in the backend config, a workspace beside the result.
CUBLAS = """
HloModule m, is_scheduled=true

ENTRY %main (x.1: bf16[64,32], w.1: bf16[32,128], d.1: bf16[64,128]) -> (bf16[64,32], bf16[32,128]) {
  %x.1 = bf16[64,32]{1,0} parameter(0)
  %w.1 = bf16[32,128]{1,0} parameter(1)
  %d.1 = bf16[64,128]{1,0} parameter(2)
  %custom-call.0 = (bf16[64,128]{1,0}, s8[33554432]{0}) custom-call(%x.1, %w.1), custom_call_target="__cublas$lt$matmul", backend_config={"device_type":"DEVICE_TYPE_INVALID","gemm_backend_config":{"alpha_real":1,"beta":0,"dot_dimension_numbers":{"lhs_batch_dimensions":[],"lhs_contracting_dimensions":["1"],"rhs_batch_dimensions":[],"rhs_contracting_dimensions":["0"]},"epilogue":"DEFAULT"},"operation_queue_id":"0"}
  %custom-call.1 = (bf16[64,32]{1,0}, s8[33554432]{0}) custom-call(%d.1, %w.1), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_batch_dimensions":[],"lhs_contracting_dimensions":["1"],"rhs_batch_dimensions":[],"rhs_contracting_dimensions":["1"]}}}
  %custom-call.2 = (bf16[32,128]{1,0}, s8[33554432]{0}) custom-call(%x.1, %d.1), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_batch_dimensions":[],"lhs_contracting_dimensions":["0"],"rhs_batch_dimensions":[],"rhs_contracting_dimensions":["0"]}}}
  %other = f32[64,128]{1,0} custom-call(%d.1), custom_call_target="SomethingElse"
  %dx = bf16[64,32]{1,0} get-tuple-element(%custom-call.1), index=0
  %dw = bf16[32,128]{1,0} get-tuple-element(%custom-call.2), index=0
  ROOT %out = (bf16[64,32]{1,0}, bf16[32,128]{1,0}) tuple(%dx, %dw)
}
"""  # noqa: E501


def test_cublas_matmuls_count_their_flops():
    # logits, dx and dw: 2·M·N·K each, K read from the backend config (the
    # contracted dimension of dw's lhs is its first); other custom-calls none.
    stats = hlo_stats.program_stats(CUBLAS, THRESHOLD)
    assert stats.flops == 3 * 2 * 64 * 32 * 128


def test_on_chip_quick_run_on_the_cpu(tmp_path):
    # bench_on_chip.py on this CPU at tiny shapes: every program compiled,
    # read and timed, jxent's value and gradient checked against optax's.
    import json

    bench = load_benchmark("bench_on_chip")
    argv = ["--quick", "--parts", "cross_entropy", "--repeats", "3", "--no-torch"]
    assert bench.main([*argv, "--out-dir", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "on_chip.json").read_text())["records"]
    by_name = {(r["dtype"], r["program"]): r for r in records}
    dtypes, names = ("float32", "bfloat16"), ("jxent", "optax")
    assert set(by_name) == {(dtype, name) for dtype in dtypes for name in names}
    for dtype, tolerance in (("float32", 1e-6), ("bfloat16", 1e-2)):
        ours, optax = by_name[dtype, "jxent"], by_name[dtype, "optax"]
        assert ours["median_s"] > 0 and optax["median_s"] > 0
        assert ours["passes"] <= optax["passes"]
        assert ours["value_rel_diff"] <= tolerance
        assert ours["grad_rel_diffs"][0] <= tolerance
    table = (tmp_path / "on_chip.md").read_text()
    assert "| cross_entropy | 512×4096 | float32 | jxent |" in table
    assert "| cross_entropy | 512×4096 | bfloat16 | optax |" in table
