"""Training: losses, controller, optimizer, train step (accumulation, non-finite), growth, MTP, cross-mesh restore."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import longcat_jax as lj
from longcat_jax import train
from longcat_jax.train import controller, growth, losses, optimizer as optim, trainer
from longcat_jax.train.checkpoint import Checkpointer, with_shardings


def small_config(**model_overrides):
  """A seconds-to-compile model: 2 layers, hidden 32, 4 FFN + 2 zero experts, top-2."""
  c = train.get_train_config("tiny", total_steps=100, batch_size=4, seq_len=32)
  c.model.update(vocab_size=64, hidden_size=32, num_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                 qk_rope_head_dim=8, v_head_dim=8, ffn_size=64, num_ffn_experts=4, zero_experts=2, top_k=2,
                 expert_ffn_size=16, target_ffn_experts=1.0, moe_block_size=8)
  c.model.update(model_overrides)
  c.optimizer.warmup_steps = 5
  return c


def packed_batch(rng, batch, seq, vocab, max_docs=3):
  """A data-pipeline-style batch with several documents per row (segment ids, positions, mask)."""
  ids = rng.randint(3, vocab, (batch, seq)).astype(np.int32)
  seg = np.zeros((batch, seq), np.int32)
  for b in range(batch):
    cuts = np.sort(rng.choice(np.arange(2, seq - 2), max_docs - 1, replace=False))
    seg[b] = 1 + np.searchsorted(cuts, np.arange(seq), side="right")
  seg[0, -3:] = 0                                              # padding at the end of row 0
  ids[seg == 0] = 0
  pos = np.zeros_like(seg)
  for b in range(batch):
    for s in range(1, seq):
      pos[b, s] = pos[b, s - 1] + 1 if seg[b, s] == seg[b, s - 1] else 0
  same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
  mask = np.zeros((batch, seq), np.float32)
  mask[:, :-1] = same
  targets = np.zeros_like(ids)
  targets[:, :-1] = np.where(same, ids[:, 1:], 0)
  return dict(input_ids=ids, targets=targets, segment_ids=seg, positions=pos, loss_mask=mask)


# ---------------------------------------------------------------------------------------------
# Losses.


@pytest.mark.parametrize("chunk", [7, 64, None])
def test_chunked_nll_matches_reference_value_and_grads(chunk):
  rng = np.random.RandomState(0)
  h = jnp.asarray(rng.randn(3, 11, 16), jnp.float32)
  w = jnp.asarray(rng.randn(16, 50) * 0.3, jnp.float32)
  t = jnp.asarray(rng.randint(0, 50, (3, 11)))
  m = jnp.asarray(rng.rand(3, 11) > 0.3, jnp.float32)
  ours = lambda h, w: losses.next_token_nll(h, w, t, m, chunk_tokens=chunk)[0]
  ref = lambda h, w: losses.reference_nll(h, w, t, m)[0]
  np.testing.assert_allclose(ours(h, w), ref(h, w), rtol=1e-6)
  assert float(losses.next_token_nll(h, w, t, m)[1]) == float(m.sum())
  g_ours, g_ref = jax.grad(ours, argnums=(0, 1))(h, w), jax.grad(ref, argnums=(0, 1))(h, w)
  for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  # Under jit and with a cotangent other than 1 (the custom VJP scales by it).
  g2 = jax.jit(jax.grad(lambda h, w: 3.0 * ours(h, w), argnums=(0, 1)))(h, w)
  np.testing.assert_allclose(g2[1], 3.0 * g_ref[1], atol=1e-4, rtol=1e-5)
  # The unembedding gradient's transpose in row tiles (7 does not divide the vocabulary of 50):
  # the same values, bitwise.
  tiled = jax.grad(lambda h, w: 3.0 * losses.next_token_nll(h, w, t, m, chunk_tokens=chunk, transpose_tile=7)[0],
                   argnums=(0, 1))
  g3 = jax.jit(tiled)(h, w)
  np.testing.assert_array_equal(g3[1], g2[1])
  np.testing.assert_array_equal(losses.transpose_2d(w.T, 7), w)


def test_chunked_nll_bf16_hidden():
  rng = np.random.RandomState(1)
  h = jnp.asarray(rng.randn(2, 9, 16), jnp.bfloat16)
  w = jnp.asarray(rng.randn(16, 40) * 0.3, jnp.float32)
  t, m = jnp.asarray(rng.randint(0, 40, (2, 9))), jnp.ones((2, 9))
  ours, _ = losses.next_token_nll(h, w, t, m, chunk_tokens=5)
  ref, _ = losses.reference_nll(h.astype(jnp.float32), w.astype(jnp.bfloat16).astype(jnp.float32), t, m)
  assert ours.dtype == jnp.float32
  np.testing.assert_allclose(ours, ref, rtol=2e-2)
  gh = jax.grad(lambda h: losses.next_token_nll(h, w, t, m, chunk_tokens=5)[0])(h)
  assert gh.dtype == jnp.bfloat16 and np.isfinite(np.asarray(gh, np.float32)).all()


def test_hidden_z_loss_formula():
  rng = np.random.RandomState(2)
  z = rng.randn(2, 5, 8).astype(np.float32) * 3
  mask = rng.rand(2, 5) > 0.4
  want = sum(np.log(np.exp(np.abs(z[b, s])).sum()) ** 2 for b in range(2) for s in range(5) if mask[b, s])
  np.testing.assert_allclose(losses.hidden_z_loss_sum(jnp.asarray(z), jnp.asarray(mask)), want, rtol=1e-5)


def test_balance_loss_normalisation_and_gradient():
  n, z, k, ke, d = 8, 4, 4, 3.0, 2
  groups = np.array([0] * 4 + [1] * 4 + [2] * 4)
  q = np.array([ke / k / d, ke / k / d, 1 - ke / k])
  rng = np.random.RandomState(3)
  probs = rng.dirichlet(np.ones(n + z), size=2).astype(np.float32)          # [L=2, E]
  # Loads exactly at the target shares: the loss is sum_j P_j = 1 for any probabilities.
  at_target = np.stack([np.repeat(q * 1200 / np.array([4, 4, 4]), 4)] * 2).astype(np.float32)
  kw = dict(num_ffn_experts=n, zero_experts=z, top_k=k, target_ffn_experts=ke, num_groups=d)
  np.testing.assert_allclose(losses.balance_loss(jnp.asarray(probs), jnp.asarray(at_target), **kw), 1.0, rtol=1e-6)
  # Off target: the definition, and its gradient is f_j / q_j (mean over layers) for each class of group j.
  load = rng.randint(0, 50, (2, n + z)).astype(np.float32)
  f = np.stack([np.bincount(groups, load[l], 3) / load[l].sum() for l in range(2)])
  p = np.stack([np.bincount(groups, probs[l], 3) for l in range(2)])
  np.testing.assert_allclose(losses.balance_loss(jnp.asarray(probs), jnp.asarray(load), **kw),
                             np.mean(np.sum(f / q * p, -1)), rtol=1e-5)
  g = jax.grad(lambda pr: losses.balance_loss(pr, jnp.asarray(load), **kw))(jnp.asarray(probs))
  np.testing.assert_allclose(g, (f / q)[:, groups] / 2, rtol=1e-5)


def test_mtp_targets_never_cross_documents():
  ids = jnp.asarray([[10, 11, 12, 13, 20, 21, 22, 0]])
  seg = np.array([[1, 1, 1, 1, 2, 2, 2, 0]])
  mask = np.zeros((1, 8), np.float32)
  mask[:, :-1] = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
  tgt, w = losses.mtp_targets(ids, jnp.asarray(mask), 2)
  # Head 1 (predicts t+2): valid at t=0,1 (doc 1) and t=4 (doc 2).
  np.testing.assert_array_equal(w[0, 0], [1, 1, 0, 0, 1, 0, 0, 0])
  np.testing.assert_array_equal(tgt[0, 0, [0, 1, 4]], [12, 13, 22])
  # Head 2 (predicts t+3): t=0 only.
  np.testing.assert_array_equal(w[1, 0], [1, 0, 0, 0, 0, 0, 0, 0])
  assert int(tgt[1, 0, 0]) == 13


# ---------------------------------------------------------------------------------------------
# Controller.


def test_controller_update_rule():
  n, z, k, ke = 4, 2, 2, 1.0
  bias = jnp.zeros((3, n + z))
  load = jnp.asarray([[10, 10, 10, 10, 0, 0], [0, 0, 0, 0, 20, 20], [5, 5, 5, 5, 10, 10]], jnp.float32)
  new = controller.update_bias(bias, load, num_ffn_experts=n, top_k=k, target_ffn_experts=ke, rate=0.5)
  want = 0.5 * (ke / k / n - load[:, :n] / load.sum(-1, keepdims=True))
  np.testing.assert_allclose(new[:, :n], want, rtol=1e-6)
  np.testing.assert_array_equal(new[:, n:], 0.0)                # zero experts' biases untouched
  assert (new[0, :n] < 0).all() and (new[1, :n] > 0).all()      # too many FFN -> down; too few -> up
  np.testing.assert_allclose(new[2], 0.0, atol=1e-7)            # exactly on target -> no change
  assert float(controller.bias_rate(300, 1.0, 100.0)) == pytest.approx(0.5)


def test_controller_reaches_target_ffn_experts(tmp_path_factory):
  """Training a tiny model on text, mean FFN experts per token reaches K_e within 5% and stays there.

  K_e = 2.2 of top-4 (not an integer: all-tokens-alike routing cannot hit it). The router init is
  wider than the default (initializer_range 0.2) so that, as in a trained model, its scores vary
  across tokens: at hidden 32 with std 0.02 every token scores the experts alike and routing moves
  all-or-nothing. "Mean" is over 20 consecutive steps (~20k tokens): single 1k-token batches vary
  by ~10% with their content.
  """
  from longcat_jax.data import make_train_iterator, prepare_default_corpus
  store = prepare_default_corpus(str(tmp_path_factory.mktemp("corpus")), max_files=40)
  target = 2.2
  cfg = small_config(vocab_size=320, num_ffn_experts=16, zero_experts=8, top_k=4, target_ffn_experts=target,
                     initializer_range=0.2)
  cfg.total_steps, cfg.batch_size, cfg.seq_len = 150, 16, 64
  cfg.optimizer.lr = 1e-3
  cfg.controller.rate, cfg.controller.decay_steps = 0.3, 100.0
  model = lj.LongcatForCausalLM(cfg.model)
  state = train.init_train_state(model, cfg, jax.random.PRNGKey(0))
  step = jax.jit(train.make_train_step(model, cfg))
  it = make_train_iterator(store, cfg.seq_len, cfg.batch_size, 0, 0, 1, num_threads=0, prefetch=0)
  means = []
  for _ in range(cfg.total_steps):
    state, m = step(state, next(it))
    means.append(float(np.mean(m["ffn_experts_mean"])))
    assert m["ffn_experts_std"].shape == (cfg.model.num_layers,)
  means = np.array(means)
  assert abs(means[0] - target) > 0.2 * target, f"starts near the target ({means[0]}): the test would prove nothing"
  window = np.convolve(means, np.ones(20) / 20, mode="valid")        # window[i] = mean of steps i..i+19
  tail = window[-60:]
  assert np.all(np.abs(tail - target) <= 0.05 * target), f"20-step means over the last 80 steps: {np.round(tail, 3)}"
  bias = np.asarray(state.expert_bias["decoder"]["layers"]["moe"]["router"])
  np.testing.assert_array_equal(bias[:, cfg.model.num_ffn_experts:], 0.0)   # zero experts' bias untouched
  assert np.abs(bias[:, :cfg.model.num_ffn_experts]).max() > 0


# ---------------------------------------------------------------------------------------------
# Optimizer.


def test_optimizer_groups_masks_and_width_transfer():
  cfg = small_config()
  model = lj.LongcatForCausalLM(cfg.model)
  groups = optim.param_groups(model)
  assert groups["embed_tokens"] == "embedding" and groups["lm_head"] == "unembedding"
  assert groups["final_norm"]["scale"] == "norm"
  layers = groups["decoder"]["layers"]
  assert layers["attn_0"]["q_a_norm"] == "norm" and layers["input_norm_0"]["scale"] == "norm"
  assert layers["attn_0"]["q_b"] == "hidden" and layers["moe"]["w_up"] == "hidden"
  assert cfg.optimizer.eps == 1e-16
  # Width transfer from a proxy of half the width: LR / 2 for hidden + unembedding, init variance / 2.
  cfg.optimizer.proxy_hidden_size = cfg.model.hidden_size // 2
  s = optim.width_factor(cfg.optimizer, cfg.model.hidden_size)
  assert s == 2.0
  mult = optim.lr_multipliers(groups, s)
  assert mult["embed_tokens"] == 1.0 and mult["lm_head"] == 0.5 and mult["decoder"]["layers"]["mlp_0"]["up"] == 0.5
  assert mult["final_norm"]["scale"] == 1.0
  fake = jax.tree.map(lambda g: jnp.full((4, 4), 2.0), groups)
  scaled_fake = optim.scale_init_for_width(fake, groups, s)
  assert float(scaled_fake["lm_head"][0, 0]) == pytest.approx(2.0 / np.sqrt(2))
  assert float(scaled_fake["embed_tokens"][0, 0]) == 2.0 and float(scaled_fake["final_norm"]["scale"][0, 0]) == 2.0
  cfg.optimizer.proxy_hidden_size = cfg.model.hidden_size // 4                  # s = 4: std 0.02 -> 0.01
  scaled = train.init_train_state(model, cfg, jax.random.PRNGKey(0)).params
  assert float(jnp.std(scaled["lm_head"])) == pytest.approx(0.01, rel=0.06)
  assert float(jnp.std(scaled["decoder"]["layers"]["mlp_0"]["up"])) == pytest.approx(0.01, rel=0.06)
  assert float(jnp.std(scaled["embed_tokens"])) == pytest.approx(0.02, rel=0.06)
  np.testing.assert_array_equal(scaled["final_norm"]["scale"], 1.0)
  cfg.optimizer.proxy_hidden_size = cfg.model.hidden_size // 2
  # One update: hidden leaves move half as far as without transfer, embeddings as far.
  opt = cfg.optimizer
  opt.schedule, opt.warmup_steps = "constant", 0
  grads = jax.tree.map(jnp.ones_like, scaled)
  tx, _ = optim.make_optimizer(opt, groups, 100, cfg.model.hidden_size)
  upd, _ = jax.jit(tx.update)(grads, tx.init(scaled), scaled)
  opt.proxy_hidden_size = 0
  tx1, _ = optim.make_optimizer(opt, groups, 100, cfg.model.hidden_size)
  upd1, _ = jax.jit(tx1.update)(grads, tx1.init(scaled), scaled)
  ratio = lambda a, b: float(jnp.abs(a).mean() / jnp.abs(b).mean())
  assert ratio(upd["decoder"]["layers"]["mlp_0"]["up"], upd1["decoder"]["layers"]["mlp_0"]["up"]) == pytest.approx(0.5)
  assert ratio(upd["embed_tokens"], upd1["embed_tokens"]) == pytest.approx(1.0)
  # Weight decay (lr 1, decay 0.5, zero gradients): matrices shrink, norm gains do not.
  opt.lr, opt.weight_decay = 1.0, 0.5
  tx0, _ = optim.make_optimizer(opt, groups, 100, cfg.model.hidden_size)
  upd0, _ = jax.jit(tx0.update)(jax.tree.map(jnp.zeros_like, scaled), tx0.init(scaled), scaled)
  np.testing.assert_allclose(upd0["lm_head"], -0.5 * scaled["lm_head"], rtol=1e-6)
  np.testing.assert_array_equal(upd0["final_norm"]["scale"], 0.0)


def test_schedules():
  c = small_config().optimizer
  c.lr, c.warmup_steps, c.final_lr_ratio, c.decay_fraction = 1.0, 10, 0.1, 0.2
  c.schedule = "wsd"
  f = optim.make_schedule(c, 100)
  assert float(f(0)) == 0.0 and float(f(5)) == pytest.approx(0.5) and float(f(10)) == 1.0
  assert float(f(79)) == 1.0 and float(f(90)) == pytest.approx(0.55) and float(f(100)) == pytest.approx(0.1)
  c.schedule = "cosine"
  f = optim.make_schedule(c, 100)
  assert float(f(10)) == 1.0 and float(f(55)) == pytest.approx(0.55, abs=1e-3) and float(f(100)) == pytest.approx(0.1)
  c.schedule = "linear"
  with pytest.raises(ValueError, match="schedule='linear'"):
    optim.make_schedule(c, 100)


# ---------------------------------------------------------------------------------------------
# Train step.


@pytest.fixture(scope="module")
def mtp_setup():
  cfg = small_config(mtp_num_heads=2)
  cfg.optimizer.schedule, cfg.optimizer.warmup_steps = "constant", 0
  model = lj.LongcatForCausalLM(cfg.model)
  state = train.init_train_state(model, cfg, jax.random.PRNGKey(1))
  return cfg, model, state, jax.jit(train.make_train_step(model, cfg))


def test_packed_documents_do_not_interact(mtp_setup):
  """Loss of a row with two packed documents == losses of each document alone (main + each MTP head)."""
  cfg, model, state, step = mtp_setup
  rng = np.random.RandomState(5)
  a, b = rng.randint(3, 64, 13), rng.randint(3, 64, 19)

  def batch(docs, seq=32):
    """Row 0 holds `docs` packed; rows 1-3 are padding (the compiled step's batch shape)."""
    ids, seg, pos = np.zeros((4, seq), np.int32), np.zeros((4, seq), np.int32), np.zeros((4, seq), np.int32)
    at = 0
    for i, d in enumerate(docs):
      ids[0, at:at + len(d)], seg[0, at:at + len(d)], pos[0, at:at + len(d)] = d, i + 1, np.arange(len(d))
      at += len(d)
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    mask = np.concatenate([same, np.zeros((4, 1), bool)], 1).astype(np.float32)
    tgt = np.concatenate([np.where(same, ids[:, 1:], 0), np.zeros((4, 1), np.int32)], 1)
    return dict(input_ids=ids, targets=tgt, segment_ids=seg, positions=pos, loss_mask=mask)

  def sums(docs):
    bt = batch(docs)
    _, m = step(state, bt)
    _, w = losses.mtp_targets(jnp.asarray(bt["input_ids"]), jnp.asarray(bt["loss_mask"]), 2)
    return float(m["nll"]) * float(m["tokens"]), np.asarray(m["mtp_loss_per_head"]) * np.asarray(w.sum((1, 2)))

  packed, alone_a, alone_b = sums([a, b]), sums([a]), sums([b])
  np.testing.assert_allclose(packed[0], alone_a[0] + alone_b[0], rtol=2e-5)
  np.testing.assert_allclose(packed[1], alone_a[1] + alone_b[1], rtol=2e-5)
  assert packed[1].shape == (2,) and (packed[1] > 0).all()


def test_grad_accumulation_matches_full_batch_and_mtp_trains(mtp_setup):
  cfg, model, state, step = mtp_setup
  batch = packed_batch(np.random.RandomState(6), 4, cfg.seq_len, cfg.model.vocab_size)
  s1, m1 = step(state, batch)
  cfg2 = cfg.copy_and_resolve_references()
  cfg2.grad_accum_steps = 2
  s2, m2 = jax.jit(train.make_train_step(model, cfg2))(state, batch)
  for k in ("loss", "nll", "z_loss", "mtp_loss", "grad_norm"):
    np.testing.assert_allclose(m1[k], m2[k], rtol=2e-5, err_msg=k)
  np.testing.assert_allclose(m1["balance_loss"], m2["balance_loss"], rtol=0.05)   # per-microbatch statistic
  np.testing.assert_array_equal(m1["expert_load"], m2["expert_load"])
  np.testing.assert_allclose(m1["ffn_experts_mean"], m2["ffn_experts_mean"], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  assert float(m1["mtp_loss"]) > 0 and int(s1.step) == 1
  # The MTP head is trained: its parameters moved.
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), s1.params["mtp"], state.params["mtp"])
  assert min(jax.tree.leaves(moved)) > 0


