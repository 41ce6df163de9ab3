"""eva_jax.hlo_traffic: bytes a compiled loop moves per iteration, on programs compiled here
(XLA:CPU, and XLA:TPU ahead of time through libtpu) and on hand-written HLO for the rules
the CPU does not produce (TPU VMEM, nested fusions)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from eva_jax import aot, hlo_traffic
from eva_jax.models import Transformer, get_config, init_cache

MIB = 2 ** 20


def _only_loop(text):
  (loop,) = hlo_traffic.loop_traffic(text)
  return loop


def test_a_loop_charges_its_elementwise_work_and_in_place_updates_their_rows():
  """x + 1 over a 4 MiB carry reads and writes it every iteration; writing one 4 KiB row
  into a 256 KiB buffer (in place) costs the row, not the buffer; the trip count is read
  off the loop."""
  def run(x, buf):
    def body(i, carry):
      x, buf = carry
      buf = jax.lax.dynamic_update_slice_in_dim(buf, x[:1] * 2, i, axis=0)
      return x + 1.0, buf
    return jax.lax.fori_loop(0, 5, body, (x, buf))

  compiled = jax.jit(run, donate_argnums=(0, 1)).lower(
      jnp.zeros((1024, 1024)), jnp.zeros((64, 1024))).compile()
  loop = _only_loop(compiled.as_text())
  assert loop.trip_count == 5
  # Op names end with the jax op's (their prefix differs across jax versions).
  part = lambda op: sum(b for name, b in loop.by_op_name if name.endswith("/" + op))
  assert part("add") == 8 * MIB
  assert 8 * 1024 <= part("dynamic_update_slice") <= 16 * 1024
  # XLA:CPU also copies x once an iteration (its copy insertion): 8 MiB more, not hidden.
  assert 16 * MIB <= loop.bytes_per_iteration <= 17 * MIB


def test_a_row_sliced_out_of_a_big_operand_costs_the_row():
  def run(table, ids):
    def body(i, acc):
      row = jax.lax.dynamic_index_in_dim(table, ids[i], keepdims=False)
      return acc + row
    return jax.lax.fori_loop(0, 8, body, jnp.zeros(table.shape[1]))

  compiled = jax.jit(run).lower(jnp.zeros((4096, 1024)), jnp.zeros((8,), jnp.int32)).compile()
  loop = _only_loop(compiled.as_text())
  assert loop.trip_count == 8
  assert loop.bytes_per_iteration < 64 * 1024  # the table is 16 MiB


def test_nested_loops_multiply_by_their_trip_counts():
  def run(x):
    def outer(i, x):
      return jax.lax.fori_loop(0, 3, lambda j, y: y * 1.5, x) + 1.0
    return jax.lax.fori_loop(0, 2, outer, x)

  loop = _only_loop(jax.jit(run).lower(jnp.zeros((512, 1024))).compile().as_text())
  assert loop.trip_count == 2
  # three multiplies (read + write 2 MiB each) inside, at least one add outside
  assert 3 * 4 * MIB <= loop.bytes_per_iteration <= 6 * 4 * MIB


_TPU_STYLE = """HloModule m, entry_computation_layout={()->f32[]}

%inner (param_0.1: bf16[2,64,128]) -> bf16[2,64,128] {
  ROOT %param_0.1 = bf16[2,64,128]{2,1,0:T(8,128)(2,1)} parameter(0)
}

%fused_dot (param_0.2: bf16[2,64,128], param_1.2: bf16[8,64]) -> f32[8,128] {
  %param_0.2 = bf16[2,64,128]{2,1,0:T(8,128)(2,1)} parameter(0)
  %fusion.9 = bf16[2,64,128]{2,1,0:T(8,128)(2,1)} fusion(%param_0.2), kind=kLoop, calls=%inner
  %slice.1 = bf16[1,64,128]{2,1,0:T(8,128)(2,1)} slice(%fusion.9), slice={[0:1], [0:64], [0:128]}
  %bitcast.1 = bf16[64,128]{1,0:T(8,128)(2,1)} bitcast(%slice.1)
  %param_1.2 = bf16[8,64]{1,0:T(8,128)(2,1)S(1)} parameter(1)
  ROOT %dot.1 = f32[8,128]{1,0:T(8,128)} convolution(%param_1.2, %bitcast.1), dim_labels=bf_io->bf
}

