"""Training throughput: longcat_jax beside transformers' LongcatFlashForCausalLM, same weights and batch.

    python experiments/bench_train.py                       # `small` preset, batch 4 x 512, float32, CPU
    python experiments/bench_train.py --preset tiny --batch 2 --seq 128 --repeats 3
    python experiments/bench_train.py --remat save_dots     # recompute non-matmul values in the backward

Like for like: our full training step (the trainer's own `build(config).step`: forward, backward,
AdamW, clipping, expert-bias controller) beside transformers' forward + backward +
`torch.optim.AdamW` step (same hyper-parameters, gradient clipping) on the same weights and batch
(ours are written with `save_pretrained` and loaded by transformers, so routing is identical).
The reference runs in its own process, driven call by call over a pipe and timed there
(experiments/side_by_side.py says why, and why the shuffled order and the gap below).
Forward + backward alone is timed on both sides too, and our step jitted the way the trainer did
before `build` (no buffer donation) as an A/B row; each side trains its own copy, so every row
runs on weights and routing of the same age (forward + backward on the current trained weights, on
both sides). Timings interleave all rows repeat by repeat, in a fresh seeded shuffle each repeat
(no row always runs right after the same other one), with `--gap` idle seconds before each call (both
libraries' thread pools spin for a while after work), and report medians, the spread and each
repeat's full-step ratio; MFU is model FLOPs
(`train.metrics`, the same count for both) over the best of several float32 matmul probes of
either library; the ceiling line divides the reference's median by the time those FLOPs take at
that peak, the largest ratio an implementation built on these matmuls could print on this machine. The ratio is not printed when the 1-minute load average at the start exceeds half
the cores (a loaded machine measures contention), unless `--force`.

Each row also gives the process CPU time per call (user + sys, median) and its minor page faults
(fresh memory touched: both libraries allocate their scratch anew each call), and the load average
is printed: on a shared machine wall times are inflated by other work, CPU times much less. On
Linux, `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (set before Python starts) backs large allocations
with transparent huge pages, for both sides (measured: our faults per call ~700k -> ~3-6k,
transformers' ~1.1-1.3M -> ~40-55k).
`--remat` (default: the preset's, `none` for `small`) is our side's execution setting; it does not
change the model or its numbers (save_dots halves our scratch memory at about equal time).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import side_by_side  # noqa: E402  (experiments/, beside this script)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="small")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--threads", type=int, default=0, help="threads for both sides (0: all cores, each side's default)")
  p.add_argument("--remat", default=None, help="our side's config.remat: none | full | save_dots | save_moe")
  p.add_argument("--force", action="store_true", help="print ratios even on a loaded machine")
  p.add_argument("--same-malloc", action="store_true",
                 help="the reference under longcat_jax's host-allocator settings too (side_by_side.py)")
  p.add_argument("--gap", type=float, default=1.0,
                 help="idle seconds before each timed call, so that one side's thread pools have gone to sleep")
  args = p.parse_args(argv)
  gate = side_by_side.LoadGate(args.force)
  side_by_side.set_threads(args.threads)
  args.threads = args.threads or os.cpu_count()

  import jax
  import jax.numpy as jnp
  import numpy as np

  import longcat_jax as lj
  from longcat_jax import train
  from longcat_jax.train import losses, metrics, trainer

  cfg = train.get_train_config(args.preset, batch_size=args.batch, seq_len=args.seq)
  cfg.model.dtype = cfg.model.param_dtype = "float32"
  cfg.model.remat = args.remat or cfg.model.remat
  c = cfg.model
  program = trainer.build(cfg)                       # one CPU device: the default mesh
  model = program.model
  state = program.init(jax.random.PRNGKey(0))
  state_prev = jax.tree.map(jnp.copy, state)
  params0, bias0 = jax.tree.map(jnp.copy, (state.params, state.expert_bias))  # program.step donates `state`
  rng = np.random.RandomState(0)
  ids = rng.randint(3, c.vocab_size, (args.batch, args.seq)).astype(np.int32)
  batch = dict(input_ids=ids, targets=np.concatenate([ids[:, 1:], np.zeros((args.batch, 1), np.int32)], 1),
               segment_ids=np.ones_like(ids), positions=np.broadcast_to(np.arange(args.seq, dtype=np.int32), ids.shape),
               loss_mask=np.concatenate([np.ones((args.batch, args.seq - 1), np.float32),
                                         np.zeros((args.batch, 1), np.float32)], 1))
  batch = jax.tree.map(jnp.asarray, batch)

  # Ours: forward + backward of the loss (as the reference does), and the full training step.
  def loss(params, bias):
    hidden = model.apply({"params": params, "expert_bias": bias}, batch["input_ids"], batch["positions"],
                         batch["segment_ids"], return_hidden=True)
    nll, n = losses.next_token_nll(hidden, params["lm_head"], batch["targets"], batch["loss_mask"])
    return nll / n

  fwd_bwd = jax.jit(jax.value_and_grad(loss))
  step_prev = jax.jit(train.make_train_step(model, cfg))   # how the trainer jitted it before build()
  t = time.perf_counter()
  jax.block_until_ready(fwd_bwd(params0, bias0))
  compile_fb = time.perf_counter() - t
  t = time.perf_counter()
  state, m = program.step(state, batch)   # donates the state it is given
  jax.block_until_ready(m)
  compile_step = time.perf_counter() - t
  state_prev = step_prev(state_prev, batch)[0]            # one step, as the state above
  ffn_per_token = float(np.mean(m["ffn_experts_mean"]))

  # Reference: the same weights through save_pretrained -> from_pretrained, in its own process.
  d = tempfile.mkdtemp()
  lj.save_pretrained(d, model, {"params": params0, "expert_bias": bias0})
  np.save(os.path.join(d, "ids.npy"), ids)
  o = cfg.optimizer
  ref = side_by_side.Reference(d, args.threads, train=True, hyper=dict(
      lr=o.lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, clip=o.grad_clip),
      same_malloc=args.same_malloc)
  ours_loss = float(fwd_bwd(params0, bias0)[0])
  ref_loss = ref("fwd_bwd")["loss"]                     # warm-up (before any update)
  ref("step")

  carry = {"state": state, "prev": state_prev}

  def ours_step():
    carry["state"], m = program.step(carry["state"], batch)
    jax.block_until_ready(m)

  def ours_step_prev():
    carry["prev"], m = step_prev(carry["prev"], batch)
    jax.block_until_ready(m)

  def ours_fwd_bwd():  # on the trained weights, as the reference's fwd+bwd runs on its trained model
    jax.block_until_ready(fwd_bwd(carry["state"].params, carry["state"].expert_bias))

  bench = side_by_side.Bench(args.repeats, args.gap)
  bench.reference("ref_step", ref, "step")
  bench.ours("ours_step", ours_step)
  bench.reference("ref_fwd_bwd", ref, "fwd_bwd")
  bench.ours("ours_fwd_bwd", ours_fwd_bwd)
  bench.ours("ours_step_prev", ours_step_prev)
  bench.run()

  peak_jax = metrics.device_peak_flops("float32")
  peak_torch = ref("peak")["flops"]
  ref.close()
  shutil.rmtree(d, ignore_errors=True)
  flops = metrics.training_flops_per_token(c, args.seq, ffn_per_token)
  print(f"config {args.preset}: hidden {c.hidden_size}, {c.num_layers} layers, {c.num_ffn_experts} FFN + "
        f"{c.zero_experts} zero experts, top-{c.top_k}, vocab {c.vocab_size}; batch {args.batch} x {args.seq}, "
        f"float32, {args.threads} threads, {jax.device_count()} JAX device(s); ours: remat {c.remat}, "
        f"kernels {c.kernels}")
  print(f"FFN experts per token {ffn_per_token:.2f}; model FLOPs per training token {flops / 1e6:.1f} M; "
        f"float32 matmul peak (best of several probes): jax {peak_jax / 1e9:.0f}, torch {peak_torch / 1e9:.0f} "
        f"GFLOP/s; MFU against the larger")
  print(f"loss on the batch: longcat_jax {ours_loss:.5f}, transformers {ref_loss:.5f}")
  print(f"compile: fwd+bwd {compile_fb:.1f}s, train step {compile_step:.1f}s")
  rows = [("transformers step (+AdamW)", "ref_step", "ref_step"), ("longcat_jax train step", "ours_step", "ref_step"),
          ("  same, previous jit", "ours_step_prev", "ref_step"),
          ("transformers fwd+bwd", "ref_fwd_bwd", "ref_fwd_bwd"), ("longcat_jax fwd+bwd", "ours_fwd_bwd", "ref_fwd_bwd")]
  print(bench.table(rows, args.batch * args.seq, gate.withheld, flops, max(peak_jax, peak_torch)))
  if not gate.withheld:
    fmt = lambda xs: ", ".join(f"{x:.2f}x" for x in xs) + f" (min {min(xs):.2f}x)"
    print("full step ratio per repeat: " + fmt(bench.per_repeat("ref_step", "ours_step")))
    print("fwd+bwd ratio per repeat: " + fmt(bench.per_repeat("ref_fwd_bwd", "ours_fwd_bwd")))
    # The ceiling: the model's matrix multiplies alone, at the better library's best matmul probe,
    # take `floor` seconds; nothing built on these matmuls can beat the reference by more than
    # its median over that (a reference at 45% MFU caps every ratio at 2.2x).
    floor = flops * args.batch * args.seq / max(peak_jax, peak_torch)
    print(f"ceiling: the model FLOPs alone at the best matmul rate either library reaches take {floor:.2f}s, "
          f"so an implementation built on these matmuls cannot run fwd+bwd faster than {bench.median('ref_fwd_bwd') / floor:.2f}x the reference's "
          f"(full step: {bench.median('ref_step') / floor:.2f}x, before the optimizer's own cost)")
    print("A/B trainer step vs previous jit per repeat: "
          + ", ".join(f"{x:.2f}x" for x in bench.per_repeat("ours_step_prev", "ours_step")))
  print(gate.footer())


if __name__ == "__main__":
  main()
