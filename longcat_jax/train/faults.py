"""What a long run survives, and how it ends when it cannot: preemption, lost processes, silent
data corruption, one-line errors.

    with faults.one_line_errors(workdir):          # the command-line front end (experiments/train.py)
      with faults.Preemption() as preempt:         # SIGTERM / SIGINT -> stop after the step in flight
        for step in ...:
          state, m = step_fn(state, batch)
          if sdc_due: state, m = faults.recheck_step(step_fn, prev, batch, (state, m), step)
          stop = preempt.should_stop(step)         # every process agrees on the step
          ckpt.save(step, state, ..., force=stop)
          if stop: ckpt.wait(); log(preempt.message(step)); break

Preemption. One process: a Python handler sets a flag. Several processes (`jax.distributed`):
JAX's coordination service already installs a SIGTERM notifier and runs the sync protocol
(`multihost_utils.reached_preemption_sync_point`: the notice reaches every process and they pick
the same step, the max step seen plus one); SIGINT is handed to it by re-sending SIGTERM to this
process, so Ctrl-C on one host stops all of them at the same step too. A second SIGINT raises
KeyboardInterrupt at once.

Lost processes. `jax.distributed` is initialised with an explicit heartbeat timeout
(`parallel.distributed.initialize(..., heartbeat_timeout_seconds=...)`); when a peer dies, a CPU
(gloo) collective fails at once and an accelerator collective is ended by the coordination service
within that timeout. `describe(exc)` turns such an error into one line naming the lost processes
(`lost_processes`, from the coordination service's live-node list).

SDC check. `recheck_step` reruns a step on the same inputs and compares the gradients bitwise
(`metrics["grad_checksum"]`, see `checksum.tree_checksum`); XLA:CPU and TPU are deterministic,
and so are our kernels; on GPU, XLA's scatter-add and reductions with atomics are not unless
`XLA_FLAGS=--xla_gpu_deterministic_ops=true` (needed for this check there).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Callable

import jax
import numpy as np
from jax._src import distributed as jax_distributed  # client, preemption manager: no public API
from jax.experimental import multihost_utils

from longcat_jax.train.checkpoint import CheckpointError, short_reason

LOG_NAME = "train.log"


def _log(msg: str) -> None:
  print(msg, flush=True)


# ----------------------------------------------------------------------------- preemption

def _jax_preemption_service() -> bool:
  """Whether JAX's multi-process preemption sync manager is running in this process."""
  state = jax_distributed.global_state
  return state.client is not None and state.preemption_sync_manager is not None


class Preemption:
  """SIGTERM / SIGINT -> `should_stop(step)` turns True at a step all processes agree on."""

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT), log: Callable[[str], None] = _log):
    self.log = log
    self.received: str | None = None
    self.multi = _jax_preemption_service()
    self._previous = {}
    for sig in signals:
      if self.multi and sig == signal.SIGTERM:
        continue  # JAX's notifier owns SIGTERM and propagates it to every process
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: no handlers, never stops early
        break

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    name = signal.Signals(signum).name
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt(f"second {name}")
    self.received = name
    self.log(f"{name} received: finishing the step in flight, then saving a checkpoint and exiting")
    if self.multi:
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption notifier: all processes agree

  def should_stop(self, step: int) -> bool:
    """Call once per step on every process, from the same first step on (JAX's protocol)."""
    if self.multi:
      return bool(multihost_utils.reached_preemption_sync_point(int(step)))
    return self.received is not None

  def message(self, step: int, checkpoint: str) -> str:
    who = self.received or "SIGTERM"
    procs = f" (all {jax.process_count()} processes agreed on the step)" if self.multi else ""
    return (f"preempted ({who}): stopped after step {step}{procs}; checkpoint saved to {checkpoint}; "
            "run the same command to resume")

  def close(self) -> None:
    for sig, prev in self._previous.items():
      signal.signal(sig, prev)
    self._previous = {}

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ----------------------------------------------------------------------------- lost processes

_PEER = re.compile(r"Gloo|Connection (closed|reset) by peer|heartbeat|UNAVAILABLE|unhealthy|"
                   r"coordination service|Socket closed|NCCL|barrier", re.IGNORECASE)


