"""Test setup: 8 simulated CPU devices (before JAX initialises), float32 matmuls at full precision."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

sys.path.insert(0, os.path.dirname(__file__))  # tests/hf_reference.py
