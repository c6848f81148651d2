"""Mesh, logical-axis table, expert parallelism: sharded training steps equal the 1-device step.

Runs on the 8 simulated CPU devices of conftest.py.
"""

import flax.linen as nn
import jax
import numpy as np
import pytest

import longcat_jax
from longcat_jax.parallel import expert_parallel, sharding

import parallel_case

# (mesh, expert-parallel transport, dispatch chunk). Each transport is compared with the
# single-device dropless MoE, so they also agree with each other.
MESHES = [
    (dict(data=2, expert=2, tensor=2), "ragged_emulated", 0),
    (dict(fsdp=8), "auto", 0),
    (dict(expert=8), "gather", 0),
    (dict(data=4, expert=2), "gather", 8),
]


@pytest.mark.parametrize("mesh_sizes,transport,chunk", MESHES,
                         ids=[",".join(f"{k}={v}" for k, v in m.items()) for m, _, _ in MESHES])
def test_sharded_step_matches_single_device(mesh_sizes, transport, chunk):
  pc = sharding.parallel_config(mesh=dict(dict(fsdp=1), **mesh_sizes), ep_transport=transport,
                                ep_chunk_tokens=chunk)
  mesh = sharding.make_mesh(pc)
  ref = parallel_case.single_device_result()
  out = parallel_case.sharded_result(mesh, pc)
  loss_err, grad_err = parallel_case.relative_errors(out, ref)
  assert loss_err < 1e-5, f"loss {out['loss']} vs single device {ref['loss']}"
  assert grad_err < 1e-5, f"max relative gradient error {grad_err:.2e}"
  # Routing statistics are global: assignments per expert summed over the whole mesh.
  jax.tree.map(np.testing.assert_array_equal, out["aux"]["expert_load"], ref["aux"]["expert_load"])
  np.testing.assert_allclose(out["aux"]["ffn_per_token"], ref["aux"]["ffn_per_token"], rtol=1e-6)
  assert 0 < float(ref["aux"]["ffn_per_token"]) < longcat_jax.get_config("tiny").top_k  # zero experts used


def test_mesh_shape_fill_and_errors():
  assert sharding.resolve_mesh_shape(dict(fsdp=-1, expert=2), 8) == dict(data=1, fsdp=4, expert=2,
                                                                        tensor=1, context=1)
  assert sharding.parse_mesh("fsdp=64,expert=16") == dict(fsdp=64, expert=16)
  with pytest.raises(ValueError, match="'fsdp' cannot fill"):
    sharding.resolve_mesh_shape(dict(fsdp=-1, expert=3), 8)
  with pytest.raises(ValueError, match="16 devices, but 8"):
    sharding.resolve_mesh_shape(dict(fsdp=1, data=4, expert=4), 8)
  with pytest.raises(ValueError, match="unknown mesh axes"):
    sharding.parallel_config(mesh=dict(pipeline=2))
  mesh = sharding.make_mesh(dict(data=2, fsdp=-1))
  assert dict(mesh.shape) == dict(data=2, fsdp=4, expert=1, tensor=1, context=1)


def test_logical_table_layouts():
  mesh = sharding.abstract_mesh(dict(fsdp=4, expert=2, tensor=2), 16)
  P = jax.sharding.PartitionSpec
  spec = lambda names, shape: sharding.logical_to_spec(names, shape, mesh)
  # Expert weights: experts over `expert`, FSDP over the rest, hidden dim tensor-parallel.
  assert spec(("layers", "exp", "embed", "expert_mlp"), (2, 8, 64, 32)) == P(None, "expert", "fsdp", "tensor")
  # Dense weights: FSDP over fsdp x expert.
  assert spec(("embed", "mlp"), (64, 128)) == P(("fsdp", "expert"), "tensor")
  # A dimension the mesh axes do not divide falls through to the next rule, then unsharded.
  assert spec(("embed", "mlp"), (68, 5)) == P("fsdp", None)
  # Activations: tokens over data x fsdp x expert, so `embed` stays whole.
  assert spec(("batch", "length", "embed"), (8, 16, 64)) == P(("fsdp", "expert"), None, None)
  # A batch smaller than the batch axes: the table edit moves `expert` to the sequence.
  big = sharding.abstract_mesh(dict(fsdp=64, expert=16), 1024)
  rules = sharding.fit_batch_rules(big, 256)
  assert dict(rules)["batch"] == ("data", "fsdp") and dict(rules)["length"] == ("context", "expert")
  assert sharding.batch_spec(big, rules, (256, 8192)) == P("fsdp", "expert")
  assert sharding.fit_batch_rules(big, 1024) == sharding.LOGICAL_AXIS_RULES


def test_replicated_check_on_documented_layouts():
  # Every preset layout in docs/SCALING.md leaves no weight >= 1 MiB replicated...
  layouts = [("flash", dict(fsdp=16, expert=16), 256), ("flash", dict(fsdp=64, expert=16), 1024),
             ("flash", dict(data=2, fsdp=8, expert=16), 256), ("small", dict(fsdp=4, expert=2), 8),
             ("small", dict(data=2, expert=2, tensor=2), 8), ("small", dict(fsdp=8), 8)]
  for preset, sizes, n in layouts:
    model = longcat_jax.LongcatForCausalLM(longcat_jax.get_config(preset))
    mesh = sharding.abstract_mesh(sizes, n)
    boxed = sharding.abstract_variables(model)
    sharding.check_replicated(sharding.variable_shardings(model, mesh, boxed=boxed), nn.meta.unbox(boxed))
  # ...and the check fails when the table forgets a rule (no FSDP rules on the fsdp=8 mesh).
  rules = tuple(r for r in sharding.LOGICAL_AXIS_RULES if r[0] not in ("embed", "q_lora", "kv_lora"))
  shardings = sharding.variable_shardings(model, mesh, rules, boxed=boxed)
  with pytest.raises(ValueError, match=r"\['embed_tokens'\]"):
    sharding.check_replicated(shardings, nn.meta.unbox(boxed))


def test_transport_choice_by_platform():
  mesh = sharding.make_mesh(dict(expert=8))
  assert expert_parallel.choose_transport("auto", mesh) == "gather"  # XLA:CPU: no ragged-all-to-all
  assert expert_parallel.choose_transport("ragged", mesh) == "ragged"
