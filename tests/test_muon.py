"""Muon (`optimizer.name="muon"`, train/optimizer.py) against a numpy reference of the public recipe
(Jordan et al. 2024 / Moonshot, arXiv 2502.16982 Algorithm 1): Nesterov momentum, 5 quintic
Newton-Schulz steps on the Frobenius-normalised matrix, update x 0.2 sqrt(max(A, B)); AdamW for
everything that is not a hidden matrix; one matrix per stacked layer and per expert."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import longcat_jax as lj
from longcat_jax import train
from longcat_jax.train import optimizer as optim
from longcat_jax.train import trainer
from longcat_jax.train.checkpoint import Checkpointer


def numpy_newton_schulz(g, steps=5, eps=1e-7):
  a, b, c = 3.4445, -4.7750, 2.0315
  x = g.astype(np.float64)
  t = x.shape[0] > x.shape[1]
  if t:
    x = x.T
  x = x / (np.linalg.norm(x) + eps)
  for _ in range(steps):
    A = x @ x.T
    x = a * x + (b * A + c * A @ A) @ x
  return x.T if t else x


def numpy_muon_updates(grads, momentum=0.95, rms=0.2):
  """grads: list over steps of [in, out] matrices -> the update of every step."""
  buf, out = np.zeros_like(grads[0]), []
  for g in grads:
    buf = momentum * buf + g
    u = numpy_newton_schulz(g + momentum * buf)
    out.append(u * rms * np.sqrt(max(g.shape)))
  return out


def numpy_adam_updates(grads, b1=0.9, b2=0.95, eps=1e-16):
  m, v, out = np.zeros_like(grads[0]), np.zeros_like(grads[0]), []
  for t, g in enumerate(grads, 1):
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    out.append((m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps))
  return out


def test_muon_update_matches_numpy_reference():
  """A [in, out] matrix, stacked [L, E, in, out] experts (each its own matrix), an output projection
  [heads, v, out] (heads x v is the input side) and a vector (Adam)."""
  rng = np.random.RandomState(0)
  shapes = {"w": (12, 20), "experts": (2, 3, 8, 6), "o": (2, 4, 10), "norm": (7,)}
  axes = {"w": ("embed", "mlp"), "experts": ("layers", "exp", "embed", "expert_mlp"),
          "o": ("heads", "kv_dim", "embed"), "norm": ("norm",)}
  groups = {"w": "hidden", "experts": "hidden", "o": "hidden", "norm": "norm"}
  dims = [optim.muon_dimension_numbers(axes[k], groups[k]) for k in sorted(shapes)]
  assert dims[sorted(shapes).index("norm")] is None
  tx = optim.scale_by_muon_adam(dims, momentum=0.95, update_rms=0.2, b1=0.9, b2=0.95, eps=1e-16)
  grads = [{k: rng.randn(*s).astype(np.float32) for k, s in shapes.items()} for _ in range(3)]
  state = tx.init(jax.tree.map(jnp.zeros_like, grads[0]))
  ours = []
  for g in grads:
    u, state = jax.jit(tx.update)(jax.tree.map(jnp.asarray, g), state)
    ours.append(jax.tree.map(np.asarray, u))
  want_w = numpy_muon_updates([g["w"] for g in grads])
  for t in range(3):
    np.testing.assert_allclose(ours[t]["w"], want_w[t], rtol=2e-4, atol=2e-5)
  for l in range(2):
    for e in range(3):
      want = numpy_muon_updates([g["experts"][l, e] for g in grads])
      for t in range(3):
        np.testing.assert_allclose(ours[t]["experts"][l, e], want[t], rtol=2e-4, atol=2e-5)
  want_o = numpy_muon_updates([g["o"].reshape(8, 10) for g in grads])
  for t in range(3):
    np.testing.assert_allclose(ours[t]["o"].reshape(8, 10), want_o[t], rtol=2e-4, atol=2e-5)
  want_n = numpy_adam_updates([g["norm"] for g in grads])
  for t in range(3):
    np.testing.assert_allclose(ours[t]["norm"], want_n[t], rtol=1e-5)
  # Update RMS ~ 0.2, as AdamW's (so AdamW's learning rate carries over).
  rms = np.sqrt(np.mean(ours[-1]["w"] ** 2))
  assert 0.12 < rms < 0.3, rms


def test_muon_takes_hidden_matrices_adamw_the_rest():
  cfg = lj.get_config("tiny", mtp_num_heads=1, ngram_embedding=dict(vocab_size_ratio=2.5, neighbor_num=3, split_num=2),
                      sparse_attention=dict(index_heads=2, index_dim=16, top_k=4))
  model = lj.LongcatForCausalLM(cfg)
  axes = optim.param_logical_axes(model)
  dims = optim.muon_leaf_dims(model)
  flat = jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0]
  by = {jax.tree_util.keystr(p): d for (p, _), d in zip(flat, dims)}
  for (p, ax), d in zip(flat, dims):
    p = jax.tree_util.keystr(p)
    vector = len([a for a in ax if a not in ("layers", "exp")]) < 2
    if vector or any(s in p for s in ("embed_tokens", "lm_head", "table_", "router")):
      assert d is None, p       # AdamW: embeddings, unembedding, n-gram tables, router, norms, vectors
    else:
      assert d is not None, p   # Muon: every hidden matrix (attention, MLPs, experts, indexer, MTP)
  assert by["['decoder']['layers']['moe']['w_gate']"] == optim.MuonDimensionNumbers((2,), (3,))   # per layer, expert
  assert by["['decoder']['layers']['attn_0']['o']"] == optim.MuonDimensionNumbers((1, 2), (3,))
  assert by["['decoder']['layers']['attn_0']['q_b']"] == optim.MuonDimensionNumbers((1,), (2, 3))


def test_muon_train_step_runs_and_learns(tmp_path):
  """Through the trainer's own `build` on a 2-way FSDP mesh (its optimizer-state shardings come from
  `optax.tree_map_params`, which calls `init` on a stand-in for the parameter tree) and its
  checkpointer (Muon's scalar second-moment placeholders are saved and restored)."""
  c = train.get_train_config("tiny", total_steps=20, batch_size=2, seq_len=16, mesh="fsdp=2")
  c.model.update(num_layers=1, kernels="xla")
  c.optimizer.update(name="muon", warmup_steps=2, lr=3e-3)
  program = trainer.build(c, trainer.make_mesh(c, jax.devices()[:2]))
  state = program.init(jax.random.PRNGKey(0))
  ids = np.tile(np.arange(17, dtype=np.int32)[None] % 7 + 3, (2, 1))
  batch = program.global_batch(dict(
      input_ids=ids[:, :-1], targets=ids[:, 1:], segment_ids=np.ones((2, 16), np.int32),
      positions=np.tile(np.arange(16, dtype=np.int32), (2, 1)), loss_mask=np.ones((2, 16), np.float32)))
  losses = []
  for _ in range(12):
    state, m = program.step(state, batch)
    losses.append(float(m["nll"]))
  assert np.isfinite(losses).all() and losses[-1] < losses[0] - 1.0, losses
  ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  ckpt.save(12, state, force=True)
  back, _, _ = ckpt.restore(program.abstract_state, 12)
  ckpt.close()
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(program.step(back, batch)[1]["nll"]) == float(program.step(state, batch)[1]["nll"])
  model = program.model
  with pytest.raises(ValueError, match="optimizer.name"):
    c.optimizer.name = "sgd"
    train.make_train_step(model, c)
