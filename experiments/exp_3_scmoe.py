"""Experiment 3: shortcut-connected MoE (ScMoE) vs a conventional MoE layer (spec section 1).

Claim: feeding the MoE from the first attention block (its output joins at the end of the layer)
costs no quality at equal compute, and it gives the MoE's dispatch/combine communication the rest
of the layer (mlp_0, attn_1, mlp_1) to overlap with.

The conventional layer has the same blocks, parameters and FLOPs; only the MoE's input moves:

    ScMoE (LongcatForCausalLM)                   conventional (this file)
    h = h + attn_0(norm(h))                      h = h + attn_0(norm(h))
    x = norm(h); moe_out = moe(x)                h = h + mlp_0(norm(h))
    h = h + mlp_0(x)                             h = h + attn_1(norm(h))
    h = h + attn_1(norm(h))                      x = norm(h)
    h = h + mlp_1(norm(h)) + moe_out             h = h + mlp_1(x) + moe(x)

Parts:
  quality   both layers trained with the trainer at equal compute (same init, data, steps; `seeds`);
            held-out losses compared per seed (paired). "No quality loss" holds here if the mean
            paired gap (conventional - ScMoE) is above -2 standard errors.
  overlap   (a subprocess with 8 simulated CPU devices, mesh expert=8)
            - the jaxpr of one layer's forward pass under the expert-parallel mesh: which matmul
              FLOPs depend neither on nor feed the MoE's dispatch/combine collectives, i.e. the
              compute a scheduler may run while they are in flight (the overlap window), for the
              experiment's model and for LongCat-Flash's dimensions (tracing only, no compile);
            - the compiled training step (XLA:CPU): collectives by kind, and whether any is
              asynchronous (a `-start`/`-done` pair that lets compute run in between).

    python experiments/exp_3_scmoe.py                 # small (CPU, minutes)
    python experiments/exp_3_scmoe.py --scale medium  # the `small` preset, longer

Writes results/exp3_scmoe.{png,json}.
"""

import contextlib
import json
import math
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from experiments import common  # noqa: E402

SCALES = {
    "small": dict(preset="tiny", steps=300, batch=16, seq=128, seeds=(0, 1, 2), eval_batches=8),
    "medium": dict(preset="small", steps=2000, batch=32, seq=512, seeds=(0, 1, 2), eval_batches=16),
    "smoke": dict(preset="tiny", steps=3, batch=8, seq=32, seeds=(0,), eval_batches=1),
}
# The MoE's dispatch/combine collectives (the expert-parallel transports of parallel/expert_parallel.py).
MOE_COLLECTIVES = ("all_gather", "reduce_scatter", "psum_scatter", "all_to_all", "ragged_all_to_all")


# ----------------------------------------------------------------------------------------------
# The conventional layer.


def conventional_layer_cls():
  import flax.linen as nn
  from longcat_jax.model import transformer
  from longcat_jax.model.attention import MLA
  from longcat_jax.model.layers import DenseMLP, RMSNorm
  from longcat_jax.model.moe import MoE

  class ConventionalMoELayer(transformer.ScMoELayer):
    """The ScMoE layer's blocks with the MoE reading the state after attn_1 (beside mlp_1)."""

    @nn.compact
    def __call__(self, h, cos, sin, segment_ids, cache_lengths=None):
      c, p = self.config, self.placement
      if self.cache_mode is not None or c.get("sparse_attention") is not None:
        raise NotImplementedError("ConventionalMoELayer is a training-only baseline (no cache, dense attention)")
      norm = lambda name: RMSNorm(c, c.rms_norm_eps, name=name)
      h = p.constrain(h, ("batch", "length", "embed"))
      h = h + MLA(c, p, name="attn_0")(norm("input_norm_0")(h), cos, sin, segment_ids)
      h = h + DenseMLP(c, p, name="mlp_0")(norm("post_attn_norm_0")(h))
      h = h + MLA(c, p, name="attn_1")(norm("input_norm_1")(h), cos, sin, segment_ids)
      x = norm("post_attn_norm_1")(h)
      h = h + DenseMLP(c, p, name="mlp_1")(x) + MoE(c, p, name="moe")(x)
      return h, None

  return ConventionalMoELayer


@contextlib.contextmanager
def layer_variant(variant: str):
  """Within the block, `LongcatForCausalLM` builds its decoder from the given layer variant.

  The model has no switch for this (LongCat always uses ScMoE), so the baseline swaps the layer
  class the scanned decoder looks up; parameter names and shapes are unchanged.
  """
  from longcat_jax.model import transformer
  if variant == "scmoe":
    yield
    return
  original = transformer.ScMoELayer
  transformer.ScMoELayer = conventional_layer_cls()
  try:
    yield
  finally:
    transformer.ScMoELayer = original


