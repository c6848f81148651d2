"""Process start-up settings: which JAX platforms to open, and how host memory is reused.

Which platforms: a CPU host with `libtpu` installed behaves as one without it.

`libtpu` (the `.[tpu]` extra, also in `.[test]`) registers JAX's TPU backend. On a machine with
no TPU, JAX would still try to open one when it starts its backends: libtpu logs errors about
TPU worker hostnames and accelerator type to stderr, then JAX falls back to the CPU. That extra
noise (and any cost of the probe) is the only difference; `keep_cpu_without_tpu()` removes it by
restricting JAX to the CPU on exactly those machines. Compile-only TPU devices
(`jax.experimental.topologies`, longcat_jax/parallel/tpu_target.py) do not need the TPU backend
and keep working.

Host memory: `keep_freed_host_memory()` makes glibc's malloc keep freed memory for reuse
instead of returning it to the kernel (the CPU counterpart of an accelerator's caching allocator).
By default glibc serves every allocation over 32 MiB with a fresh `mmap` and unmaps it on free, so
XLA:CPU's per-call buffers (logits, attention scores, the MoE's row blocks, the temporaries of a
training step) are new pages on every call, and each first touch is a page fault with the kernel
zeroing the page. Measured on a 2-core VM (small preset, 4 x 512, float32): 166k faults per
forward and ~700k per training step; a 32 MiB `exp` took 20.5 ms into fresh pages and 4.0 ms into
reused ones (with one CPU device also one malloc arena for all threads; see the function). The
cost: the process keeps its peak heap (what it freed is reused, not unmapped).
Opt out with `LONGCAT_JAX_MALLOC=system` in the environment.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import sys

import jax
from jax._src import hardware_utils, xla_bridge


def keep_cpu_without_tpu() -> bool:
  """Sets `jax_platforms="cpu"` when libtpu is installed, no TPU chip is attached, no GPU is
  visible, JAX's backends have not started and the user chose no platforms (`JAX_PLATFORMS` or
  `jax_platforms`). Returns whether it did. Call before the first JAX computation."""
  if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
    return False
  if xla_bridge.backends_are_initialized() or importlib.util.find_spec("libtpu") is None:
    return False
  if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
    return False
  if hardware_utils.has_visible_nvidia_gpu() or os.path.exists("/dev/kfd"):  # CUDA / ROCm hosts
    return False
  jax.config.update("jax_platforms", "cpu")
  return True


# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def configured_cpu_devices() -> int:
  """The XLA:CPU device count set so far (`jax_num_cpu_devices`, else XLA_FLAGS'
  --xla_force_host_platform_device_count, else 1)."""
  n = jax.config.jax_num_cpu_devices
  if n is not None and n > 0:
    return int(n)
  m = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
  return int(m.group(1)) if m else 1


def keep_freed_host_memory(cpu_devices: int | None = None) -> bool:
  """glibc only (Linux): large allocations from the heap, not one `mmap` each (`M_MMAP_MAX` 0; the
  heap still falls back to `mmap` when it cannot grow) and the heap never trimmed
  (`M_TRIM_THRESHOLD` -1). With one CPU device (`cpu_devices`, default `configured_cpu_devices()`)
  also one arena for every thread (`M_ARENA_MAX` 1), so that XLA's worker threads reuse what the
  others freed (with glibc's per-thread arenas a training step still faulted in 635k pages); with
  simulated devices glibc's default arenas (their threads contend for one arena's lock: 8-device
  tests/test_sharding.py took 88 s against 56-64 s). Threads keep the arena they have: call it
  before JAX's first computation (`parallel.distributed.initialize` calls it again with its device
  count). Returns whether it applied: not with `LONGCAT_JAX_MALLOC=system`, not off glibc."""
  if os.environ.get("LONGCAT_JAX_MALLOC", "keep") == "system" or not sys.platform.startswith("linux"):
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt  # the symbols already loaded into this process: libc's
  except (OSError, AttributeError):  # not glibc (musl has no mallopt)
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  arenas = 1 if (configured_cpu_devices() if cpu_devices is None else cpu_devices) <= 1 else 0  # 0: glibc's default
  return all(mallopt(param, value) == 1 for param, value in
             ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_ARENA_MAX, arenas)))  # -1: never trim