def lost_processes(timeout_s: float = 120.0) -> list[int] | None:
  """Process ids the coordination service no longer counts as alive (None: unknown / timed out).

  Blocks until the service has decided (at most its heartbeat timeout); run in a thread so a
  broken service cannot hang the caller past `timeout_s`.
  """
  client, n = jax_distributed.global_state.client, jax.process_count()
  if client is None or n == 1:
    return None
  out = {}

  def query():
    try:
      out["live"] = set(client.get_live_nodes(list(range(n))))
    except Exception as e:  # pylint: disable=broad-except
      out["error"] = e

  t = threading.Thread(target=query, daemon=True)
  t.start()
  t.join(timeout_s)
  return sorted(set(range(n)) - out["live"]) if "live" in out else None


def coordinator_reachable(timeout_s: float = 2.0) -> bool:
  """Whether process 0's coordination service still accepts connections (a plain TCP connect: a
  dead coordinator makes the JAX client abort this process, so it is not asked first)."""
  addr = jax_distributed.global_state.coordinator_address
  if not addr or jax.process_index() == 0:
    return True
  host, _, port = addr.rpartition(":")
  try:
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
      return True
  except OSError:
    return False


def is_peer_failure(exc: BaseException) -> bool:
  """Whether `exc` looks like another process of a multi-process run having gone away."""
  if jax.process_count() == 1:
    return False
  x, seen = exc, 0
  while x is not None and seen < 20:
    if _PEER.search(str(x)):
      return True
    x, seen = x.__cause__ or x.__context__, seen + 1
  return False


def describe(exc: BaseException) -> str:
  """One line for the console: our own errors verbatim, else type + message (see `peer_failure_line`)."""
  if isinstance(exc, (CheckpointError, SilentCorruption, RunStopped)):
    return str(exc)
  return short_reason(exc)


def write_peer_failure(exc: BaseException, out, lost_timeout_s: float = 120.0) -> None:
  """Writes ONE line for a lost process to `out`, in two parts: what failed (flushed at once), then
  which processes the coordination service no longer sees. The service answers at its heartbeat
  timeout, the same moment it may terminate this process; the first part is out by then."""
  out.write(f"error: process {jax.process_index()} of {jax.process_count()}: a collective failed "
            f"({short_reason(exc, 200)}); ")
  out.flush()
  lost = [0] if not coordinator_reachable() else lost_processes(lost_timeout_s)
  who = (f"lost process{'es' if len(lost) > 1 else ''} {', '.join(map(str, lost))}" if lost
         else "another process is gone")
  out.write(f"{who}; stopping. Rerun all processes to resume from the last checkpoint\n")
  out.flush()


class RunStopped(RuntimeError):
  """The run stopped on purpose (e.g. too many loss spikes in a row); the message says why."""


# ----------------------------------------------------------------------------- hangs

class Watchdog:
  """Ends the process with one line when no step finishes for `timeout_s` seconds.

  Heartbeats catch a dead process, not a live one that is stuck (a hung filesystem read on one
  host while the others wait in a collective): this does. Armed by the first `pet` (after the
  first step, so compilation does not count). `on_timeout(line)` defaults to writing the line to
  the console and `os._exit(1)`.
  """

  def __init__(self, timeout_s: float, on_timeout: Callable[[str], None] | None = None):
    self.timeout_s = float(timeout_s)
    self.on_timeout = on_timeout or _exit_with_line
    self._last = None  # (step, time)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._watch, name="step_watchdog", daemon=True)
    self._thread.start()

  def pet(self, step: int) -> None:
    self._last = (int(step), time.monotonic())

  def _watch(self):
    while not self._stop.wait(min(1.0, self.timeout_s / 4)):
      last = self._last
      if last is not None and time.monotonic() - last[1] > self.timeout_s:
        lost = lost_processes(10.0) if jax.process_count() > 1 else None
        who = f"; lost process(es) {lost}" if lost else ""
        self.on_timeout(f"error: process {jax.process_index()} of {jax.process_count()}: no step finished in "
                        f"{self.timeout_s:g}s after step {last[0]} (a hung collective, data read or "
                        f"filesystem?){who}; stopping. The last checkpoint is intact")
        return

  def close(self) -> None:
    self._stop.set()


_CONSOLE = None  # the real console while `one_line_errors` sends stderr to the log


def _exit_with_line(line: str) -> None:
  out = _CONSOLE or sys.stderr
  sys.stdout.flush()
  out.write(line + "\n")
  out.flush()
  os._exit(1)  # pylint: disable=protected-access