def test_nonfinite_step_is_skipped(mtp_setup):
  cfg, model, state, step = mtp_setup
  batch = packed_batch(np.random.RandomState(7), 4, cfg.seq_len, cfg.model.vocab_size)
  bad = state.replace(params={**state.params, "lm_head": state.params["lm_head"].at[0, 0].set(jnp.nan)})
  new, m = step(bad, batch)
  assert float(m["nonfinite"]) == 1.0 and not np.isfinite(float(m["loss"]))
  for a, b in zip(jax.tree.leaves((new.params, new.opt_state, new.expert_bias)),
                  jax.tree.leaves((bad.params, bad.opt_state, bad.expert_bias))):
    np.testing.assert_array_equal(a, b)
  assert int(new.step) == 1


def test_donated_step_does_not_copy_the_optimizer_state(mtp_setup):
  """The trainer's step donates the state and updates it in place. The skip-on-nonfinite rule
  branches (lax.cond) rather than selecting between the new and the old state: with the select,
  XLA:CPU copied every optimizer moment at entry to keep the old values alive (68 copies, 0.8 GB
  per step at the small preset)."""
  cfg = mtp_setup[0]
  assert cfg.nonfinite == "skip"
  one_device = trainer.make_mesh(cfg, jax.devices()[:1])   # (with more, SPMD renames the parameters)
  hlo = trainer.build(cfg, one_device).lower().compile().as_text()
  entry = hlo[hlo.index("\nENTRY"):]
  params = set(re.findall(r"(state_opt_state[\w.]*):", entry.split("\n")[1]))
  assert len(params) > 10          # the moments are entry parameters under these names
  copied = sorted(p for p in params if re.search(rf"copy\(%{re.escape(p)}\)", entry))
  assert not copied, copied


