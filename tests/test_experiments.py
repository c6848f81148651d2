"""The experiment harness's analysis helpers (no training: the experiments themselves run from
their README commands, see experiments/RESULTS.md)."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import longcat_jax  # noqa: E402
from experiments import common, exp_2_controller, exp_3_scmoe  # noqa: E402
from longcat_jax.data import ByteTokenizer  # noqa: E402
from longcat_jax.parallel import sharding  # noqa: E402


def test_token_types():
  ids = np.asarray(ByteTokenizer().encode("ab_1 (x)\n"))
  names = [common.TOKEN_TYPES[t] for t in common.token_types(ids)]
  assert names == ["word start", "word continuation", "word continuation", "digit", "space", "punctuation",
                   "word start", "punctuation", "newline"]


def test_spearman_matches_scipy_with_ties():
  stats = pytest.importorskip("scipy.stats")
  rng = np.random.default_rng(0)
  x = rng.integers(0, 4, 500).astype(float)          # heavy ties, like FFN-expert counts
  y = x + rng.normal(size=500)
  assert common.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


def test_settle_step():
  steps = np.arange(1, 101)
  x = np.where(steps < 40, 3.0, 2.0)
  assert exp_2_controller.settle_step(steps, x, 2.0, window=1) == 40
  assert exp_2_controller.settle_step(steps, np.full(100, 3.0), 2.0) is None


def test_conventional_layer_has_the_same_parameters_and_a_different_function():
  cfg = longcat_jax.get_config("tiny", kernels="xla")
  ids = jnp.arange(24, dtype=jnp.int32).reshape(2, 12) % cfg.vocab_size
  model = longcat_jax.LongcatForCausalLM(cfg)
  variables = longcat_jax.init_variables(model, jax.random.key(0))
  with exp_3_scmoe.layer_variant("conventional"):
    conv_vars = longcat_jax.init_variables(model, jax.random.key(0))
    conv_out = model.apply(variables, ids)
  same = jax.tree.map(lambda a, b: a.shape == b.shape, variables, conv_vars)
  assert all(jax.tree.leaves(same))
  assert not np.allclose(conv_out, model.apply(variables, ids), atol=1e-4)


def test_scmoe_exposes_more_compute_to_overlap_the_moe_communication():
  """On an expert-parallel mesh the MoE dispatch/combine of ScMoE is independent of mlp_0, attn_1
  and mlp_1; in the conventional layer only of mlp_1. Same blocks, so the same non-MoE FLOPs."""
  if jax.device_count() < 8:
    pytest.skip("needs the 8 simulated CPU devices of conftest.py")
  cfg = longcat_jax.get_config("tiny", kernels="xla")
  pc = sharding.parallel_config(mesh=dict(fsdp=1, expert=8), ep_transport="gather")
  mesh = sharding.make_mesh(pc)
  win = {v: exp_3_scmoe.overlap_window(exp_3_scmoe.layer_jaxpr(cfg, v, mesh, pc, 8, 32), mesh.size)
         for v in ("scmoe", "conventional")}
  rest = {v: w["total"] - w["moe_node"] for v, w in win.items()}
  assert rest["scmoe"] == pytest.approx(rest["conventional"])
  for w in win.values():
    assert w["moe_nodes"] == 1 and w["moe_comm_bytes"] > 0
    assert w["before"] + w["window"] + w["after"] == pytest.approx(w["total"] - w["moe_node"])
  # ScMoE: only attn_0 and the router feed the MoE; conventional: attn_0, mlp_0, attn_1 do.
  assert win["scmoe"]["window"] > 2 * win["conventional"]["window"]
  assert win["scmoe"]["before"] < win["conventional"]["before"]
