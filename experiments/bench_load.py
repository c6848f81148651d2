"""Checkpoint load: longcat_jax vs transformers vs the raw read bandwidth of the same files.

    python experiments/bench_load.py                 # ~3 GiB Flash-shaped BF16 checkpoint (+ an FP8 copy)
    python experiments/bench_load.py --gib 0.3 --repeats 1      # a quick check that it runs

Writes a Flash-shaped checkpoint (narrow hidden, many experts, several files) in the transformers
layout, and its FP8 copy, then times, each in a fresh subprocess (peak host memory is that
process's own VmHWM), interleaving the repeats:

  raw read      every safetensors file read into a reused buffer, one thread
  raw read xN   the same by N threads (the loader's N), each reading 64 MiB pieces into its own
                buffer; the faster of the two raw rows is the physical limit the ratios divide by
  copy limit    N threads copying every stored matrix, transposed ([out, in] -> [in, out], what
                any loader into the JAX layout does), from the file's pages into fresh memory:
                this machine's limit for the loader's CPU work, without reading, parsing or placing
  lj            longcat_jax.load_pretrained, no mesh (the default device)
  lj mesh8      the same on 8 simulated CPU devices, mesh fsdp=2, expert=4
  lj fp8        the FP8 copy, dequantized to bfloat16, no mesh
  transformers  LongcatFlashForCausalLM.from_pretrained(dtype=bfloat16)

Two regimes (`--cache`): `cold` evicts the files from the page cache before every run
(`posix_fadvise(DONTNEED)`, no root needed), so every row reads the disk, as a first load of a
released checkpoint (hundreds of GB, more than RAM) does; `warm` leaves them cached, so the rows
compare the loaders' own CPU costs against memory-copy speed. Prints the median of --repeats runs
per row and the spread. Note for `warm`: most stored tensors are [out, in] and the JAX leaves are
[in, out], so a loader into the JAX layout does a transposing copy (numpy ~1.3-2 GiB/s per thread
on 2-byte elements here) where the raw read is a straight copy.
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

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ("raw read", "raw read xN", "copy limit", "lj", "lj mesh8", "lj fp8", "transformers")
PIECE = 64 << 20


def flash_shaped(gib: float, experts: int):
  """A LongCat-Flash-shaped config (hidden 512, `experts` FFN experts of width 512) with as many
  layers as make ~`gib` GiB in bfloat16."""
  import longcat_jax as lj
  c = lj.get_config("tiny", vocab_size=32768, hidden_size=512, num_heads=8, q_lora_rank=256, kv_lora_rank=128,
                    qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, ffn_size=1024,
                    num_ffn_experts=experts, zero_experts=experts // 2, top_k=8, expert_ffn_size=512,
                    param_dtype="bfloat16", dtype="bfloat16", kernels="xla")
  per_layer = 3 * experts * 512 * 512 * 2 + 2 * (3 * 512 * 1024 * 2) + 4 * 512 * 512 * 2
  c.num_layers = max(1, round(gib * 2**30 / per_layer))
  return c


def write_checkpoints(root: str, gib: float, experts: int) -> tuple[str, str]:
  """Random BF16 weights (windows of one random pool: quick) saved with longcat_jax in the
  transformers layout, and the FP8 copy (fresh block scales)."""
  import flax
  import jax

  import longcat_jax as lj
  from longcat_jax.parallel import sharding
  c = flash_shaped(gib, experts)
  model = lj.LongcatForCausalLM(c)
  shapes = flax.linen.meta.unbox(sharding.abstract_variables(model))
  pool = (0.02 * np.random.default_rng(0).standard_normal(1 << 24)).astype(np.float32)
  rng = np.random.default_rng(1)

  def fill(s):
    n = int(np.prod(s.shape))
    start = int(rng.integers(0, pool.size))
    x = np.resize(np.roll(pool, -start), n) if n > pool.size - start else pool[start:start + n]
    return x.reshape(s.shape).astype(s.dtype)

  variables = jax.tree.map(fill, shapes)
  bf16, fp8 = os.path.join(root, "bf16"), os.path.join(root, "fp8")
  lj.save_pretrained(bf16, model, variables, max_shard_bytes=512 << 20)
  lj.save_pretrained(fp8, model, variables, quantization="fp8", max_shard_bytes=512 << 20)
  return bf16, fp8


def checkpoint_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def _workers() -> int:
  return min(16, (os.cpu_count() or 2) * 2)   # longcat_jax.interop.hf's default


def peak_rss() -> int:
  """This process's peak RSS in bytes (VmHWM: unlike ru_maxrss it is not inherited through fork)."""
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))