# ---------------------------------------------------------------------------------------------
# Growth.


def test_growth_stacks_layers_and_trains():
  cfg = small_config(num_layers=1)
  model = lj.LongcatForCausalLM(cfg.model)
  state = train.init_train_state(model, cfg, jax.random.PRNGKey(2))
  big_cfg = cfg.copy_and_resolve_references()
  big_cfg.model = growth.grow_config(cfg.model, 2)
  params, bias = growth.grow(state.params, state.expert_bias, 1, 2)
  big_model = lj.LongcatForCausalLM(big_cfg.model)
  want = jax.eval_shape(lambda: train.init_train_state(big_model, big_cfg, jax.random.PRNGKey(0)))
  assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(lambda x: x.shape, want.params)
  small_layers = state.params["decoder"]["layers"]
  for (path, leaf), (_, small) in zip(jax.tree_util.tree_leaves_with_path(params["decoder"]["layers"]),
                                      jax.tree_util.tree_leaves_with_path(small_layers)):
    np.testing.assert_array_equal(leaf[0], small[0], err_msg=str(path))
    np.testing.assert_array_equal(leaf[1], small[0], err_msg=str(path))
  np.testing.assert_array_equal(params["lm_head"], state.params["lm_head"])
  # The grown model continues training: one step, finite, and it changes the weights. (This step
  # also covers bf16 compute on float32 master weights and rematerialisation.)
  big_cfg.model.dtype, big_cfg.model.remat = "bfloat16", "save_dots"
  big_model = lj.LongcatForCausalLM(big_cfg.model)
  grown = train.state_from_params(big_model, big_cfg, params, bias, jax.random.PRNGKey(3))
  big_cfg.optimizer.schedule, big_cfg.optimizer.warmup_steps = "constant", 0
  batch = packed_batch(np.random.RandomState(8), 4, cfg.seq_len, cfg.model.vocab_size)
  new, m = jax.jit(train.make_train_step(big_model, big_cfg))(grown, batch)
  assert np.isfinite(float(m["loss"])) and m["ffn_experts_mean"].shape == (2,)
  assert abs(float(m["nll"]) - np.log(cfg.model.vocab_size)) < 0.5      # bf16 forward of a near-uniform model
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new.params))
  assert float(jnp.abs(new.params["lm_head"] - params["lm_head"]).max()) > 0


