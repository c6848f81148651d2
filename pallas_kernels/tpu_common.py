"""Shared by the TPU (Mosaic) kernels: what `interpret=` means for them, and tile arithmetic.

The registry passes `interpret=True|False` to every Pallas kernel. A TPU kernel runs `True` in
Pallas's TPU interpret mode (`pltpu.InterpretParams`: TPU memory spaces, DMAs and semaphores
simulated on the CPU), not the generic interpreter, which knows nothing of DMAs. Tests pass an
`InterpretParams(detect_races=True)` instead of `True` to run the race detector
(tests/test_tpu.py checks every call's detector state).
"""

from __future__ import annotations

import math

import jax
import jax.experimental.pallas.tpu as pltpu
from jax.sharding import AxisType, PartitionSpec as P

LANES, SUBLANES = 128, 8  # a TPU vector register is [8, 128] 32-bit values


def interpret_params(interpret) -> pltpu.InterpretParams | bool:
  """`True` -> the TPU interpreter with default parameters; False / InterpretParams as given."""
  if interpret is True:
    return pltpu.InterpretParams()
  return interpret


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


# ---------------------------------------------------------------------------------------------
# Running a one-device kernel under a mesh.
#
# XLA cannot partition a Mosaic custom call ("Mosaic kernels cannot be automatically partitioned.
# Please wrap the call in a shard_map"). The attention kernels are independent per sequence and
# per head, so under a mesh each device runs the kernel on its own rows and heads: a `shard_map`
# over the ambient mesh's automatic axes (`jax.set_mesh`, as the trainer's mesh context sets it),
# sequences split over every axis except `tensor` that divides the batch (in mesh order, the
# innermost dropped first, as `sharding.fit_batch_rules` does), heads over `tensor` when it
# divides them; an axis that splits neither replicates the work (a context axis splitting the
# sequence would, but the model's context-parallel path has its own shard_map). Whatever the
# operands' actual sharding, the result is the same (XLA reshards at the boundary if they
# differ). Inside another shard_map (manual axes) only the remaining automatic axes are used.

HEAD_AXIS = "tensor"


def _auto_axes(mesh) -> list[str]:
  return [a for a, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Auto]


def _dividing(axes, size: int, mesh) -> tuple[str, ...]:
  axes = list(axes)
  while axes and size % math.prod(mesh.shape[a] for a in axes):
    axes.pop()
  return tuple(axes)


def on_each_device(fn, args, layouts, out_layout):
  """fn(*args) per device under the ambient mesh; without one (or with no automatic axis > 1)
  just fn(*args). layouts: per arg, a tuple with "B" at the sequence (batch) dimension, "H" at
  the heads dimension, None elsewhere (None for an arg that is None); out_layout likewise (a
  tuple of them for several outputs)."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = [] if mesh.empty else _auto_axes(mesh)
  if not axes or mesh.size == 1:
    return fn(*args)
  size_of = lambda tag: next(x.shape[lay.index(tag)] for x, lay in zip(args, layouts)
                             if lay is not None and tag in lay)
  split = [a for a in axes if mesh.shape[a] > 1]
  batch = _dividing([a for a in split if a != HEAD_AXIS], size_of("B"), mesh)
  heads = _dividing([a for a in split if a == HEAD_AXIS], size_of("H"), mesh) if any(
      lay is not None and "H" in lay for lay in layouts) else ()
  resolve = {"B": batch or None, "H": heads or None, None: None}
  spec = lambda lay: None if lay is None else P(*(resolve[t] for t in lay))
  out_specs = (tuple(spec(o) for o in out_layout) if isinstance(out_layout[0], tuple)
               else spec(out_layout))
  # Every automatic axis becomes manual (Mosaic wants no automatic axis left, even of size 1);
  # the ones that split nothing replicate the kernel's work.
  return jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec(l) for l in layouts), out_specs=out_specs,
                       axis_names=set(axes), check_vma=False)(*args)
