"""Prefill and decode throughput over the compressed MLA cache, against the memory-bandwidth bound.

    python experiments/bench_decode.py                          # `small` preset, float32, CPU sizes
    python experiments/bench_decode.py --batches 1,8,32 --contexts 256,2048,8064 --cache 8192
    python experiments/bench_decode.py --config flash --dtype bfloat16 ...   # on an accelerator

For each batch size B and filled context S (all inside one preallocated cache of --cache slots):
  prefill tok/s   B*S prompt tokens through `Engine.prefill` (expanded attention, writes the cache)
  decode tok/s    B tokens per `Engine.decode` step (absorbed MLA over the cache, one compile per B)
  step ms         median time of one decode step; "flat" compares it with the smallest S
  bound ms        bytes one step must read (weights it touches + the filled cache) / measured
                  memory bandwidth (`--bandwidth-gbs` overrides the measured copy bandwidth)
`--vs-transformers`: greedy generation end to end (prefill + every decode step, `lj.generate`)
beside transformers' `generate` (greedy, `do_sample=False`, its own KV cache) on the same weights
(written with `save_pretrained`, loaded by `LongcatFlashForCausalLM`), --prompt-tokens random
prompt tokens, --new-tokens new tokens (no EOS stop), for each batch of --batches. The reference
runs in its own process (as in bench_train.py: the two libraries' heaps and thread pools in one
process slow whichever runs second), repeats interleaved; reports median seconds, spread, tokens
per second, the ratio, and how many generated tokens agree.

Weights touched per step: all non-expert weights except the embedding (B rows), plus the distinct
FFN experts the B tokens route to (expected count for uniform routing over the FFN experts with
target_ffn_experts of them per token). Every number is the median of --repeats timed runs after a
compile + warm-up run. Random weights (throughput does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import longcat_jax as lj
from longcat_jax.config import dtype_of
from longcat_jax.inference import Engine, Sampling, cache_bytes_per_token


def median_seconds(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # compile + warm-up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def copy_bandwidth(repeats: int, mib: int = 256) -> float:
  """Measured device memory bandwidth in bytes/s: read + write of a `mib` MiB array."""
  x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
  f = jax.jit(lambda x: x * 1.0001)
  return 2 * x.nbytes / median_seconds(lambda: f(x), repeats)


def step_bytes(config, batch: int, context: int) -> float:
  """Bytes one decode step of `batch` tokens must read at `context` cached tokens per row."""
  pc = lj.count_params(config)
  wbytes = np.dtype(dtype_of(config.param_dtype)).itemsize
  n, k_e = config.num_ffn_experts, config.target_ffn_experts
  distinct = n * (1 - (1 - k_e / n) ** batch) if n else 0.0  # expected experts touched per layer
  weights = (pc.non_expert - pc.embedding + batch * config.hidden_size
             + distinct * pc.per_expert * config.num_layers) * wbytes
  return weights + batch * context * cache_bytes_per_token(config)


def versus_transformers(config, args) -> None:
  """Greedy `lj.generate` beside transformers' `generate`, same weights, repeats interleaved."""
  model = lj.LongcatForCausalLM(config)
  variables = lj.init_variables(model, jax.random.key(0))
  d = tempfile.mkdtemp()
  lj.save_pretrained(d, model, variables)
  threads = os.cpu_count() or 1
  ref = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--reference-worker", d, "--threads",
                          str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

  def ask(prompt, n):
    np.save(os.path.join(d, "prompt.npy"), prompt)
    ref.stdin.write(f"{n}\n")
    ref.stdin.flush()
    return json.loads(ref.stdout.readline())

  def ours(prompt, n):
    t = time.perf_counter()
    out = lj.generate(model, variables, prompt, n, temperature=0.0, eos_token_id=())
    return dict(wall=time.perf_counter() - t, tokens=[list(map(int, r)) for r in out.tokens])

  rng = np.random.RandomState(0)
  print(f"{config.name} ({args.dtype}), greedy, prompt {args.prompt_tokens} tokens + {args.new_tokens} new; "
        f"torch threads {threads}; load avg {os.getloadavg()[0]:.2f}")
  print(f"{'B':>4} {'side':>13} {'seconds':>8} {'(min-max)':>13} {'new tok/s':>10} {'ratio':>6}  tokens agreeing")
  for b in [int(x) for x in args.batches.split(",")]:
    prompt = rng.randint(3, config.vocab_size, (b, args.prompt_tokens)).astype(np.int32)
    ours(prompt, args.new_tokens)                 # compile + warm-up
    ask(prompt, args.new_tokens)
    times, last = {"transformers": [], "longcat_jax": []}, {}
    for r in range(args.repeats):                 # interleaved, the order alternating
      for side in (("longcat_jax", "transformers") if r % 2 == 0 else ("transformers", "longcat_jax")):
        out = ours(prompt, args.new_tokens) if side == "longcat_jax" else ask(prompt, args.new_tokens)
        times[side].append(out["wall"])
        last[side] = out["tokens"]
    agree = [next((i for i, (x, y) in enumerate(zip(a, t)) if x != y), len(a))   # leading tokens equal
             for a, t in zip(last["longcat_jax"], last["transformers"])]
    med = {k: statistics.median(v) for k, v in times.items()}
    for side in ("transformers", "longcat_jax"):
      v = times[side]
      ratio = med["transformers"] / med[side]
      print(f"{b:>4} {side:>13} {med[side]:>8.2f} {f'({min(v):.2f}-{max(v):.2f})':>13} "
            f"{b * args.new_tokens / med[side]:>10.1f} {ratio:>5.2f}x  "
            + (f"first {min(agree)}-{max(agree)} of {args.new_tokens} per row" if side == "longcat_jax" else ""))
  ref.stdin.close()
  ref.wait()
  print(f"(median of {args.repeats} interleaved repeats; ratio = transformers' time / this row's; load avg at end "
        f"{os.getloadavg()[0]:.2f})")


