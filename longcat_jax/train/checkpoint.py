"""Resumable training checkpoints with orbax's `CheckpointManager`, verified by per-array checksums.

    ckpt = Checkpointer(workdir + "/checkpoints", every=100, keep=3, on_save_error="stop")
    ckpt.save(step, state, data=iterator.get_state(), meta={"config": ...})   # async
    state, data, meta, step = ckpt.restore_intact(abstract_state)   # newest checkpoint that verifies
    ckpt.close()

A checkpoint holds everything a bitwise-identical resume needs: the `TrainState` (step, params,
optimizer state, expert bias, rng, spike-guard statistics), the data iterator's state and a JSON
`meta` (the config, and the checksums below).

Saves are asynchronous: `save` returns once the arrays are copied off the accelerator and a
background thread writes them. Orbax writes each step into `<step>.orbax-checkpoint-tmp` and
renames it into place only when it is complete, so a process killed mid-save leaves the previous
checkpoints intact; a leftover temporary directory is never listed as a checkpoint, and is removed
(and named) when the next run opens the directory.

Integrity. Orbax's zstd chunks carry no checksum: a flipped byte in an array file is, as often as
not, restored silently as garbage. So `save` stores in `meta["integrity"]` a 64-bit checksum of
every state array (`checksum.tree_checksums`: of the GLOBAL value, exact integer sums on device,
so the same on any mesh or process count) and a SHA-256 of the data-iterator state; `restore`
recomputes and compares them, raising `CorruptCheckpoint` naming the step, the array and the item
directory. `restore` returns `meta` without that entry. `restore_intact` walks from the newest checkpoint back
and restores the newest one that reads and verifies, saying which ones it skipped and why, and
renames those to `<step>.corrupt` (`strict=True` refuses instead); on several processes a step
counts as intact only if it restores on all of them, so they all resume from the same one.

Save failures (no space, no permission, a vanished directory) raise, or with
`on_save_error="retry"` log, one `SaveError` line naming the step, the path, the reason and the
last good checkpoint; the failed step's temporary directory is removed.

Restoring onto another mesh (resharding) is a matter of the target: `abstract_state` leaves are
`jax.ShapeDtypeStruct(shape, dtype, sharding=...)` with the NEW shardings (`with_shardings`).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from longcat_jax.train.checksum import json_checksum, tree_checksums

ON_SAVE_ERROR = ("stop", "retry")
TMP_MARKER = ".orbax-checkpoint-tmp"
INTEGRITY_VERSION = 1


class CheckpointError(RuntimeError):
  """A checkpoint problem, described in one line (path, reason, what is left)."""


class CorruptCheckpoint(CheckpointError):
  """A checkpoint that cannot be read back, or reads back different bytes than were saved."""


class SaveError(CheckpointError):
  """A save that did not produce a complete checkpoint."""


def verify(state, data, saved: dict | None, where: str) -> None:
  """Raises CorruptCheckpoint naming the first array (or the data state) that does not match
  the checksums `saved` (meta["integrity"]). A checkpoint without checksums (written before they
  existed) passes."""
  if not saved:
    return
  got = tree_checksums(state)
  for key, want in saved["state"].items():
    if key not in got:
      raise CorruptCheckpoint(f"{where}/state: array {key} is missing")
    if got[key] != want:
      raise CorruptCheckpoint(f"{where}/state: array {key} checksum mismatch "
                              f"(saved {want}, read {got[key]}): the file holding it is corrupt")
  if json_checksum(data) != saved["data"]:
    raise CorruptCheckpoint(f"{where}/data: data-iterator state checksum mismatch")


# ----------------------------------------------------------------------------- error text

_STATUS = re.compile(r"\b(DATA_LOSS|NOT_FOUND|FAILED_PRECONDITION|RESOURCE_EXHAUSTED|PERMISSION_DENIED|"
                     r"INVALID_ARGUMENT|UNAVAILABLE|INTERNAL|UNKNOWN|OUT_OF_RANGE|ABORTED): ")


def short_reason(exc: BaseException, limit: int = 400) -> str:
  """One line for an exception chain: the innermost TensorStore status or OS error if any
  (they name the file), else the outermost message; TensorStore specs are cut off."""
  chain, x = [], exc
  while x is not None and len(chain) < 20:
    chain.append(x)
    x = x.__cause__ or x.__context__
  best = None
  for x in chain:
    text = str(x)
    if _STATUS.search(text) or isinstance(x, OSError):
      best = x
  x = best or exc
  if isinstance(x, OSError) and x.strerror:
    text = f"{x.strerror}" + (f": {x.filename}" if x.filename else "") + f" (errno {x.errno})"
  else:
    text = str(x)
    m = _STATUS.search(text)
    if m:
      text = text[m.start():]
    text = text.split(" [tensorstore_spec=")[0].split("\n")[0].strip() or type(x).__name__
    if not m:
      text = f"{type(x).__name__}: {text}"
  return text if len(text) <= limit else text[:limit // 2] + " ... " + text[-(limit // 2):]  # the cause is at the end


# ----------------------------------------------------------------------------- the checkpointer

def _log(msg: str) -> None:
  print(msg, flush=True)


class Checkpointer:
  """`TrainState` + data-iterator state + JSON metadata per step, keep-last-K, async, verified."""

  def __init__(self, directory: str, *, every: int = 100, keep: int = 3, async_save: bool = True,
               on_save_error: str = "stop", read_only: bool = False, log: Callable[[str], None] = _log):
    if on_save_error not in ON_SAVE_ERROR:
      raise ValueError(f"on_save_error={on_save_error!r} must be one of {ON_SAVE_ERROR}")
    self.directory = os.path.abspath(directory)
    self.on_save_error = on_save_error
    self.log = log
    self._pending: int | None = None  # step of the async save in flight
    if read_only and not os.path.isdir(self.directory):
      raise FileNotFoundError(f"{self.directory}: no such checkpoint directory")
    if not read_only:
      self._remove_unfinished(announce=True)
    self._options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(1, int(every)), max_to_keep=keep, create=not read_only,
        cleanup_tmp_directories=not read_only, enable_async_checkpointing=async_save, read_only=read_only)
    self.manager = self._open()

  def _open(self):
    return ocp.CheckpointManager(self.directory, options=self._options, item_names=("state", "data", "meta"))

  def _remove_unfinished(self, step: int | None = None, announce: bool = False) -> None:
    """Deletes temporary directories of unfinished saves (all, or of `step`); primary process only."""
    if jax.process_index() != 0 or not os.path.isdir(self.directory):
      return
    pattern = f"{'*' if step is None else step}{TMP_MARKER}*"
    for path in sorted(glob.glob(os.path.join(self.directory, pattern))):
      if announce:
        self.log(f"removing {path}: an unfinished save (not a checkpoint)")
      shutil.rmtree(path, ignore_errors=True)

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  # -- saving

  def save(self, step: int, state, *, data: dict | None = None, meta: dict | None = None,
           force: bool = False) -> bool:
    """Saves if `step` is due (every N steps) or `force`; returns whether a save started.

    Checks first whether the previous async save failed (see `on_save_error`).
    """
    self.check()
    step = int(step)
    if not (force or self.manager.should_save(step)):
      return False
    if self._pending is not None:
      self.wait()  # orbax would wait for it anyway; this way its failure is reported as its own
    data = data or {}
    meta = dict(meta or {}, integrity={"version": INTEGRITY_VERSION, "state": tree_checksums(state),
                                       "data": json_checksum(data)})
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
                              meta=ocp.args.JsonSave(meta))
    self._pending = step
    try:
      self._probe_writable()
      started = self.manager.save(step, args=args, force=force)
    except Exception as e:  # pylint: disable=broad-except
      self._failed(e)
      return False
    if not started:
      self._pending = None
    return started

  def _probe_writable(self) -> None:
    """Raises OSError at once if the directory is gone, read-only or not ours to write (orbax's
    async save would otherwise wait minutes on a directory it failed to create)."""
    probe = os.path.join(self.directory, f".write_probe.{jax.process_index()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)

  def check(self) -> None:
    """Surfaces the error of a finished async save (no-op while it is still writing)."""
    if self._pending is None:
      return
    try:
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      self._failed(e)

  def wait(self) -> None:
    """Blocks until a pending async save is on disk (or handles its failure)."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._failed(e)
    self._pending = None

  def _failed(self, exc: BaseException) -> None:
    step, self._pending = self._pending, None
    try:
      self.manager.close()
    except Exception:  # pylint: disable=broad-except
      pass  # the same error again; the log file has it
    self._remove_unfinished(step)
    self.manager = self._open()  # re-reads the directory: only complete checkpoints are listed
    last = self.latest_step()
    last_text = f"step {last} ({self.step_dir(last)})" if last is not None else "none"
    msg = (f"checkpoint save of step {step} to {self.step_dir(step)} failed: {short_reason(exc)}; "
           f"last good checkpoint: {last_text}")
    if self.on_save_error == "stop":
      raise SaveError(msg) from exc
    self.log(msg + "; training continues, retrying at the next interval")

  # -- restoring

  def _saved_fields(self, step: int) -> set[str] | None:
    """Top-level names in the saved state tree (None when the metadata is unreadable)."""
    try:
      with open(os.path.join(self.step_dir(step), "state", "_METADATA")) as f:
        keys = json.load(f)["tree_metadata"]
    except Exception:  # pylint: disable=broad-except
      return None
    return {re.match(r"\('([^']*)'", k).group(1) for k in keys if re.match(r"\('([^']*)'", k)}

  def restore(self, abstract_state, step: int | None = None, *, defaults: dict | None = None
              ) -> tuple[Any, dict, dict]:
    """(state, data, meta) of `step` (default: the latest), laid out as `abstract_state`, verified.

    `defaults`: values for dataclass fields of `abstract_state` that an older checkpoint lacks
    (e.g. {"guard": ...} for checkpoints written before the spike guard). Raises
    CorruptCheckpoint naming the step directory, the file or array, and the reason.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{self.directory}: no complete checkpoint to restore")
    where = self.step_dir(step)
    _check_files(where)
    target, missing = abstract_state, {}
    saved = self._saved_fields(step)
    if dataclasses.is_dataclass(abstract_state) and saved is not None:
      names = [f.name for f in dataclasses.fields(abstract_state)]
      absent = [n for n in names if n not in saved]
      if absent:
        unknown = [n for n in absent if n not in (defaults or {})]
        if unknown:
          raise CorruptCheckpoint(f"{where}/state: has no {unknown} (and no default for it)")
        target = {n: getattr(abstract_state, n) for n in names if n in saved}
        missing = {n: defaults[n] for n in absent}
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise CorruptCheckpoint(f"{where}: {short_reason(e)}") from e
    state, meta = out["state"], dict(out["meta"])
    saved_integrity = meta.pop("integrity", None)
    if missing:
      self.log(f"{where}: no {sorted(missing)} in this (older) checkpoint; starting them fresh")
      state = abstract_state.replace(**state, **missing)
    verify(state, out["data"], saved_integrity, where)
    return state, out["data"], meta

  def restore_intact(self, abstract_state, *, strict: bool = False, defaults: dict | None = None
                     ) -> tuple[Any, dict, dict, int]:
    """(state, data, meta, step) of the newest checkpoint that reads and verifies.

    Each one skipped is named with its reason; `strict=True` raises on the first bad one instead.
    """
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"{self.directory}: no complete checkpoint to restore")
    for i, step in enumerate(steps):
      try:
        state, data, meta = self.restore(abstract_state, step, defaults=defaults)
        error = None
      except CorruptCheckpoint as e:
        error = e
      if not _all_processes_ok(error is None):  # a file only one process reads can be the bad one
        e = error or CorruptCheckpoint(f"{self.step_dir(step)}: unreadable on another process (see its log)")
        if strict:
          raise CorruptCheckpoint(f"{e} (strict_resume: not falling back to an older checkpoint)") from e
        rest = steps[i + 1:]
        self.log(f"checkpoint unreadable, skipped: {e}" + (f"; trying step {rest[0]}" if rest else ""))
        continue
      if i:
        self._set_aside(steps[:i])
        self.log(f"restored step {step}, the newest intact checkpoint in {self.directory}")
      return state, data, meta, step
    raise CorruptCheckpoint(f"{self.directory}: none of the checkpoints {sorted(steps)} is intact")

  def _set_aside(self, steps) -> None:
    """Renames bad step directories to `<step>.corrupt` (kept for inspection, never listed), so the
    resumed run can save those steps again."""
    if jax.process_index() == 0:
      for step in steps:
        dst = self.step_dir(step) + ".corrupt"
        shutil.rmtree(dst, ignore_errors=True)
        os.rename(self.step_dir(step), dst)
        self.log(f"moved {self.step_dir(step)} aside to {dst}")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("longcat_checkpoint_set_aside")
    self.manager.reload()

  def read_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    return {k: v for k, v in meta.items() if k != "integrity"}

  def close(self) -> None:
    """Waits for the last save; its failure raises SaveError whatever `on_save_error` (there is
    no next interval to retry at)."""
    self.on_save_error = "stop"
    self.wait()
    # orbax 0.12's close() does not wait for the tmp-directory cleanup its constructor starts in a
    # thread; a process that exits right after (a failed start) got a second traceback from it.
    getattr(self.manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
    self.manager.close()


def _all_processes_ok(ok: bool) -> bool:
  """True iff `ok` on every process (one tiny all-gather; all processes restore the same step)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def _check_files(where: str) -> None:
  """Raises CorruptCheckpoint naming a missing item directory or an unreadable JSON file of a step
  (orbax's own error for those does not say which file)."""
  for item in ("state", "data", "meta"):
    if not os.path.isdir(os.path.join(where, item)):
      raise CorruptCheckpoint(f"{where}/{item}: missing")
  for name in ("_CHECKPOINT_METADATA", "state/_METADATA", "data/metadata", "meta/metadata"):
    path = os.path.join(where, name)
    if not os.path.exists(path) and name == "_CHECKPOINT_METADATA":
      continue  # optional for orbax
    try:
      with open(path, "rb") as f:
        json.loads(f.read().decode("utf-8"))
    except Exception as e:  # pylint: disable=broad-except
      raise CorruptCheckpoint(f"{path}: {short_reason(e)}") from e


def with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying `shardings` (a matching tree, or one sharding for every leaf)."""
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings), abstract_tree)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)