# ----------------------------------------------------------------------------- one clear error

@contextlib.contextmanager
def one_line_errors(workdir: str, log_name: str = LOG_NAME, *, lost_timeout_s: float = 120.0):
  """Runs the body with stderr (Python, C++ and absl logging) and background-thread errors going
  to `workdir/log_name`; an exception ends the process with ONE console line and exit code 1
  (130 for a second Ctrl-C), via `os._exit` so no background thread (orbax's savers, the
  distributed client's shutdown) prints after it."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.abspath(os.path.join(workdir, log_name))
  logf = open(path, "a", buffering=1)  # pylint: disable=consider-using-with
  logf.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: {' '.join(sys.argv)}\n")
  sys.stdout.flush()
  sys.stderr.flush()
  global _CONSOLE
  console = _CONSOLE = os.fdopen(os.dup(2), "w", buffering=1)
  os.dup2(logf.fileno(), 2)
  old_thread_hook, old_unraisable = threading.excepthook, sys.unraisablehook

  def to_log(write):  # the log may be on the disk that just filled up: never fail on it
    try:
      write()
      logf.flush()
    except Exception:  # pylint: disable=broad-except
      pass

  def thread_hook(args):
    to_log(lambda: logf.write(f"exception in thread {getattr(args.thread, 'name', '?')}:\n" + "".join(
        traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))))

  def unraisable_hook(u):
    to_log(lambda: logf.write(f"unraisable exception ({u.err_msg or ''}):\n" + "".join(
        traceback.format_exception(u.exc_type, u.exc_value, u.exc_traceback))))

  threading.excepthook, sys.unraisablehook = thread_hook, unraisable_hook

  def die(line: str | None, code: int):
    sys.stdout.flush()
    console.write(f"{line}\n" if line else "")
    console.write(f"  (details: {path})\n")
    console.flush()
    os._exit(code)  # pylint: disable=protected-access

  try:
    yield path
  except SystemExit as e:
    if e.code not in (0, None):
      to_log(lambda: traceback.print_exc(file=logf))
      die(f"error: exit status {e.code}", e.code if isinstance(e.code, int) else 1)
    raise
  except KeyboardInterrupt:
    to_log(lambda: traceback.print_exc(file=logf))
    die("interrupted (second SIGINT): stopped without saving; the last checkpoint is intact", 130)
  except BaseException as e:  # pylint: disable=broad-except
    to_log(lambda: traceback.print_exc(file=logf))
    if is_peer_failure(e):
      sys.stdout.flush()
      write_peer_failure(e, console, lost_timeout_s)
      die(None, 1)
    die(f"error: {describe(e)}", 1)
  finally:
    threading.excepthook, sys.unraisablehook = old_thread_hook, old_unraisable


# ----------------------------------------------------------------------------- SDC check

class SilentCorruption(RuntimeError):
  """Three runs of the same step on the same inputs gave three different gradients."""


def _fingerprint(metrics) -> bytes:
  return np.asarray(metrics["grad_checksum"]).tobytes() + np.asarray(metrics["loss"], np.float32).tobytes()


def recheck_step(step_fn, state, batch, result, step: int, log: Callable[[str], None] = _log):
  """(new_state, metrics) of step `step`, verified: reruns `step_fn(state, batch)` and compares the
  gradient checksum and loss bit for bit with `result`. On a mismatch, logs it and runs the step a
  third time, keeping a result two runs agree on (SilentCorruption if none do).

  `state` must still be alive (not donated to the first run); metrics are host numpy.
  """
  def run():
    new, m = step_fn(state, batch)
    return new, jax.device_get(m)

  first = result
  second = run()
  a, b = _fingerprint(first[1]), _fingerprint(second[1])
  if a == b:
    return first
  log(f"step {step}: SDC check failed: two runs of the step on the same inputs gave different gradients "
      f"(checksums {a[:8].hex()} vs {b[:8].hex()}); redoing the step")
  third = run()
  c = _fingerprint(third[1])
  if c in (a, b):
    log(f"step {step}: redone; the third run agrees with the {'first' if c == a else 'second'}, kept")
    return first if c == a else second
  raise SilentCorruption(f"step {step}: three runs of the step on the same inputs gave three different gradients "
                         f"(checksums {a[:8].hex()}, {b[:8].hex()}, {c[:8].hex()}): this device or host is "
                         "not computing reliably")