def _reference_worker(d: str, threads: int) -> None:
  """The transformers side: for each line N on stdin, greedy-generates N tokens after the prompt in
  d/prompt.npy and answers with one JSON line (wall seconds, new tokens per row)."""
  import torch
  from transformers import LongcatFlashForCausalLM

  torch.set_num_threads(threads)
  model = LongcatFlashForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
  for line in sys.stdin:
    n = int(line)
    ids = torch.as_tensor(np.load(os.path.join(d, "prompt.npy")), dtype=torch.long)
    t = time.perf_counter()
    with torch.no_grad():
      out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
    wall = time.perf_counter() - t
    print(json.dumps(dict(wall=wall, tokens=out[:, ids.shape[1]:].tolist())), flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="small")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--batches", default="1,8")
  p.add_argument("--contexts", default="128,1024,3968")
  p.add_argument("--cache", type=int, default=4096, help="cache slots per row (fixed: one decode compile per batch)")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--bandwidth-gbs", type=float, default=None)
  p.add_argument("--skip-prefill", action="store_true")
  p.add_argument("--vs-transformers", action="store_true", help="greedy generate beside transformers' generate")
  p.add_argument("--prompt-tokens", type=int, default=512)
  p.add_argument("--new-tokens", type=int, default=256)
  p.add_argument("--reference-worker", help=argparse.SUPPRESS)
  p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.reference_worker:
    return _reference_worker(args.reference_worker, args.threads)

  config = lj.get_config(args.config, dtype=args.dtype, param_dtype=args.dtype)
  config.max_position_embeddings = max(config.max_position_embeddings, args.cache)
  if args.vs_transformers:
    return versus_transformers(config, args)
  model = lj.LongcatForCausalLM(config)
  variables = lj.init_variables(model, jax.random.key(0))
  engine = Engine(model)
  greedy = Sampling(0.0)
  batches = [int(b) for b in args.batches.split(",")]
  contexts = [int(s) for s in args.contexts.split(",")]
  if max(contexts) >= args.cache:
    raise SystemExit(f"--contexts must stay below --cache={args.cache}")
  bw = args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else copy_bandwidth(args.repeats)
  print(f"{config.name} ({args.dtype}) on {jax.devices()[0].platform}: {lj.count_params(config).summary()}")
  print(f"cache: {cache_bytes_per_token(config)} bytes/token, {args.cache} slots/row; memory bandwidth "
        f"{bw / 1e9:.1f} GB/s ({'given' if args.bandwidth_gbs else 'measured copy'})")
  print(f"{'B':>4} {'S':>6} {'prefill tok/s':>14} {'decode tok/s':>13} {'step ms':>9} {'flat':>6} "
        f"{'bound ms':>9} {'step/bound':>10}")
  rng = np.random.RandomState(0)
  key = jax.random.key(0)
  for b in batches:
    runs = []
    for s in contexts:
      tokens = jnp.asarray(rng.randint(3, config.vocab_size, (b, s)), jnp.int32)
      lengths = jnp.full((b,), s, jnp.int32)
      prefill = lambda: engine.prefill(variables, tokens, lengths, greedy, key, cache_size=args.cache)
      prefill_tps = float("nan") if args.skip_prefill else b * s / median_seconds(prefill, args.repeats)
      cache, nxt, _, context = prefill()
      # The decode step donates its cache; carrying it through keeps every timed call in place.
      runs.append(dict(s=s, prefill_tps=prefill_tps, cache=cache, step_in=nxt[:, None], lengths=lengths,
                       context=context, times=[]))
    for r in runs:  # compile + warm-up
      r["cache"], out, _ = engine.decode(variables, r["cache"], r["step_in"], r["lengths"], r["context"], greedy, key)
      jax.block_until_ready(out)
    for _ in range(args.repeats):  # contexts interleaved, so load drift hits them alike
      for r in runs:
        t = time.perf_counter()
        r["cache"], out, _ = engine.decode(variables, r["cache"], r["step_in"], r["lengths"], r["context"], greedy,
                                           key)
        jax.block_until_ready(out)
        r["times"].append(time.perf_counter() - t)
    base = statistics.median(runs[0]["times"])
    for r in runs:
      t = statistics.median(r["times"])
      bound = step_bytes(config, b, r["s"]) / bw
      print(f"{b:>4} {r['s']:>6} {r['prefill_tps']:>14.0f} {b / t:>13.1f} {t * 1e3:>9.2f} {t / base:>6.2f} "
            f"{bound * 1e3:>9.3f} {t / bound:>10.1f}")


if __name__ == "__main__":
  main()