def child(mode: str, path: str) -> dict:
  """One measurement in this (fresh) process: seconds and peak RSS."""
  base = peak_rss()
  if mode == "raw read":
    view = memoryview(bytearray(PIECE))
    t = time.perf_counter()
    for f in sorted(os.listdir(path)):
      if f.endswith(".safetensors"):
        with open(os.path.join(path, f), "rb", buffering=0) as fh:
          while fh.readinto(view):
            pass
    secs = time.perf_counter() - t
  elif mode == "raw read xN":
    import concurrent.futures
    import threading
    files = [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
    pieces = [(f, o) for f in files for o in range(0, os.path.getsize(f), PIECE)]
    local = threading.local()

    def read(piece):
      if not hasattr(local, "buf"):
        local.buf = memoryview(bytearray(PIECE))
      fd = os.open(piece[0], os.O_RDONLY)
      try:
        os.preadv(fd, [local.buf], piece[1])
      finally:
        os.close(fd)

    with concurrent.futures.ThreadPoolExecutor(_workers()) as pool:
      t = time.perf_counter()
      list(pool.map(read, pieces))
      secs = time.perf_counter() - t
  elif mode == "copy limit":
    import concurrent.futures
    import mmap
    from longcat_jax.interop.safetensors_io import CheckpointFiles
    files = CheckpointFiles(path)
    keys = list(files.keys())

    def copy(key):
      v = files.view(key)
      v = v.T if v.ndim == 2 else v
      m = mmap.mmap(-1, max(v.nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
      np.frombuffer(m, v.dtype, count=v.size).reshape(v.shape)[...] = v
      files.release(key)

    with concurrent.futures.ThreadPoolExecutor(_workers()) as pool:
      t = time.perf_counter()
      list(pool.map(copy, keys))
      secs = time.perf_counter() - t
  elif mode.startswith("lj"):
    import jax
    if mode == "lj mesh8":
      jax.config.update("jax_num_cpu_devices", 8)
    import longcat_jax as lj
    from longcat_jax.parallel import sharding
    mesh = sharding.make_mesh(sharding.parallel_config(mesh=dict(fsdp=2, expert=4))) if mode == "lj mesh8" else None
    base = peak_rss()
    t = time.perf_counter()
    _, variables = lj.load_pretrained(path, jax.numpy.bfloat16, mesh=mesh)
    jax.block_until_ready(variables)
    secs = time.perf_counter() - t
  elif mode == "transformers":
    import torch
    from transformers import LongcatFlashForCausalLM
    base = peak_rss()
    t = time.perf_counter()
    LongcatFlashForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    secs = time.perf_counter() - t
  else:
    raise ValueError(mode)
  return dict(secs=secs, peak=peak_rss(), base=base)


def run_child(mode: str, path: str) -> dict:
  env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, "--dir", path], env=env,
                       capture_output=True, text=True, check=False)
  if out.returncode:
    raise RuntimeError(f"{mode} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--gib", type=float, default=3.0, help="approximate BF16 checkpoint size")
  p.add_argument("--experts", type=int, default=256)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--dir", help="where to write the checkpoints (default: a temporary directory)")
  p.add_argument("--modes", default=",".join(MODES))
  p.add_argument("--cache", default="cold", choices=("cold", "warm", "both"),
                  help="cold: evict the files from the page cache before every run; warm: leave them")
  p.add_argument("--child", help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.child:
    print(json.dumps(child(a.child, a.dir)))
    return
  with tempfile.TemporaryDirectory(dir=a.dir) as root:
    t = time.perf_counter()
    bf16, fp8 = write_checkpoints(root, a.gib, a.experts)
    size, size8 = checkpoint_bytes(bf16), checkpoint_bytes(fp8)
    print(f"checkpoint: {size / 2**30:.2f} GiB BF16 ({len(os.listdir(bf16)) - 2} files), FP8 copy "
          f"{size8 / 2**30:.2f} GiB; written in {time.perf_counter() - t:.0f} s", flush=True)
    for cache in (("cold", "warm") if a.cache == "both" else (a.cache,)):
      report(cache, a, bf16, fp8, size, size8)


def evict(path: str) -> None:
  """Drops the directory's safetensors files from the page cache (clean pages: no root needed)."""
  for f in os.listdir(path):
    if f.endswith(".safetensors"):
      fd = os.open(os.path.join(path, f), os.O_RDONLY)
      try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
      finally:
        os.close(fd)


def report(cache: str, a, bf16: str, fp8: str, size: int, size8: int) -> None:
  modes = a.modes.split(",")
  runs = {m: [] for m in modes}
  print(f"\n{cache} page cache; load avg at start {os.getloadavg()[0]:.2f}", flush=True)
  for _ in range(a.repeats):  # interleaved: each repeat runs every mode once
    for m in modes:
      path = fp8 if m == "lj fp8" else bf16
      if cache == "cold":
        evict(path)
      else:
        child("raw read", path)   # in the cache
      runs[m].append(run_child(m, path))
  raws = [statistics.median(x["secs"] for x in runs[m]) for m in ("raw read", "raw read xN") if m in runs]
  raw = min(raws) if raws else None
  print(f"{'':14s} {'seconds':>8s} {'(min-max)':>13s} {'GiB/s':>7s} {'x raw':>6s} {'peak GiB':>9s} "
        f"{'peak - start':>13s}")
  for m in modes:
    secs = statistics.median(x["secs"] for x in runs[m])
    spread = f"({min(x['secs'] for x in runs[m]):.2f}-{max(x['secs'] for x in runs[m]):.2f})"
    peak = statistics.median(x["peak"] for x in runs[m])
    extra = statistics.median(x["peak"] - x["base"] for x in runs[m])
    nbytes = size8 if m == "lj fp8" else size
    ratio = f"{nbytes / secs / (size / raw):6.2f}" if raw else "     -"
    print(f"{m:14s} {secs:8.2f} {spread:>13s} {nbytes / secs / 2**30:7.2f} {ratio} {peak / 2**30:9.2f} {extra / 2**30:13.2f}")
  print(f"\n(median of {a.repeats}; GiB/s = stored bytes / seconds; x raw = GiB/s / the faster raw read's GiB/s; "
        "peak - start: growth of the subprocess's peak RSS during the load; N = "
        f"{_workers()} threads; load avg at end "
        f"{os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
  main()