# ---------------------------------------------------------------------------------------------
# Checkpoints across meshes.


def test_restore_onto_another_mesh_gives_same_loss(tmp_path, mtp_setup):
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  assert jax.device_count() == 8, "tests/conftest.py sets 8 simulated CPU devices"
  cfg, model, state, _ = mtp_setup
  # A non-trivial optimizer state and expert bias (as after some training).
  noise = np.random.RandomState(10)
  perturb = lambda x: (x + noise.rand(*x.shape).astype(x.dtype)) if jnp.issubdtype(x.dtype, jnp.floating) else x
  state = state.replace(opt_state=jax.tree.map(perturb, state.opt_state), expert_bias=jax.tree.map(perturb, state.expert_bias),
                        step=jnp.asarray(7, jnp.int32))
  batch = packed_batch(np.random.RandomState(9), 8, cfg.seq_len, cfg.model.vocab_size)
  eval_step = train.make_eval_step(model, cfg)

  def shard_largest_dim(mesh, axis):
    def spec(x):
      dims = [i for i, d in enumerate(x.shape) if d % mesh.shape[axis] == 0]
      if not dims:
        return NamedSharding(mesh, P())
      i = max(dims, key=lambda i: x.shape[i])
      return NamedSharding(mesh, P(*([None] * i + [axis])))
    return spec

  mesh_a = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
  mesh_b = Mesh(np.array(jax.devices()[::-1]).reshape(8, 1), ("data", "model"))
  sh_a = jax.tree.map(shard_largest_dim(mesh_a, "model"), state)
  sh_b = jax.tree.map(shard_largest_dim(mesh_b, "data"), state)
  state_a = jax.device_put(state, sh_a)
  loss = lambda mesh, sh, s: jax.jit(eval_step, in_shardings=(sh.params, sh.expert_bias, NamedSharding(mesh, P("data"))))(
      s.params, s.expert_bias, batch)
  loss_a = loss(mesh_a, sh_a, state_a)

  ckpt = Checkpointer(str(tmp_path / "ckpt"), every=1, keep=2)
  ckpt.save(7, state_a, data={"next_index": 7}, meta={"mesh": "2x4"})
  ckpt.close()
  ckpt = Checkpointer(str(tmp_path / "ckpt"), every=1, keep=2)
  restored, data, meta = ckpt.restore(with_shardings(train.abstract_train_state(model, cfg), sh_b))
  ckpt.close()
  assert data == {"next_index": 7} and meta == {"mesh": "2x4"} and int(restored.step) == 7
  q_b = restored.params["decoder"]["layers"]["attn_0"]["q_b"]
  assert q_b.sharding == sh_b.params["decoder"]["layers"]["attn_0"]["q_b"]
  assert q_b.sharding != state_a.params["decoder"]["layers"]["attn_0"]["q_b"].sharding
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state_a)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  loss_b = loss(mesh_b, sh_b, restored)
  assert np.isfinite(float(loss_a))
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# MTP interop and FLOPs accounting.


