"""Training-step MFU on an accelerator: the Pallas kernels (kernels=auto) beside the XLA paths
(kernels=xla), same model, weights and batch, against the device's matmul peak.

    python experiments/bench_mfu.py                                  # `gpu_medium` below, bf16
    python experiments/bench_mfu.py --preset small --batch 16 --seq 2048 --set num_layers=8

The same batch every step, so the loss falls fast (memorisation); the first step's loss must agree
between the kernel choices. One full training step (forward + backward + AdamW + expert-bias controller, bf16 compute,
float32 master weights) per timing; the median of --repeats after a compile + warm-up step.
MFU = tokens/s x model FLOPs per token (`train.metrics.training_flops_per_token`, the active
experts only) / peak, where peak is both the datasheet figure (`metrics.PEAK_FLOPS`) and the
bf16 matmul rate measured here (8192^3, median of 10): the second is the honest ceiling.
Meant for a GPU/TPU; on CPU it runs, slowly, with the measured float32 peak.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A model wide enough to keep one H200 busy: LongCat-Flash's attention dimensions (MLA 128 + 64 / 128,
# q_lora 1536, kv_lora 512), 4 ScMoE layers of width 2048, 64 FFN + 32 zero experts, top-8.
GPU_MEDIUM = dict(hidden_size=2048, num_layers=4, num_heads=16, q_lora_rank=1536, kv_lora_rank=512,
                  qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, ffn_size=8192,
                  num_ffn_experts=64, zero_experts=32, top_k=8, expert_ffn_size=1024, target_ffn_experts=6.0,
                  vocab_size=32768)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="gpu_medium", help="gpu_medium (above) or a longcat_jax preset")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=4096)
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--kernels", default="auto,xla", help="comma list of config.kernels values to time")
  p.add_argument("--remat", default="full")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="model config override")
  args = p.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import numpy as np

  import longcat_jax as lj
  from experiments import common
  from longcat_jax import train
  from longcat_jax.train import metrics, trainer

  def make_cfg(kernels):
    cfg = train.get_train_config("small" if args.preset == "gpu_medium" else args.preset,
                                 batch_size=args.batch, seq_len=args.seq)
    if args.preset == "gpu_medium":
      cfg.model.update(GPU_MEDIUM)
    common.set_fields(cfg.model, args.set)
    cfg.model.update(dtype="bfloat16", param_dtype="float32", kernels=kernels, remat=args.remat)
    return cfg

  rng = np.random.RandomState(0)
  cfg0 = make_cfg("xla")
  ids = rng.randint(3, cfg0.model.vocab_size, (args.batch, args.seq)).astype(np.int32)
  batch = dict(input_ids=ids, targets=np.roll(ids, -1, 1), segment_ids=np.ones_like(ids),
               positions=np.broadcast_to(np.arange(args.seq, dtype=np.int32), ids.shape),
               loss_mask=np.ones(ids.shape, np.float32))
  batch = jax.tree.map(jnp.asarray, batch)

  dev = jax.devices()[0]
  peak_sheet = metrics.device_peak_flops("bfloat16")
  n = 8192 if dev.platform != "cpu" else 1024
  dtype = jnp.bfloat16 if dev.platform != "cpu" else jnp.float32
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  mm = jax.jit(lambda x: x @ x)
  jax.block_until_ready(mm(a))
  times = []
  for _ in range(10):
    t = time.perf_counter()
    jax.block_until_ready(mm(a))
    times.append(time.perf_counter() - t)
  peak_meas = 2 * n ** 3 / statistics.median(times)
  counts = lj.count_params(cfg0.model)
  print(f"device {dev.device_kind} ({dev.platform}); {jnp.dtype(dtype).name} matmul {n}^3 measured "
        f"{peak_meas / 1e12:.1f} TFLOP/s, datasheet {peak_sheet / 1e12:.1f} TFLOP/s")
  c = cfg0.model
  print(f"model: hidden {c.hidden_size}, {c.num_layers} ScMoE layers, {c.num_heads} heads, {c.num_ffn_experts} FFN + "
        f"{c.zero_experts} zero experts top-{c.top_k}, vocab {c.vocab_size}; {counts.total / 1e9:.2f}B params; "
        f"batch {args.batch} x {args.seq}, bf16 compute, f32 master weights, remat {args.remat}")

  tokens = args.batch * args.seq
  print(f"{'kernels':8s} {'median ms':>10s} {'tokens/s':>10s} {'MFU meas.':>10s} {'MFU sheet':>10s} "
        f"{'FFN exp/tok':>11s} {'loss first -> last step':>24s}")
  for kernels in args.kernels.split(","):
    cfg = make_cfg(kernels)
    program = trainer.build(cfg)  # the trainer's own program (mesh from config.mesh over the local devices)
    state, step = program.init(jax.random.PRNGKey(0)), program.step
    state, m = step(state, batch)  # compile + warm-up
    first_loss = float(m["loss"])
    times = []
    for _ in range(args.repeats):
      t = time.perf_counter()
      state, m = step(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)
    med = statistics.median(times)
    ffn = float(np.mean(m["ffn_experts_mean"]))
    flops = metrics.training_flops_per_token(cfg.model, args.seq, ffn) * tokens
    print(f"{kernels:8s} {med * 1e3:10.1f} {tokens / med:10.0f} {flops / med / peak_meas:10.1%} "
          f"{flops / med / peak_sheet:10.1%} {ffn:11.2f} {first_loss:11.4f} -> {float(m['loss']):8.4f}", flush=True)
    del state, step, program


if __name__ == "__main__":
  main()