# ----------------------------------------------------------------------------------------------
# Overlap analysis (runs in a subprocess with 8 CPU devices).


def _subjaxprs(eqn):
  from jax.extend.core import jaxprs_in_params
  return [getattr(j, "jaxpr", j) for j in jaxprs_in_params(eqn.params)]


def eqn_flops(e, per_device_divisor: int = 1) -> float:
  """Matmul FLOPs (2 * M * N * K per dot_general) of one equation, recursing into sub-jaxprs.

  `scan` bodies count `length` times. Shapes outside `shard_map` are global, so they are divided
  by `per_device_divisor` (the mesh size); inside `shard_map` they are already per device.
  """
  if e.primitive.name == "dot_general":
    (lc, _), _ = e.params["dimension_numbers"]
    k = math.prod(e.invars[0].aval.shape[d] for d in lc)
    return 2.0 * math.prod(e.outvars[0].aval.shape) * k / per_device_divisor
  inner_div = 1 if e.primitive.name == "shard_map" else per_device_divisor
  mult = e.params.get("length", 1) if e.primitive.name == "scan" else 1
  return sum(mult * eqn_flops(q, inner_div) for sub in _subjaxprs(e) for q in sub.eqns)


def eqn_primitives(e) -> set:
  out = {e.primitive.name}
  for sub in _subjaxprs(e):
    for q in sub.eqns:
      out |= eqn_primitives(q)
  return out


def eqn_collective_bytes(e) -> float:
  """Bytes per device produced by the MoE collectives in one equation (result sizes)."""
  if e.primitive.name in MOE_COLLECTIVES:
    return float(sum(math.prod(v.aval.shape) * v.aval.dtype.itemsize for v in e.outvars))
  mult = e.params.get("length", 1) if e.primitive.name == "scan" else 1
  return sum(mult * eqn_collective_bytes(q) for sub in _subjaxprs(e) for q in sub.eqns)


def overlap_window(jaxpr, mesh_size: int) -> dict:
  """Per-device matmul FLOPs of a layer's forward pass, split by dependence on the MoE's
  dispatch/combine: `window` is compute that neither feeds nor consumes them (top-level
  equations of the layer's jaxpr are the nodes of the dependence graph)."""
  from jax.extend.core import Var
  eqns = jaxpr.eqns
  flops = [eqn_flops(e, mesh_size) for e in eqns]
  comm = [i for i, e in enumerate(eqns) if eqn_primitives(e) & set(MOE_COLLECTIVES)]
  if not comm:
    raise ValueError("no MoE collective in the layer: is the expert-parallel mesh active?")
  producer = {v: i for i, e in enumerate(eqns) for v in e.outvars}
  parents = [{producer[v] for v in e.invars if isinstance(v, Var) and v in producer} for e in eqns]
  children = [set() for _ in eqns]
  for i, ps in enumerate(parents):
    for p in ps:
      children[p].add(i)

  def closure(start, edges):
    seen, todo = set(), list(start)
    while todo:
      for j in edges[todo.pop()]:
        if j not in seen:
          seen.add(j)
          todo.append(j)
    return seen

  before, after = closure(comm, parents), closure(comm, children)
  window = [i for i in range(len(eqns)) if i not in before and i not in after and i not in comm]
  return dict(total=sum(flops), moe_node=sum(flops[i] for i in comm), before=sum(flops[i] for i in before),
              after=sum(flops[i] for i in after), window=sum(flops[i] for i in window),
              moe_comm_bytes=sum(eqn_collective_bytes(eqns[i]) for i in comm), moe_nodes=len(comm))