def test_mtp_checkpoint_roundtrip(tmp_path, mtp_setup):
  cfg, model, state, _ = mtp_setup
  variables = {"params": state.params, "expert_bias": state.expert_bias}
  lj.save_pretrained(str(tmp_path / "ck"), model, variables)
  from longcat_jax.interop import read_mtp_tensors
  keys = read_mtp_tensors(str(tmp_path / "ck"))
  assert "model.mtp.layers.1.transformer_layer.mlp.down_proj.weight" in keys
  assert keys["model.mtp.layers.0.eh_proj.weight"].shape == (32, 64)        # [out=H, in=2H]
  np.testing.assert_array_equal(keys["model.mtp.embed_tokens.weight"], state.params["embed_tokens"])
  model2, v2 = lj.load_pretrained(str(tmp_path / "ck"))
  assert model2.config.mtp_num_heads == 2
  for a, b in zip(jax.tree.leaves(v2["params"]["mtp"]), jax.tree.leaves(state.params["mtp"])):
    np.testing.assert_array_equal(a, b)


def test_flops_per_token_matches_parameter_count():
  from longcat_jax.train import metrics
  c = small_config().model
  pc = lj.count_params(c)
  # QK^T and PV over the full 32-token sequence, 2 FLOPs per MAC, 2 attention blocks per layer.
  attn = 2 * c.num_layers * 2 * 32 * c.num_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim)
  # Norm gains are counted as activated parameters but cost no matmul FLOPs.
  norms = c.num_layers * (4 * c.hidden_size + 2 * (c.q_lora_rank + c.kv_lora_rank)) + c.hidden_size
  want = 2 * (pc.activated(1.5) - norms) + attn
  assert metrics.forward_flops_per_token(c, 32, 1.5) == pytest.approx(want, rel=1e-9)
  assert metrics.training_flops_per_token(c, 32, 1.5) == pytest.approx(3 * want, rel=1e-9)


