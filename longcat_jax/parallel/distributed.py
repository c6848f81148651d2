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

import os
from typing import Mapping, Sequence

import jax
import numpy as np
from jax._src import distributed as jax_distributed  # the coordination client has no public accessor

from longcat_jax import platforms
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
    platforms.keep_freed_host_memory(num_cpu_devices)   # its arena setting depends on the device count
  kwargs.setdefault("heartbeat_timeout_seconds", HEARTBEAT_TIMEOUT_S)
  kwargs.setdefault("shutdown_timeout_seconds", SHUTDOWN_TIMEOUT_S)
  jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids,
                             **kwargs)


_ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
        "process_id": "JAX_PROCESS_ID"}


def _cluster_detected() -> bool:
  """A multi-process launcher JAX can read its process group from (SLURM, Open MPI, TPU pods)."""
  env = os.environ
  return (int(env.get("SLURM_NTASKS", "1") or 1) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
          or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def initialize_from(*, coordinator_address: str | None = None, num_processes: int | None = None,
                    process_id: int | None = None, num_cpu_devices: int | None = None,
                    heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S) -> bool:
  """The command-line entry: joins a process group when one is asked for and returns whether it did.

  Explicit arguments win, then the environment (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
  `JAX_PROCESS_ID`), then JAX's own cluster detection (SLURM, Open MPI, Cloud TPU pods). With
  none of them the run is single-process. On CPU the collectives go over gloo (simulated hosts);
  `num_cpu_devices` simulates that many CPU devices per process; after `heartbeat_timeout_s`
  without a heartbeat a process counts as lost (the others stop with an error naming it).
  """
  given = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
  for k, var in _ENV.items():
    if given[k] is None and os.environ.get(var):
      given[k] = os.environ[var] if k == "coordinator_address" else int(os.environ[var])
  if num_cpu_devices is not None:
    jax.config.update("jax_num_cpu_devices", int(num_cpu_devices))
  if all(v is None for v in given.values()) and not _cluster_detected():
    return False
  if given["num_processes"] == 1:
    return False
  initialize(given["coordinator_address"], given["num_processes"], given["process_id"], cpu_collectives="gloo",
             heartbeat_timeout_seconds=int(heartbeat_timeout_s))
  return True


def barrier(name: str, timeout_s: float = 600.0) -> None:
  """Waits until every process reaches `name` (the coordination service's barrier, not a device
  collective; a no-op in one process). The trainer passes one after compiling the step: a
  device collective (gloo on CPU) gives its peers only ~30 s to arrive, less than the compile-time
  skew between processes on a loaded machine."""
  if jax.process_count() == 1:
    return
  jax_distributed.global_state.client.wait_at_barrier(name, int(timeout_s * 1000))


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


def process_batch_shard(mesh, rules=sharding.LOGICAL_AXIS_RULES) -> tuple[int, int]:
  """(shard index, shard count): which contiguous 1/count of the global batch this process feeds.

  The mesh splits the batch into `batch shards`; this process's devices hold some of them. With
  process-major device order they are a contiguous run, the same length on every process:
  shard index = first shard // run length, count = shards // run length. Processes whose
  devices hold the same rows (the batch replicated over an axis that spans processes) get the
  same index and read the same rows.
  """
  spec = sharding.batch_spec(mesh, rules)[0]
  axes = () if spec is None else ((spec,) if isinstance(spec, str) else tuple(spec))
  pos = [mesh.axis_names.index(a) for a in axes]
  sizes = [mesh.devices.shape[p] for p in pos]
  linear = lambda c: int(np.ravel_multi_index(tuple(c[p] for p in pos), sizes)) if pos else 0
  mine = sorted({linear(c) for c in np.ndindex(mesh.devices.shape)
                 if mesh.devices[c].process_index == jax.process_index()})
  total = int(np.prod(sizes)) if sizes else 1
  run = len(mine)
  if not mine or mine != list(range(mine[0], mine[0] + run)) or mine[0] % run or total % run:
    raise ValueError(f"process {jax.process_index()} holds batch shards {mine} of {total} on mesh "
                     f"{dict(mesh.shape)}: not a contiguous, aligned block (order the devices process-major)")
  return mine[0] // run, total // run


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