def layer_jaxpr(config, variant: str, mesh, parallel, batch: int, seq: int):
  """The jaxpr of one layer's forward pass (training mode) under the mesh, abstractly traced."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from longcat_jax.model import transformer
  from longcat_jax.model.layers import rope_cos_sin
  from longcat_jax.parallel import MeshPlacement
  with layer_variant(variant):
    layer = transformer.ScMoELayer(config, placement=MeshPlacement.from_parallel(mesh, parallel))
  h = jax.ShapeDtypeStruct((batch, seq, config.hidden_size), jnp.dtype(config.dtype))
  pos = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
  cos, sin = rope_cos_sin(config, pos)
  seg = jnp.ones((batch, seq), jnp.int32)
  v = jax.eval_shape(lambda hh: nn.meta.unbox(layer.init(jax.random.key(0), hh, cos, sin, seg)), h)
  fn = lambda v, hh: layer.apply(v, hh, cos, sin, seg, mutable=["expert_load", "intermediates"])
  return jax.make_jaxpr(fn)(v, h).jaxpr


def compiled_collectives(config, variant: str, mesh, parallel, batch: int, seq: int) -> dict:
  """Collectives in the trainer's compiled training step (XLA:CPU), by kind; async ones end in -start."""
  from longcat_jax.train import trainer
  config = config.copy_and_resolve_references()
  config.batch_size, config.seq_len = batch, seq
  config.ep_transport, config.ep_chunk_tokens = parallel.ep_transport, parallel.ep_chunk_tokens
  with layer_variant(variant):
    hlo = trainer.build(config, mesh).lower().compile().as_text()
  kinds = hlo_collectives(hlo)
  return dict(collectives=kinds, async_ops=sum(sum(v.values()) for k, v in kinds.items() if k.endswith("-start")))


_COLLECTIVE = re.compile(r"\s(all-gather|all-reduce|reduce-scatter|all-to-all|ragged-all-to-all|collective-permute)"
                         r"(-start|-done)?\(")


def hlo_collectives(hlo: str) -> dict:
  """{kind: {"moe": n, "other": n}}: collective ops in HLO text (loop bodies once), split by whether
  their source location is inside the MoE layer (op_name contains /moe/)."""
  out = {}
  for line in hlo.splitlines():
    m = _COLLECTIVE.search(line)
    if not m:
      continue
    name = re.search(r'op_name="([^"]*)"', line)
    where = "moe" if name and "/moe/" in name.group(1) else "other"
    kind = out.setdefault(m.group(1) + (m.group(2) or ""), {"moe": 0, "other": 0})
    kind[where] += 1
  return out


def analysis_main(scale: dict, out_path: str):
  import jax
  jax.config.update("jax_num_cpu_devices", 8)
  import longcat_jax
  from longcat_jax.parallel import sharding
  pc = sharding.parallel_config(mesh=dict(fsdp=1, expert=8), ep_transport="gather")
  mesh = sharding.make_mesh(pc)
  train_cfg = common.train_config(scale["preset"], batch_size=scale["batch"], seq_len=scale["seq"],
                                  model=dict(kernels="xla"))
  flash = longcat_jax.get_config("flash", kernels="xla")
  out = {"mesh": "expert=8 (8 simulated CPU devices)", "transport": "gather (XLA:CPU has no ragged all-to-all)"}
  for variant in ("scmoe", "conventional"):
    out[variant] = dict(
        window_experiment_model=overlap_window(layer_jaxpr(train_cfg.model, variant, mesh, pc, scale["batch"],
                                                           scale["seq"]), mesh.size),
        window_flash_dims=overlap_window(layer_jaxpr(flash, variant, mesh, pc, 8, 4096), mesh.size),
        compiled_step=compiled_collectives(train_cfg, variant, mesh, pc, scale["batch"], scale["seq"]))
  with open(out_path, "w") as f:
    json.dump(out, f)


# ----------------------------------------------------------------------------------------------