%body (arg.1: (s32[], bf16[2,64,128], bf16[8,64], f32[8,128])) -> (s32[], bf16[2,64,128], bf16[8,64], f32[8,128]) {
  %arg.1 = (s32[]{:T(128)}, bf16[2,64,128]{2,1,0:T(8,128)(2,1)}, bf16[8,64]{1,0:T(8,128)(2,1)S(1)}, f32[8,128]{1,0:T(8,128)}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%arg.1), index=0
  %w = bf16[2,64,128]{2,1,0:T(8,128)(2,1)} get-tuple-element(%arg.1), index=1
  %x = bf16[8,64]{1,0:T(8,128)(2,1)S(1)} get-tuple-element(%arg.1), index=2
  %out = f32[8,128]{1,0:T(8,128)} fusion(%w, %x), kind=kOutput, calls=%fused_dot, metadata={op_name="jit(f)/while/body/layer_7/mlp/dot_general"}
  %one = s32[]{:T(128)} constant(1)
  %next = s32[]{:T(128)} add(%i, %one)
  ROOT %t = (s32[]{:T(128)}, bf16[2,64,128]{2,1,0:T(8,128)(2,1)}, bf16[8,64]{1,0:T(8,128)(2,1)S(1)}, f32[8,128]{1,0:T(8,128)}) tuple(%next, %w, %x, %out)
}

%cond (arg.2: (s32[], bf16[2,64,128], bf16[8,64], f32[8,128])) -> pred[] {
  %arg.2 = (s32[]{:T(128)}, bf16[2,64,128]{2,1,0:T(8,128)(2,1)}, bf16[8,64]{1,0:T(8,128)(2,1)S(1)}, f32[8,128]{1,0:T(8,128)}) parameter(0)
  %limit = s32[]{:T(128)} constant(7)
  %count = s32[]{:T(128)} get-tuple-element(%arg.2), index=0
  ROOT %lt = pred[]{:T(512)} compare(%count, %limit), direction=LT
}

ENTRY %main () -> f32[] {
  %zero = s32[]{:T(128)} constant(2)
  %start = s32[]{:T(128)} copy(%zero)
  %w0 = bf16[2,64,128]{2,1,0:T(8,128)(2,1)} constant({...})
  %x0 = bf16[8,64]{1,0:T(8,128)(2,1)S(1)} constant({...})
  %o0 = f32[8,128]{1,0:T(8,128)} constant({...})
  %init = (s32[]{:T(128)}, bf16[2,64,128]{2,1,0:T(8,128)(2,1)}, bf16[8,64]{1,0:T(8,128)(2,1)S(1)}, f32[8,128]{1,0:T(8,128)}) tuple(%start, %w0, %x0, %o0)
  %loop = (s32[]{:T(128)}, bf16[2,64,128]{2,1,0:T(8,128)(2,1)}, bf16[8,64]{1,0:T(8,128)(2,1)S(1)}, f32[8,128]{1,0:T(8,128)}) while(%init), condition=%cond, body=%body
  ROOT %r = f32[] constant(0)
}
"""


def test_tpu_rules_vmem_nested_fusions_and_a_fori_loop_without_a_known_trip_count():
  """What XLA:TPU writes: operands in VMEM (`S(1)`) move no HBM bytes; a parameter passed
  through a nested fusion and then sliced costs the slice; the trip count (7 - 2) comes from
  the condition and the counter's constant start."""
  loop = _only_loop(_TPU_STYLE)
  assert loop.trip_count == 5
  half_weight, output = 64 * 128 * 2, 8 * 128 * 4
  assert loop.by_op_name[0] == ("layer_N/mlp/dot_general", half_weight + output)
  assert loop.bytes_per_iteration == half_weight + output + 12  # and the counter's add


