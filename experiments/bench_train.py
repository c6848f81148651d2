"""Training throughput: longcat_jax beside transformers' LongcatFlashForCausalLM, same weights and batch.

    python experiments/bench_train.py                       # `small` preset, batch 4 x 512, float32, CPU
    python experiments/bench_train.py --preset tiny --batch 2 --seq 128 --repeats 3
    python experiments/bench_train.py --remat save_dots     # recompute non-matmul values in the backward

Both sides run forward + backward of the next-token loss on the same batch with the same weights
(ours are written with `save_pretrained` and loaded by transformers, so routing is identical).
Timings interleave the two sides and report medians; MFU is model FLOPs (`train.metrics`, the
same count for both) over the machine's measured float32 matmul peak. Also reported: our full
training step (forward + backward + AdamW + expert-bias controller).

Each row also gives the process CPU time per call (user + sys, median) and the load average is
printed: on a shared machine wall times are inflated by other work, CPU times much less.
`--remat` (default: the preset's, `none` for `small`) is our side's execution setting; it does not
change the model or its numbers (save_dots halves our scratch memory at about equal time).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="small")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--threads", type=int, default=0, help="threads for both sides (0: all cores, each side's default)")
  p.add_argument("--remat", default=None, help="our side's config.remat: none | full | save_dots | save_moe")
  args = p.parse_args(argv)
  if args.threads == 1:  # before JAX starts its CPU client
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
  elif args.threads > 1:
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" intra_op_parallelism_threads={args.threads}"
  args.threads = args.threads or os.cpu_count()

  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from transformers import LongcatFlashForCausalLM

  import longcat_jax as lj
  from longcat_jax import train
  from longcat_jax.train import losses, metrics

  torch.set_num_threads(args.threads)
  cfg = train.get_train_config(args.preset, batch_size=args.batch, seq_len=args.seq)
  cfg.model.dtype = cfg.model.param_dtype = "float32"
  cfg.model.remat = args.remat or cfg.model.remat
  c = cfg.model
  model = lj.LongcatForCausalLM(c)
  state = train.init_train_state(model, cfg, jax.random.PRNGKey(0))
  rng = np.random.RandomState(0)
  ids = rng.randint(3, c.vocab_size, (args.batch, args.seq)).astype(np.int32)
  batch = dict(input_ids=ids, targets=np.concatenate([ids[:, 1:], np.zeros((args.batch, 1), np.int32)], 1),
               segment_ids=np.ones_like(ids), positions=np.broadcast_to(np.arange(args.seq, dtype=np.int32), ids.shape),
               loss_mask=np.concatenate([np.ones((args.batch, args.seq - 1), np.float32),
                                         np.zeros((args.batch, 1), np.float32)], 1))
  batch = jax.tree.map(jnp.asarray, batch)

  # Ours: forward + backward of the loss (as the reference does), and the full training step.
  def loss(params):
    hidden = model.apply({"params": params, "expert_bias": state.expert_bias}, batch["input_ids"], batch["positions"],
                         batch["segment_ids"], return_hidden=True)
    nll, n = losses.next_token_nll(hidden, params["lm_head"], batch["targets"], batch["loss_mask"])
    return nll / n

  fwd_bwd = jax.jit(jax.value_and_grad(loss))
  step = jax.jit(train.make_train_step(model, cfg))
  t = time.perf_counter()
  jax.block_until_ready(fwd_bwd(state.params))
  compile_fb = time.perf_counter() - t
  t = time.perf_counter()
  _, m = step(state, batch)
  jax.block_until_ready(m)
  compile_step = time.perf_counter() - t
  ffn_per_token = float(np.mean(m["ffn_experts_mean"]))

  # Reference: the same weights through save_pretrained -> from_pretrained.
  with tempfile.TemporaryDirectory() as d:
    lj.save_pretrained(d, model, {"params": state.params, "expert_bias": state.expert_bias})
    ref = LongcatFlashForCausalLM.from_pretrained(d, torch_dtype=torch.float32).train()
  tids = torch.as_tensor(ids, dtype=torch.long)

  def ref_fwd_bwd():
    ref.zero_grad(set_to_none=True)
    out = ref(input_ids=tids, labels=tids)
    out.loss.backward()
    return out.loss.item()

  ours_loss = float(fwd_bwd(state.params)[0])
  ref_loss = ref_fwd_bwd()                                   # warm-up

  timings = {"ours_fwd_bwd": [], "ours_step": [], "ref_fwd_bwd": []}
  cpu = {key: [] for key in timings}

  def timed(key, fn):
    c, t = _cpu_seconds(), time.perf_counter()
    fn()
    timings[key].append(time.perf_counter() - t)
    cpu[key].append(_cpu_seconds() - c)

  for _ in range(args.repeats):
    timed("ours_fwd_bwd", lambda: jax.block_until_ready(fwd_bwd(state.params)))
    timed("ref_fwd_bwd", ref_fwd_bwd)
    timed("ours_step", lambda: jax.block_until_ready(step(state, batch)))

  peak_jax = metrics.device_peak_flops("float32")
  a = torch.ones(1024, 1024)
  best = min(_time(lambda: a @ a) for _ in range(5))
  peak_torch = 2 * 1024 ** 3 / best
  peak = max(peak_jax, peak_torch)
  tokens = args.batch * args.seq
  flops = metrics.training_flops_per_token(c, args.seq, ffn_per_token)
  print(f"config {args.preset}: hidden {c.hidden_size}, {c.num_layers} layers, {c.num_ffn_experts} FFN + "
        f"{c.zero_experts} zero experts, top-{c.top_k}, vocab {c.vocab_size}; batch {args.batch} x {args.seq}, "
        f"float32, {args.threads} threads, {jax.device_count()} JAX device(s); ours: remat {c.remat}, "
        f"kernels {c.kernels}")
  print(f"FFN experts per token {ffn_per_token:.2f}; model FLOPs per training token {flops / 1e6:.1f} M; "
        f"float32 matmul peak: jax {peak_jax / 1e9:.0f} GFLOP/s, torch {peak_torch / 1e9:.0f} GFLOP/s")
  print(f"loss on the batch: longcat_jax {ours_loss:.5f}, transformers {ref_loss:.5f}")
  print(f"compile: fwd+bwd {compile_fb:.1f}s, train step {compile_step:.1f}s")
  rows = [("transformers fwd+bwd", "ref_fwd_bwd"), ("longcat_jax fwd+bwd", "ours_fwd_bwd"),
          ("longcat_jax train step", "ours_step")]
  base = tokens / np.median(timings["ref_fwd_bwd"])
  print(f"{'':26s} {'median s':>9s} {'tokens/s':>9s} {'MFU':>6s} {'vs ref':>7s} {'CPU s':>7s}")
  for name, key in rows:
    med = float(np.median(timings[key]))
    tps = tokens / med
    print(f"{name:26s} {med:9.3f} {tps:9.0f} {tps * flops / peak:6.1%} {tps / base:6.2f}x "
          f"{np.median(cpu[key]):7.2f}")
  print("load average (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))


def _cpu_seconds() -> float:
  """User + system CPU time of this process, all threads."""
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def _time(fn):
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


if __name__ == "__main__":
  main()
