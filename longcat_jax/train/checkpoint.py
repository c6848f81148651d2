"""Resumable training checkpoints with orbax's `CheckpointManager`.

    ckpt = Checkpointer(workdir + "/checkpoints", every=100, keep=3)
    ckpt.save(step, state, data=iterator.get_state(), meta={"config": ...})   # async
    state, data, meta = ckpt.restore(abstract_state)          # latest; shardings from abstract_state
    ckpt.close()

A checkpoint holds everything a bitwise-identical resume needs: the `TrainState` (step, params,
optimizer state, expert bias, rng), the data iterator's state and a JSON `meta` (the config).

Saves are asynchronous: `save` returns once the arrays are copied off the accelerator and a
background thread writes them. Orbax writes each step into a temporary directory and renames it
into place only when it is complete, so a process killed mid-save leaves the previous checkpoints
intact; the half-written directory is ignored and removed on the next start
(`cleanup_tmp_directories`).

Restoring onto another mesh (resharding) is a matter of the target: `abstract_state` leaves are
`jax.ShapeDtypeStruct(shape, dtype, sharding=...)` with the NEW shardings (`with_shardings`).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """`TrainState` + data-iterator state + JSON metadata per step, keep-last-K, async."""

  def __init__(self, directory: str, *, every: int = 100, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(1, int(every)), max_to_keep=keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, *, data: dict | None = None, meta: dict | None = None,
           force: bool = False) -> bool:
    """Saves if `step` is due (every N steps) or `force`; returns whether a save started."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data or {}),
                              meta=ocp.args.JsonSave(meta or {}))
    return self.manager.save(int(step), args=args, force=force)

  def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict, dict]:
    """(state, data, meta) of `step` (default: the latest complete one), laid out as `abstract_state`."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{self.directory}: no complete checkpoint to restore")
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return out["state"], out["data"], out["meta"]

  def read_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def wait(self) -> None:
    """Blocks until a pending async save is on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    # orbax 0.12's close() does not wait for the tmp-directory cleanup its constructor starts in a
    # thread; a process that exits right after (a failed start) got a second traceback from it.
    getattr(self.manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
    self.manager.close()


def with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying `shardings` (a matching tree, or one sharding for every leaf)."""
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings), abstract_tree)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)