def test_shape_bytes_reads_tuples_sub_byte_types_and_vmem():
  assert hlo_traffic.shape_bytes("(bf16[2,3]{1,0}, s4[8]{0}, pred[5]{0})") == 12 + 4 + 5
  assert hlo_traffic.shape_bytes("f32[4,4]{1,0:T(8,128)S(1)}") == 0
  assert hlo_traffic.shape_bytes("s32[]") == 4


def test_the_tpu_decode_step_writes_no_float32_copy_of_the_cache():
  """Compiled for a TPU chip (libtpu, no TPU), a decode step's attention runs as matmuls
  over the bfloat16 cache: no float32 array of the cache's shape is made (the multiply-
  reduce form, which the CPU and GPU keep, made XLA:TPU write one per layer, per step)."""
  cfg = get_config("tiny", dtype="bfloat16", param_dtype="bfloat16")
  model = Transformer(cfg)
  device = aot.topology_devices(aot.parse_topology("v5e-1"))[0]
  mesh = jax.sharding.Mesh(np.array([device]), ("x",))
  replicated = NamedSharding(mesh, P())
  rows, slots = 8, 256
  ids = jnp.ones((rows, 1), jnp.int32)
  abstract = lambda tree: jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), tree)
  params = abstract(jax.eval_shape(model.init, jax.random.key(0), ids)["params"])
  cache = abstract(jax.eval_shape(lambda: init_cache(cfg, rows, slots, jnp.bfloat16)))

  def step(params, cache, ids, index):
    return model.apply({"params": params}, ids, cache=cache, cache_index=index,
                       attention_mask=jnp.ones((rows, slots), bool),
                       positions=jnp.broadcast_to(index, (rows, 1)))

  hlo = jax.jit(step).lower(params, cache, abstract(ids),
                            jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
                            ).compile().as_text()
  cache_dims = sorted((rows, slots, cfg.num_kv_heads, cfg.head_dim))
  float32_caches = [dims for dims in re.findall(r"\bf32\[([\d,]+)\]", hlo)
                    if sorted(int(d) for d in dims.split(",")) == cache_dims]
  assert not float32_caches
  assert re.search(rf"\bbf16\[{rows},{slots},{cfg.num_kv_heads},{cfg.head_dim}\]", hlo)


def test_loops_without_a_body_or_an_entry_are_reported():
  with pytest.raises(ValueError, match="no ENTRY"):
    hlo_traffic.loop_traffic("HloModule m\n")


def test_the_sampler_benchmark_reports_a_decode_steps_bytes(benchmark_script):
  """Compile-only, on the CPU: the decode step's bytes, their largest parts, and the roofline
  fraction they allow (the roofline's own bytes are some of them, so at most 1)."""
  result = benchmark_script("sampler").main([
      "--config", "tiny", "--batch", "8", "--prompt_len", "16", "--max_new_tokens", "16",
      "--aot_compile_only", "--top_p_bench_methods", "threshold"])
  (compiled,) = result["compiled"]
  assert compiled["hlo_decode_step_gb"] > compiled["roofline_bytes_per_step_gb"] > 0
  assert 0 < compiled["hlo_roofline_fraction_bound"] < 1
  parts = [gb for _, gb in compiled["hlo_decode_step_top_gb"]]
  assert parts and parts == sorted(parts, reverse=True)
  assert sum(parts) <= compiled["hlo_decode_step_gb"] * 1.001


