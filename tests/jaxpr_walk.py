"""Walks a jaxpr with its sub-jaxprs (loops, custom VJPs, shard_maps, Pallas kernels) for tests
that assert what a traced program contains."""

import jax
import numpy as np


def equations(jaxpr):
  """Every equation of `jaxpr`, those of nested jaxprs included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from equations(sub)


def largest_intermediate(fn, *args) -> int:
  """Element count of the largest value anywhere in fn's jaxpr (nested jaxprs included)."""
  return max(int(np.prod(v.aval.shape)) for e in equations(jax.make_jaxpr(fn)(*args).jaxpr)
             for v in e.outvars if hasattr(v.aval, "shape"))
