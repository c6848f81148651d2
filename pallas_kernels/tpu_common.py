"""Shared by the TPU (Mosaic) kernels: what `interpret=` means for them, and tile arithmetic.

The registry passes `interpret=True|False` to every Pallas kernel. A TPU kernel runs `True` in
Pallas's TPU interpret mode (`pltpu.InterpretParams`: TPU memory spaces, DMAs and semaphores
simulated on the CPU), not the generic interpreter, which knows nothing of DMAs. Tests pass an
`InterpretParams(detect_races=True)` instead of `True` to run the race detector.
"""

from __future__ import annotations

import jax.experimental.pallas.tpu as pltpu
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as _tpu_interpreter  # races: no public accessor

LANES, SUBLANES = 128, 8  # a TPU vector register is [8, 128] 32-bit values


def interpret_params(interpret) -> pltpu.InterpretParams | bool:
  """`True` -> the TPU interpreter with default parameters; False / InterpretParams as given."""
  if interpret is True:
    return pltpu.InterpretParams()
  return interpret


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def races_found() -> bool:
  """Whether the TPU interpreter's race detector has reported a race since its state was reset
  (`pltpu.reset_tpu_interpret_mode_state()`)."""
  races = _tpu_interpreter.races
  return bool(races is not None and races.races_found)
