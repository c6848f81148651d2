"""Which JAX platforms to open: a CPU host with `libtpu` installed behaves as one without it.

`libtpu` (the `.[tpu]` extra, also in `.[test]`) registers JAX's TPU backend. On a machine with
no TPU, JAX would still try to open one when it starts its backends: libtpu logs errors about
TPU worker hostnames and accelerator type to stderr, then JAX falls back to the CPU. That extra
noise (and any cost of the probe) is the only difference; `keep_cpu_without_tpu()` removes it by
restricting JAX to the CPU on exactly those machines. Compile-only TPU devices
(`jax.experimental.topologies`, longcat_jax/parallel/tpu_target.py) do not need the TPU backend
and keep working.
"""

from __future__ import annotations

import importlib.util
import os

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