def main():
  args, s, suffix = common.parse_args(__doc__.splitlines()[0], SCALES)
  timer = common.Timer()

  # Overlap analysis first, in a fresh process (the device count is fixed when JAX starts).
  analysis_path = common.results_path(f"exp3_analysis{suffix}.tmp.json")
  scale_name = "smoke" if args.smoke else args.scale
  subprocess.run([sys.executable, os.path.abspath(__file__), "--analysis", scale_name, analysis_path], check=True,
                 env=dict(os.environ, JAX_PLATFORMS="cpu"))
  with open(analysis_path) as f:
    analysis = json.load(f)
  os.remove(analysis_path)
  print(f"  overlap analysis done ({timer():.0f}s)", flush=True)

  base = common.train_config(s["preset"], total_steps=s["steps"], batch_size=s["batch"], seq_len=s["seq"])
  batches = common.eval_batches(common.corpus(), s["seq"], s["batch"], s["eval_batches"])
  runs, eval_loss = {}, {}
  for variant in ("scmoe", "conventional"):
    for seed in s["seeds"]:
      cfg = base.copy_and_resolve_references()
      cfg.seed = seed
      with layer_variant(variant):
        run = common.train(cfg, f"exp3/{variant}_s{seed}")
        stats = common.concat_stats([common.token_stats_fn(run.model)(run.variables(), b) for b in batches])
      runs[variant, seed] = run
      eval_loss[variant, seed] = float(stats["loss"][stats["mask"]].mean())

  mean = {v: float(np.mean([eval_loss[v, sd] for sd in s["seeds"]])) for v in ("scmoe", "conventional")}
  spread = max(float(np.ptp([eval_loss[v, sd] for sd in s["seeds"]])) for v in ("scmoe", "conventional"))
  # Paired by seed (same init and data order): conventional - ScMoE; > 0 means ScMoE is better.
  paired = np.array([eval_loss["conventional", sd] - eval_loss["scmoe", sd] for sd in s["seeds"]])
  sem = float(paired.std(ddof=1) / np.sqrt(len(paired))) if len(paired) > 1 else float("inf")
  win = {v: analysis[v]["window_flash_dims"] for v in ("scmoe", "conventional")}
  share = {v: w["window"] / (w["total"] - w["moe_node"]) for v, w in win.items()}
  out = dict(scale=args.scale, steps=s["steps"], tokens_per_step=s["batch"] * s["seq"],
             eval_loss={f"{v}_s{sd}": l for (v, sd), l in eval_loss.items()}, eval_loss_mean=mean,
             eval_loss_gap_conventional_minus_scmoe=mean["conventional"] - mean["scmoe"], eval_loss_seed_spread=spread,
             paired_gap_per_seed=paired, paired_gap_sem=sem,
             train_nll_last10pct={f"{v}_s{sd}": common.tail_mean(r.curve("nll")) for (v, sd), r in runs.items()},
             overlap=analysis, window_share_of_non_moe_flops_flash=share)
  out["claims"] = dict(
      # Not significantly worse: the mean paired gap is above -2 standard errors.
      no_quality_loss_at_equal_compute=bool(paired.mean() + 2 * sem >= 0),
      larger_overlap_window=bool(share["scmoe"] > share["conventional"]),
      cpu_overlaps_communication=bool(any(analysis[v]["compiled_step"]["async_ops"] for v in ("scmoe", "conventional"))))
  out.update(timer.record())

  fig, ax = common.figure(1, 2, size=(5.5, 3.8))
  colors = {"scmoe": "tab:orange", "conventional": "tab:blue"}
  for (v, sd), run in runs.items():
    ax[0, 0].plot(run.steps, common.smooth(run.curve("nll"), 20), color=colors[v], lw=1,
                  label=f"{v}: eval {mean[v]:.3f}" if sd == s["seeds"][0] else None)
  lo = min(common.tail_mean(r.curve("nll"), 0.3) for r in runs.values())
  ax[0, 0].set_ylim(lo - 0.15, lo + 0.9)
  ax[0, 0].set(xlabel="step", ylabel="train loss (nats/byte, smoothed)", title="equal compute, same init and data")
  ax[0, 0].legend(fontsize=8)
  # Shares of the layer's matmul FLOPs outside the MoE node. (The MoE node's own FLOPs are those of
  # the static worst-case dropless buffers of the `gather` transport, not useful work.)
  parts = ("before", "window", "after")
  names = {"before": "feeds the MoE (must finish before dispatch)", "window": "independent: can overlap dispatch/combine",
           "after": "consumes the MoE output"}
  pcolors = {"before": "#9fc5e8", "window": "#93c47d", "after": "#cccccc"}
  for i, v in enumerate(("scmoe", "conventional")):
    left, rest = 0.0, win[v]["total"] - win[v]["moe_node"]
    for p in parts:
      frac = win[v][p] / rest
      ax[0, 1].barh(i, frac, left=left, color=pcolors[p], label=names[p] if i == 0 else None)
      if frac > 0.05:
        ax[0, 1].text(left + frac / 2, i, f"{frac:.0%}", ha="center", va="center", fontsize=8)
      left += frac
  ax[0, 1].set_yticks([0, 1], ["ScMoE", "conventional"])
  ax[0, 1].set(xlabel="share of a layer's non-MoE forward matmul FLOPs\n(LongCat-Flash dims, 8 x 4096 tokens, EP=8)",
               title="compute that can hide the MoE's communication")
  ax[0, 1].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=1)
  tag = "exp3_scmoe" + suffix
  common.save_figure(fig, tag)
  common.save_json(tag, out)
  print(common.summary_line(tag, out))


if __name__ == "__main__":
  if len(sys.argv) == 4 and sys.argv[1] == "--analysis":
    analysis_main(SCALES[sys.argv[2]], sys.argv[3])
  else:
    main()
