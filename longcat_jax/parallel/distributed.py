"""Multi-host: process-group initialisation and per-process data feeding.

Every process runs the same program. `initialize()` joins the process group (explicit coordinator
arguments, or JAX's own detection of SLURM / Open MPI / Kubernetes / TPU pods when none are
given); `make_mesh()` then spans every process's devices (`jax.devices()` is global), and each
process feeds only its own rows with `global_batch()`:

    from longcat_jax.parallel import distributed, sharding
    distributed.initialize()                                  # or coordinator_address=..., ...
    mesh = sharding.make_mesh(sharding.parallel_config(mesh=dict(fsdp=-1, expert=8)))
    it = make_train_iterator(store, seq, global_batch_size)   # this process's rows
    batch = distributed.global_batch(next(it), mesh)          # global jax.Arrays [B, S]

The launch recipe (one command per host) is in docs/SCALING.md.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np

from longcat_jax.parallel import sharding

# A process that stops sending heartbeats this long is declared dead and every other process is
# stopped (instead of hanging in a collective); JAX's defaults are 100 s and 300 s.
HEARTBEAT_TIMEOUT_S = 60
SHUTDOWN_TIMEOUT_S = 60


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: int | Sequence[int] | None = None, *,
               cpu_collectives: str | None = None, num_cpu_devices: int | None = None,
               **kwargs) -> None:
  """Joins the JAX process group (a no-op when already joined).

  With `coordinator_address` ("host:port" of process 0), `num_processes` and `process_id` the
  group is explicit; with none of them JAX detects the cluster from the environment (SLURM,
  Open MPI, Kubernetes, Cloud TPU). `cpu_collectives` ("gloo" or "mpi") and `num_cpu_devices`
  configure the CPU backend (simulated multi-host runs); they must be set before any device is
  touched. Extra keyword arguments go to `jax.distributed.initialize`; `heartbeat_timeout_seconds`
  and `shutdown_timeout_seconds` default to HEARTBEAT_TIMEOUT_S / SHUTDOWN_TIMEOUT_S here.
  """
  if jax.distributed.is_initialized():
    return
  explicit = (coordinator_address, num_processes, process_id)
  if any(a is not None for a in explicit) and any(a is None for a in explicit):
    raise ValueError(f"coordinator_address={coordinator_address!r}, num_processes={num_processes!r} "
                     f"and process_id={process_id!r}: give all three, or none to auto-detect")
  if cpu_collectives is not None:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  if num_cpu_devices is not None:
    jax.config.update("jax_num_cpu_devices", num_cpu_devices)
  kwargs.setdefault("heartbeat_timeout_seconds", HEARTBEAT_TIMEOUT_S)
  kwargs.setdefault("shutdown_timeout_seconds", SHUTDOWN_TIMEOUT_S)
  jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids,
                             **kwargs)


def global_batch(local: Mapping[str, np.ndarray], mesh, rules=sharding.LOGICAL_AXIS_RULES):
  """This process's rows {name: [B_local, S]} -> global jax.Arrays {name: [B, S]} on the mesh.

  Uses `jax.make_array_from_process_local_data`: each process passes the rows its own devices
  hold; which global rows they become is fixed by the mesh (process-major along `batch`). B is
  B_local times the batch shards of the mesh over the batch shards this process holds (B_local *
  process count when the batch axes span the processes).
  """
  out = {}
  num_shards, local_shards = _batch_shards(mesh, rules)
  for k, v in local.items():
    v = np.asarray(v)
    if v.shape[0] % local_shards:
      raise ValueError(f"{k}: {v.shape[0]} local rows are not divisible by the {local_shards} batch "
                       "shards this process's devices hold")
    shape = (v.shape[0] * num_shards // local_shards,) + v.shape[1:]
    sh = sharding.batch_sharding(mesh, rules, shape)
    out[k] = jax.make_array_from_process_local_data(sh, v, shape)
  return out


def _batch_shards(mesh, rules) -> tuple[int, int]:
  """(batch shards in the mesh, distinct batch shards held by this process's devices)."""
  spec = sharding.batch_spec(mesh, rules)[0]
  axes = () if spec is None else ((spec,) if isinstance(spec, str) else tuple(spec))
  pos = [mesh.axis_names.index(a) for a in axes]
  mine = {tuple(c[p] for p in pos) for c in np.ndindex(mesh.devices.shape)
          if mesh.devices[c].process_index == jax.process_index()}
  return int(np.prod([mesh.shape[a] for a in axes])), len(mine)


def process_rows(global_batch_size: int) -> slice:
  """The rows of a global batch that this process feeds (for deterministic per-process slicing
  of a host-global batch in tests and evaluation)."""
  n, i = jax.process_count(), jax.process_index()
  if global_batch_size % n:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by the {n} processes")
  per = global_batch_size // n
  return slice(i * per, (i + 1) * per)


def to_host(tree):
  """Gathers (possibly non-addressable) global arrays to numpy on every process."""
  from jax.experimental import multihost_utils
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)
