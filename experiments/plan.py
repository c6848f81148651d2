"""Ahead-of-time planner: compile the full training step for a target mesh on simulated CPU devices.

    python experiments/plan.py --model flash --mesh fsdp=16,expert=16 --seq 8192 --batch 256 --hbm-gib 80

Nothing is allocated: the trainer's own program (`longcat_jax.train.trainer.build`: the model on
its mesh placement, the train state and the batch as ShapeDtypeStructs carrying the shardings of
the logical-axis table, the jitted step) is lowered (`Program.lower`) and compiled for as many CPU
devices as the mesh has (`jax_num_cpu_devices`). Prints, per device: parameters and optimizer state (from the compiled
program's input shardings), temporaries (activations, gradients, gathered weights: XLA's buffer
assignment, `compiled.memory_analysis()`), an analytic estimate beside them, the collectives in
the step, and whether it fits in `--hbm-gib`.

`--target tpu:TOPOLOGY` (e.g. tpu:v5p-256, tpu:v5p:4x4x8, tpu:v6e-256,slices=2; needs libtpu,
`pip install -e .[tpu]`) compiles the same step with the TPU compiler for that topology's devices
instead, TPU kernels chosen (kernels auto:tpu), and adds the TPU report of
longcat_jax/parallel/tpu_target.py: memory per device against the chip's HBM, cost analysis,
a roofline estimate of the step time and MFU, the collectives and what the schedule overlaps.

Caveat (CPU target): XLA:CPU compiles the CPU variants of the kernels (blocked grouped matmul, chunked XLA
attention, the `gather` expert-parallel transport); a GPU program differs in its temporaries.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GiB = 2**30


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="flash", help="model preset (longcat_jax.config)")
  p.add_argument("--mesh", default="fsdp=16,expert=16", help="axis=size,... over data,fsdp,expert,tensor,context")
  p.add_argument("--devices", type=int, default=0, help="device count when an axis is -1")
  p.add_argument("--seq", type=int, default=8192)
  p.add_argument("--batch", type=int, default=256, help="global batch (sequences)")
  p.add_argument("--hbm-gib", type=float, default=None, help="default 80; a TPU target's chip HBM")
  p.add_argument("--target", default="cpu",
                 help="cpu (XLA:CPU, simulated devices) | tpu:TOPOLOGY (the TPU compiler via libtpu)")
  p.add_argument("--remat", default="full", help="none | full | save_dots | save_moe")
  p.add_argument("--dtype", default="bfloat16", help="activation dtype (weights stay param_dtype)")
  p.add_argument("--param-dtype", default="float32")
  p.add_argument("--ep-transport", default="auto", help="auto | gather | ragged")
  p.add_argument("--ep-chunk-tokens", type=int, default=256,
                 help="MoE dispatch chunk per device (bounds the dropless worst-case buffers; 0 = all)")
  p.add_argument("--grad-accum", type=int, default=1)
  p.add_argument("--nonfinite", default="", help="override the trainer's nonfinite policy (skip | stop)")
  p.add_argument("--layers", type=int, default=0, help="override num_layers (0 = preset)")
  p.add_argument("--mtp-heads", type=int, default=-1, help="override mtp_num_heads (-1 = preset)")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="model config override, repeatable; VALUE is a Python literal or None "
                      "(e.g. --set ngram_embedding=None --set sparse_attention=None)")
  p.add_argument("--fsdp-context", action="store_true",
                 help="table edit: weights shard over `context` too (every weight rule with fsdp)")
  p.add_argument("--hlo-out", default="", help="write the compiled HLO text here")
  p.add_argument("--no-compile", action="store_true",
                 help="layout check only: state per device from the table's shardings + the analytic "
                      "column (no lowering, no compile)")
  p.add_argument("--fast-codegen", action="store_true",
                 help="XLA:CPU machine code at -O0 (the program is never run; HLO passes and buffer "
                      "assignment, i.e. every figure printed, are unchanged)")
  return p.parse_args(argv)


def main(argv=None, figures=None):
  """Prints the plan; returns 0 if it fits. `figures` (a dict) receives the per-device bytes."""
  args = parse_args(argv)
  from longcat_jax.parallel import sharding
  sizes = sharding.parse_mesh(args.mesh)
  target = None
  if args.target.startswith("tpu:"):
    from longcat_jax.parallel import tpu_target
    target = tpu_target.Target.parse(args.target[len("tpu:"):])
    args.devices = args.devices or target.num_devices
  elif args.target != "cpu":
    raise SystemExit(f"--target {args.target!r}: want cpu or tpu:TOPOLOGY")
  if args.hbm_gib is None:
    args.hbm_gib = target.chip.hbm_bytes / GiB if target else 80.0
  n_dev = args.devices or math.prod(v for v in sizes.values())
  if n_dev <= 0:
    raise SystemExit("--mesh has a -1 axis: give --devices")
  sizes = sharding.resolve_mesh_shape(sizes, n_dev)

  import jax
  from jax._src import xla_bridge
  if not xla_bridge.backends_are_initialized():   # as a script; under pytest JAX is already up
    if args.fast_codegen:  # read when the backend starts
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                                 " --xla_llvm_disable_expensive_passes=true").strip()
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 1 if target else n_dev)
  elif args.fast_codegen:
    print("--fast-codegen ignored: the JAX backend is already initialised", file=sys.stderr)
  devices = target.devices() if target else jax.devices()[:n_dev]
  if len(devices) < n_dev:
    raise SystemExit(f"the mesh needs {n_dev} devices; JAX has {len(jax.devices())}")
  import jax.numpy as jnp
  import longcat_jax
  from longcat_jax import train
  from longcat_jax.parallel import expert_parallel
  from longcat_jax.train import trainer
  from experiments import common

  t0 = time.time()
  config = train.get_train_config(args.model, batch_size=args.batch, seq_len=args.seq,
                                  grad_accum_steps=args.grad_accum, ep_transport=args.ep_transport,
                                  ep_chunk_tokens=args.ep_chunk_tokens)
  m = config.model
  m.remat, m.dtype, m.param_dtype = args.remat, args.dtype, args.param_dtype
  if args.nonfinite:
    config.nonfinite = args.nonfinite
  if args.layers:
    m.num_layers = args.layers
  if args.mtp_heads >= 0:
    m.mtp_num_heads = args.mtp_heads
  if target and m.kernels == "auto":
    m.kernels = "auto:tpu"  # the TPU kernels, traced on this CPU host
  common.set_fields(m, args.set)
  config.loss.balance_groups = sizes["expert"] if m.num_ffn_experts % sizes["expert"] == 0 else 1
  config.mesh = ",".join(f"{k}={v}" for k, v in sizes.items())
  mesh = tpu_target.make_mesh(target, sizes, devices) if target else trainer.make_mesh(config, devices=devices)
  table = fsdp_over(sharding.LOGICAL_AXIS_RULES, "context") if args.fsdp_context else sharding.LOGICAL_AXIS_RULES
  rules = trainer.make_rules(config, mesh, table)
  edits = [f"{l} -> {a}" for (l, a), (_, b) in zip(rules, sharding.LOGICAL_AXIS_RULES) if a != b]
  counts = longcat_jax.count_params(m)

  # The trainer's own program: abstract state and batch with the table's shardings, the step.
  program = trainer.build(config, mesh, rules=rules)
  state_shape, state_sh, bsh = program.abstract_state, program.state_shardings, program.batch_sharding
  # Fail on big replicated weights; small ones (norm scales: L x hidden float32, 1.2 MiB for
  # longcat2) are replicated by design and only listed.
  sharding.check_replicated(state_sh.params, state_shape.params, threshold_bytes=16 * 2**20)
  small_rep = sharding.replicated_params(state_sh.params, state_shape.params)
  batch = program.abstract_batch()
  t_setup = time.time() - t0
  if args.no_compile:
    return _layout_only(args, m, sizes, n_dev, counts, state_shape, state_sh, bsh, t_setup)

  t1 = time.time()
  lowered = program.lower()
  t_lower = time.time() - t1
  print(f"   lowered in {t_lower:.0f}s; compiling for {n_dev} devices ...", file=sys.stderr, flush=True)
  t1 = time.time()
  compiled = lowered.compile()
  t_compile = time.time() - t1

  ma = compiled.memory_analysis()
  hlo = compiled.as_text()
  if args.hlo_out:
    with open(args.hlo_out, "w") as f:
      f.write(hlo)

  # Per-device bytes of the state, from the compiled program's input shardings.
  in_sh = compiled.input_shardings[0][0]
  def per_device(tree, shardings):
    total = 0
    for x, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
      shard = sh.shard_shape(x.shape)
      total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
    return total
  params_b = per_device(state_shape.params, in_sh.params)
  opt_b = per_device(state_shape.opt_state, in_sh.opt_state)
  other_b = per_device((state_shape.step, state_shape.expert_bias, state_shape.rng),
                       (in_sh.step, in_sh.expert_bias, in_sh.rng))
  batch_b = per_device(batch, compiled.input_shardings[0][1])
  temp_b = ma.temp_size_in_bytes
  args_b = ma.argument_size_in_bytes
  out_b, alias_b = ma.output_size_in_bytes, ma.alias_size_in_bytes
  total_b = args_b + out_b - alias_b + temp_b + ma.generated_code_size_in_bytes

  length_split = math.prod(sizes[a] for a in jax.tree.leaves(tuple(bsh.spec)[1:2]) if a)
  est = analytic_estimate(m, sizes, args, params_b, counts, length_split)

  tokens_per_dev = args.batch * args.seq // math.prod(sizes[a] for a in ("data", "fsdp", "expert", "context"))
  cp_text = f", each sequence split {length_split} ways (context parallel)" if length_split > 1 else ""
  print(f"== plan: {args.model} ({counts.total / 1e9:.1f}B params, {m.num_layers} layers) on "
        f"{n_dev} devices, mesh {mesh_str(sizes)}; batch {args.batch} x seq {args.seq} "
        f"({tokens_per_dev} tokens/device{cp_text}); remat={args.remat}, dtype={args.dtype}, "
        f"params {args.param_dtype}; EP transport "
        f"{expert_parallel.choose_transport(args.ep_transport, mesh)}"
        f", chunk {args.ep_chunk_tokens or 'off'}")
  if small_rep:
    print(f"   replicated (< 16 MiB each, by design): {len(small_rep)} leaves, "
          f"{sum(r.bytes for r in small_rep) / 2**20:.1f} MiB")
  if edits:
    print(f"   table edits ({'weights over context; ' if args.fsdp_context else ''}batch {args.batch} "
          f"over the batch axes): {'; '.join(edits)}")
  print(f"   setup {t_setup:.0f}s, lower {t_lower:.0f}s, compile {t_compile:.0f}s"
        + (f" (XLA_FLAGS={os.environ['XLA_FLAGS']})" if os.environ.get("XLA_FLAGS") else ""))
  print(f"{'per device':<34}{'compiled':>12}{'analytic':>12}")
  row = lambda name, a, b: print(f"  {name:<32}{fmt(a):>12}{fmt(b):>12}")
  row("parameters", params_b, est["params"])
  row("optimizer state", opt_b, est["opt"])
  row("batch + step/rng/expert_bias", batch_b + other_b, est["batch"])
  row("temporaries (acts, grads, ...)", temp_b, est["temp"])
  print(f"    of which analytic: gradients {fmt(est['grads'])}, saved layer inputs {fmt(est['saved'])}, "
        f"one layer's working set {fmt(est['layer'])}, gathered weights {fmt(est['gathered'])}"
        + (f", gathered compressed KV {fmt(est['cp'])}" if length_split > 1 else ""))
  row("outputs not aliased to inputs", out_b - alias_b, 0)
  row("generated code", ma.generated_code_size_in_bytes, 0)
  row("TOTAL", total_b, est["total"])
  fits = total_b <= args.hbm_gib * GiB
  if figures is not None:
    figures.update(params=params_b, opt=opt_b, temp=temp_b, total=total_b, length_split=length_split,
                   analytic=est, fits=fits, hlo=hlo)
  print(f"  fits in {args.hbm_gib:g} GiB HBM: {'YES' if fits else 'NO'} "
        f"({100 * total_b / (args.hbm_gib * GiB):.0f}% used)")
  print("collectives in the compiled step (HLO ops; an op inside a loop body counted once; "
        "bytes = result size):")
  for kind, cats in sorted(collectives(hlo).items()):
    n, b = sum(c[0] for c in cats.values()), sum(c[1] for c in cats.values())
    top = sorted(cats.items(), key=lambda kv: -kv[1][1])[:3]
    print(f"  {kind:<20}{n:>4} ops {fmt(b):>11}   " +
          ", ".join(f"{cat} {c[0]} ({fmt(c[1])})" for cat, c in top))
  if target:
    from longcat_jax.train import metrics
    flops = metrics.training_flops_per_token(m, args.seq) * args.batch * args.seq / n_dev
    tpu_plan = tpu_target.analyze(compiled, target, model_flops=flops)
    print(tpu_target.format_plan(tpu_plan))
    if figures is not None:
      figures["tpu_plan"] = tpu_plan
  return 0 if fits else 1


def _layout_only(args, m, sizes, n_dev, counts, state_shape, state_sh, bsh, t_setup):
  """--no-compile: the state per device from its shardings (exact) and the analytic estimate."""
  import jax
  import jax.numpy as jnp
  per_device = lambda tree, shs: sum(math.prod(sh.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
                                     for x, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shs)))
  params_b = per_device(state_shape.params, state_sh.params)
  opt_b = per_device(state_shape.opt_state, state_sh.opt_state)
  length_split = math.prod(sizes[a] for a in jax.tree.leaves(tuple(bsh.spec)[1:2]) if a)
  est = analytic_estimate(m, sizes, args, params_b, counts, length_split)
  print(f"== layout only (NOT compiled): {args.model} ({counts.total / 1e9:.1f}B params) on {n_dev} devices, "
        f"mesh {mesh_str(sizes)}; batch {args.batch} x seq {args.seq}, each sequence split {length_split} ways; "
        f"setup {t_setup:.0f}s")
  print(f"  parameters {fmt(params_b)}, optimizer state {fmt(opt_b)} (from the shardings); analytic: "
        f"temporaries {fmt(est['temp'])} (gradients {fmt(est['grads'])}, saved layer inputs "
        f"{fmt(est['saved'])}, one layer {fmt(est['layer'])}, gathered weights {fmt(est['gathered'])}, "
        f"gathered compressed KV {fmt(est['cp'])}), TOTAL {fmt(est['total'])} of {args.hbm_gib:g} GiB")
  return 0


def fsdp_over(rules, axis: str):
  """The table with `axis` added after `fsdp` in every weight rule that has it (MaxText's layout:
  the devices that split a sequence also split the weights); `batch` is left alone."""
  flat = lambda a: () if a is None else ((a,) if isinstance(a, str) else tuple(a))
  out = []
  for logical, axes in rules:
    a = flat(axes)
    if logical != "batch" and "fsdp" in a and axis not in a:
      i = a.index("fsdp") + 1
      axes = a[:i] + (axis,) + a[i:]
    out.append((logical, axes))
  return tuple(out)


def mesh_str(sizes):
  return ",".join(f"{k}={v}" for k, v in sizes.items() if v > 1) or "1 device"


def fmt(b: float) -> str:
  return f"{b / GiB:.2f} GiB"


def analytic_estimate(m, sizes, args, params_b, counts, length_split=1):
  """Back-of-envelope per-device memory (bytes) for AdamW + full remat; see docs/SCALING.md.
  Not modelled: the indexer and sparse attention, MTP heads, n-gram lookups."""
  import jax.numpy as jnp
  act = jnp.dtype(args.dtype).itemsize
  pbytes = jnp.dtype(args.param_dtype).itemsize
  tok_axes = sizes["data"] * sizes["fsdp"] * sizes["expert"] * sizes["context"]
  t = args.batch * args.seq // tok_axes // max(args.grad_accum, 1)  # tokens per device per microbatch
  h, L = m.hidden_size, m.num_layers
  params = params_b
  opt = 2 * params_b * 4 // pbytes            # Adam mu, nu in float32
  grads = params_b                            # float32 gradients, sharded like the params
  saved = L * t * h * act                     # remat full: each layer's input
  # One layer recomputed + differentiated: attention (q, k, v, out and grads, both blocks),
  # dense MLPs, MoE dispatch buffers for one chunk (worst case rows E*T*min(k, n_local)).
  heads, qk, vd = m.num_heads, m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
  attn = t * heads * (2 * qk + 2 * vd) * act * 3
  mlp = t * m.ffn_size * 3 * act * 2
  e = sizes["expert"]
  n_loc = m.num_ffn_experts // e if m.num_ffn_experts else 1
  chunk = min(args.ep_chunk_tokens or t, t)
  rows = e * chunk * min(m.top_k, n_loc)
  moe = rows * (2 * h + 3 * m.expert_ffn_size) * act * 2 + e * chunk * h * act * 2
  layer = attn + mlp + moe + 8 * t * h * act
  # FSDP: one layer's weights gathered (compute dtype) for the forward and again for the backward:
  # its dense weights and its local experts.
  dense_layer = (counts.non_expert - counts.embedding - counts.mtp) / max(L, 1)
  expert_layer = counts.expert / max(L, 1) / max(e, 1)
  gathered = 2 * (dense_layer + expert_layer) * act / sizes["tensor"]
  # Context parallelism (the sequence split over `length` axes): an attention block gathers the
  # whole sequence's compressed KV (keys [latent | rope], values latent) and differentiates it in
  # float32; the MTP heads (not rematerialised) keep theirs until the backward.
  cp = 0
  if length_split > 1:
    kv_tok = max(t * length_split // args.seq, 1) * args.seq
    cp = kv_tok * (2 * m.kv_lora_rank + m.qk_rope_head_dim) * (act * (1 + (m.mtp_num_heads or 0)) + 4)
  # Output projection: chunked cross-entropy (the trainer's default 16M logits per chunk).
  logits = 16 * 2**20 * 4 * 2
  temp = grads + saved + layer + gathered + logits + cp
  batch = 5 * t * 4 * max(args.grad_accum, 1)
  return dict(params=params, opt=opt, grads=grads, saved=saved, layer=layer, gathered=gathered,
              cp=cp, temp=temp, batch=batch, total=params + opt + temp + batch)


_COLL = re.compile(r"=\s*(\(?[a-z0-9\[\]{}, :_]*\)?)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|"
                   r"ragged-all-to-all|collective-permute)(-start)?\(")
_SHAPE = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "f64": 8, "s64": 8}


_CATEGORIES = (("moe/shard_map", "MoE dispatch/combine"), ("/moe/", "router"), ("attn", "attention"),
               ("mlp", "dense MLP"), ("embed", "embedding"), ("dynamic_index_in_dim", "layer weights"),
               ("dynamic_slice", "layer weights"), ("dynamic_update", "layer gradients"))


def collectives(hlo: str):
  """{kind: {category: [count, result bytes]}} over the compiled HLO text; the category comes
  from the op's source location (op_name)."""
  out = collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0]))
  for line in hlo.splitlines():
    mt = _COLL.search(line)
    if not mt:
      continue
    kind = mt.group(2) + ("-start" if mt.group(3) else "")
    b = sum(_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
            for dt, dims in _SHAPE.findall(mt.group(1)))
    name = re.search(r'op_name="([^"]*)"', line)
    name = name.group(1) if name else ""
    cat = next((c for key, c in _CATEGORIES if key in name), "other")
    out[kind][cat][0] += 1
    out[kind][cat][1] += b
  return out


if __name__ == "__main__":
  sys.exit(main())
