"""Where the ScMoE layer's MoE collectives sit in the compiled schedule.

    python experiments/scmoe_overlap.py [--mesh expert=8] [--preset tiny]

Compiles one ScMoE layer (forward) under an expert-parallel mesh of simulated CPU devices and
prints, in the order of the compiled (scheduled) HLO, the MoE dispatch/combine collectives and the
matmuls of the blocks that do not depend on the MoE (mlp_0, attn_1, mlp_1). The model issues the
MoE first (spec section 1), so the dispatch can run while mlp_0 / attn_1 compute and the combine
is needed only at the layer's last add. On GPU/TPU, XLA's latency-hiding scheduler turns the
collectives into async `*-start`/`*-done` pairs and places independent compute between them; the
XLA:CPU backend has no async collectives: it runs them synchronously, in the order printed here
(see docs/SCALING.md).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--mesh", default="expert=8")
  p.add_argument("--preset", default="tiny")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=64)
  a = p.parse_args()
  from longcat_jax.parallel import sharding
  sizes = sharding.parse_mesh(a.mesh)
  import jax
  jax.config.update("jax_num_cpu_devices", math.prod(sizes.values()))
  import jax.numpy as jnp
  import longcat_jax
  from longcat_jax.model.layers import rope_cos_sin
  from longcat_jax.model.transformer import ScMoELayer

  from longcat_jax.parallel import MeshPlacement
  cfg = longcat_jax.get_config(a.preset)
  pc = sharding.parallel_config(mesh=dict(dict(fsdp=1), **sizes))
  mesh = sharding.make_mesh(pc)
  layer = ScMoELayer(cfg, placement=MeshPlacement.from_parallel(mesh, pc))
  h = jax.ShapeDtypeStruct((a.batch, a.seq, cfg.hidden_size), jnp.float32,
                           sharding=sharding.NamedSharding(mesh, sharding.logical_to_spec(
                               ("batch", "length", "embed"), (a.batch, a.seq, cfg.hidden_size), mesh)))
  pos = jnp.broadcast_to(jnp.arange(a.seq), (a.batch, a.seq))
  cos, sin = rope_cos_sin(cfg, pos)
  variables = jax.eval_shape(lambda: layer.init(jax.random.key(0), jnp.zeros(h.shape), cos, sin, None))
  variables = {k: __import__("flax").linen.meta.unbox(v) for k, v in variables.items()}

  def fwd(v, h):
    return layer.apply(v, h, cos, sin, None, mutable=["expert_load", "intermediates"])[0][0]

  hlo = jax.jit(fwd).lower(variables, h).compile().as_text()

  entry = hlo[hlo.index("\nENTRY"):]
  entry = entry[:entry.index("\n}\n")]
  tags = [("moe dispatch", r"all-gather|all-to-all|ragged-all-to-all", "moe"),
          ("moe combine", r"reduce-scatter|all-reduce", "moe"),
          ("moe experts", r"dot|convolution|fusion|while", "moe/shard_map"),
          ("mlp_0 matmul", r"dot|convolution|fusion", "mlp_0"),
          ("attn_1 matmul", r"dot|convolution|fusion", "attn_1"),
          ("mlp_1 matmul", r"dot|convolution|fusion", "mlp_1"),
          ("attn_0 matmul", r"dot|convolution|fusion", "attn_0")]
  print(f"scheduled ENTRY of one ScMoE layer ({a.preset}, mesh {a.mesh}); relevant instructions in order:")
  last = None
  for i, line in enumerate(entry.splitlines()):
    m = re.search(r"=\s*(?:\([^=]*?\)|\S+)\s+([a-z\-]+)\(", line)
    name = re.search(r'op_name="([^"]*)"', line)
    if not m or not name:
      continue
    op, path = m.group(1), name.group(1)
    for label, ops, scope in tags:
      if re.fullmatch(ops, op) and f"/{scope}/" in path + "/" and (op != "fusion" or "dot" in line):
        if label != last:
          print(f"  {i:5d}  {label:<15} {op:<16} {path[-80:]}")
        last = label
        break


if __name__ == "__main__":
  main()