def test_mtp_head_matches_a_torch_reference(tmp_path, mtp_setup):
  """Both MTP heads against the vLLM LongCat MTP structure built from transformers' LongCat modules
  (MLA, SwiGLU, RMSNorm, interleaved RoPE), loaded from our `model.mtp.*` tensors."""
  import torch
  from transformers import LongcatFlashConfig
  from transformers.models.longcat_flash import modeling_longcat_flash as hf
  cfg, model, state, _ = mtp_setup
  c = cfg.model
  rng = np.random.RandomState(11)
  params = dict(state.params)
  params["mtp"] = jax.tree.map(lambda x: x + 0.1 * rng.randn(*x.shape).astype(np.float32), state.params["mtp"])
  variables = {"params": params, "expert_bias": state.expert_bias}
  lj.save_pretrained(str(tmp_path / "ck"), model, variables)
  from longcat_jax.interop import read_mtp_tensors
  t = {k: torch.as_tensor(v) for k, v in read_mtp_tensors(str(tmp_path / "ck")).items()}

  ids = rng.randint(3, c.vocab_size, (2, 12)).astype(np.int32)
  hidden = model.apply(variables, ids, return_hidden=True)
  ours = np.asarray(model.apply(variables, hidden, ids, method=model.mtp_hidden))

  hf_cfg = LongcatFlashConfig(**lj.config.to_hf_config(c))
  hf_cfg._attn_implementation = "eager"
  rotary = hf.LongcatFlashRotaryEmbedding(hf_cfg)
  norm = lambda w: _loaded(hf.LongcatFlashRMSNorm(c.hidden_size, eps=c.rms_norm_eps), {"weight": w})
  embed = t["model.mtp.embed_tokens.weight"]
  final = norm(t["model.mtp.norm.weight"])
  h = torch.tensor(np.array(hidden))
  pos = torch.arange(12)[None].expand(2, 12)
  mask = torch.full((12, 12), float("-inf")).triu(1)[None, None]
  with torch.no_grad():
    for k in range(c.mtp_num_heads):
      pre = f"model.mtp.layers.{k}."
      sub = lambda prefix: {n[len(pre + prefix):]: v for n, v in t.items() if n.startswith(pre + prefix)}
      attn = _loaded(hf.LongcatFlashMLA(hf_cfg, layer_idx=0), sub("self_attn."))
      mlp = _loaded(hf.LongcatFlashMLP(hf_cfg, intermediate_size=c.ffn_size), sub("transformer_layer.mlp."))
      ahead = torch.as_tensor(np.pad(ids, ((0, 0), (0, k + 1)))[:, k + 1:], dtype=torch.long)
      x = torch.cat([norm(t[pre + "enorm.m.weight"])(embed[ahead]), norm(t[pre + "hnorm.m.weight"])(h)], -1)
      x = x @ t[pre + "eh_proj.weight"].T
      x = x + attn(norm(t[pre + "input_layernorm.weight"])(x), rotary(x, pos), mask)[0]
      x = x + mlp(norm(t[pre + "post_attention_layernorm.weight"])(x))
      h = final(x)
      np.testing.assert_allclose(ours[k], h.numpy(), atol=2e-5, rtol=1e-4, err_msg=f"MTP head {k}")


def _loaded(module, tensors):
  module.load_state_dict({n: v for n, v in tensors.items()}, strict=True)
  return module.float().eval()