_GATHER_THROUGH_ELEMENTWISE = """HloModule m, entry_computation_layout={()->f32[]}

%fused_pick (param_0.1: f32[64,4096], param_1.1: s32[64,2]) -> f32[64] {
  %param_0.1 = f32[64,4096]{1,0} parameter(0)
  %c = f32[] constant(30)
  %b = f32[64,4096]{1,0} broadcast(%c), dimensions={}
  %scaled = f32[64,4096]{1,0} multiply(%param_0.1, %b)
  %param_1.1 = s32[64,2]{1,0} parameter(1)
  %g = f32[64,1,1]{2,1,0} gather(%scaled, %param_1.1), offset_dims={1,2}, collapsed_slice_dims={}, start_index_map={0,1}, index_vector_dim=1, slice_sizes={1,1}
  ROOT %r = f32[64]{0} bitcast(%g)
}

%fused_sum (param_0.2: f32[64,4096]) -> f32[64] {
  %param_0.2 = f32[64,4096]{1,0} parameter(0)
  %c2 = f32[] constant(30)
  %b2 = f32[64,4096]{1,0} broadcast(%c2), dimensions={}
  %scaled2 = f32[64,4096]{1,0} multiply(%param_0.2, %b2)
  %zero = f32[] constant(0)
  ROOT %s = f32[64]{0} reduce(%scaled2, %zero), dimensions={1}, to_apply=%add
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%body (arg.1: (s32[], f32[64,4096], s32[64,2], f32[64], f32[64])) -> (s32[], f32[64,4096], s32[64,2], f32[64], f32[64]) {
  %arg.1 = (s32[], f32[64,4096]{1,0}, s32[64,2]{1,0}, f32[64]{0}, f32[64]{0}) parameter(0)
  %i = s32[] get-tuple-element(%arg.1), index=0
  %x = f32[64,4096]{1,0} get-tuple-element(%arg.1), index=1
  %ids = s32[64,2]{1,0} get-tuple-element(%arg.1), index=2
  %picked = f32[64]{0} fusion(%x, %ids), kind=kLoop, calls=%fused_pick, metadata={op_name="jit(f)/while/body/pick"}
  %summed = f32[64]{0} fusion(%x), kind=kInput, calls=%fused_sum, metadata={op_name="jit(f)/while/body/sum"}
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[64,4096]{1,0}, s32[64,2]{1,0}, f32[64]{0}, f32[64]{0}) tuple(%next, %x, %ids, %picked, %summed)
}

%cond (arg.2: (s32[], f32[64,4096], s32[64,2], f32[64], f32[64])) -> pred[] {
  %arg.2 = (s32[], f32[64,4096]{1,0}, s32[64,2]{1,0}, f32[64]{0}, f32[64]{0}) parameter(0)
  %limit = s32[] constant(3)
  %count = s32[] get-tuple-element(%arg.2), index=0
  ROOT %lt = pred[] compare(%count, %limit), direction=LT
}

ENTRY %main () -> f32[] {
  %start = s32[] constant(0)
  %x0 = f32[64,4096]{1,0} constant({...})
  %ids0 = s32[64,2]{1,0} constant({...})
  %p0 = f32[64]{0} constant({...})
  %init = (s32[], f32[64,4096]{1,0}, s32[64,2]{1,0}, f32[64]{0}, f32[64]{0}) tuple(%start, %x0, %ids0, %p0, %p0)
  %loop = (s32[], f32[64,4096]{1,0}, s32[64,2]{1,0}, f32[64]{0}, f32[64]{0}) while(%init), condition=%cond, body=%body
  ROOT %r = f32[] constant(0)
}
"""


def test_a_gather_through_elementwise_ops_costs_what_it_gathers():
  """One logit a row gathered from the logits times a constant (the sampler's picked token,
  with the soft-cap's multiplication fused in) reads 64 floats, not the [64, 4096] operand;
  a reduction through the same multiplication reads all of it."""
  loop = _only_loop(_GATHER_THROUGH_ELEMENTWISE)
  parts = dict(loop.by_op_name)
  ids, out = 64 * 2 * 4, 64 * 4
  assert parts["pick"] == 64 * 4 + ids + out
  assert parts["sum"] == 64 * 4096 * 4 + out
