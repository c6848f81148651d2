"""Packed, shuffled, host-sharded, checkpointable training batches.

Packing (concatenate, then split). The store already holds all documents back
to back (each ``bos ... eos``), so row ``r`` is simply the token slice
``[r * S, (r + 1) * S)`` of that stream, S = ``seq_len``. That is greedy
concatenation: a document crossing a row boundary (or longer than a row) is
split into pieces, each piece a segment of its row; only the very last row is
padded. Because any row can be built from its index alone, the pipeline is a
random-access ``grain.MapDataset`` and its whole state is one integer.

Whole documents (chat stores, whose meta has ``"loss_mask": true``). A
conversation must not be cut in two, so rows are instead filled with whole
documents in store order, greedily (a row takes documents while they fit in S
tokens, then is padded); a document longer than S is an error (``prep --chat
--seq-len`` leaves such rows out). The row table ``document_rows`` is computed
from the document offsets alone, so rows stay random-access. The loss mask is
then also 0 wherever the NEXT token is not marked in the store's ``loss_mask``
(1 on assistant tokens), so only assistant tokens are predicted.

Order. Row indices are globally shuffled per epoch (grain's ``index_shuffle``
with seed ``seed + epoch``, a fixed algorithm, so the same seed gives the same
rows on any machine), repeated forever, and cut into global batches of
``global_batch_size`` rows. Host ``h`` of ``H`` gets the contiguous rows
``[h * L, (h + 1) * L)`` of every global batch, ``L = global_batch_size // H``::

  MapDataset.range(num_rows).shuffle(seed).repeat().batch(L)[h::H].map(pack)

Batch dict (numpy, each [L, S]):
  ``input_ids``   int32   token ids; ``pad_id`` (0) on padding.
  ``targets``     int32   next token of the same segment; ``pad_id`` where
                          ``loss_mask`` is 0.
  ``segment_ids`` int32   1, 2, 3, ... per document piece within the row;
                          0 on padding.
  ``positions``   int32   index inside the segment, restarting at 0.
  ``loss_mask``   float32 1 where ``targets`` is a real next token of the same
                          segment; 0 at each segment's last token and padding
                          (and, in chat stores, where the next token is not
                          an assistant token).

State. ``get_state()`` is ``{"next_index": <batches consumed>, "seed",
"seq_len", "global_batch_size", "num_tokens"}``: JSON-serialisable, the same on
every host (so a single ``ocp.args.JsonSave`` written by the primary host is
enough) and independent of the host count. ``set_state`` refuses a state made
with a different seed/seq_len/batch size/corpus. See ``longcat_jax.data``'s
docstring for saving it with orbax.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from longcat_jax.data.store import TokenStore


def document_rows(offsets: np.ndarray, seq_len: int, where: str = "") -> np.ndarray:
  """Token offset where each row starts, [num_rows + 1] (the last = num_tokens),
  packing whole documents greedily in order (see "Whole documents")."""
  lengths = np.diff(np.asarray(offsets, np.int64))
  if lengths.size and lengths.max() > seq_len:
    doc = int(np.argmax(lengths))
    raise ValueError(f"{where}: document {doc} has {int(lengths[doc])} tokens, more "
                     f"than seq_len={seq_len}; whole-document packing cannot "
                     "split it (re-run prep with --seq-len to leave it out)")
  starts, fill = [0], 0
  for doc, n in enumerate(lengths.tolist()):
    if fill + n > seq_len:
      starts.append(int(offsets[doc]))
      fill = 0
    fill += n
  starts.append(int(offsets[-1]))
  return np.asarray(starts, np.int64)


def pack_rows(store: TokenStore, rows: np.ndarray, seq_len: int,
              pad_id: int = 0, row_starts: np.ndarray | None = None
              ) -> dict[str, np.ndarray]:
  """Builds the batch dict (see module docstring) for row indices ``rows`` [B].

  ``row_starts`` [num_rows + 1]: token offsets of the rows (``document_rows``);
  None = fixed slices ``[r * S, (r + 1) * S)``.
  """
  rows = np.asarray(rows, np.int64).reshape(-1)
  B, S = len(rows), seq_len
  if row_starts is None:
    starts = rows * S
    stops = np.minimum(starts + S, store.num_tokens)
  else:
    starts, stops = row_starts[rows], row_starts[rows + 1]
  reads = [store.read_range_async(int(a), int(b)) for a, b in zip(starts, stops)]
  masks = ([store.read_mask_range_async(int(a), int(b)) for a, b in zip(starts, stops)]
           if store.has_loss_mask else None)
  marked = np.zeros((B, S), bool)
  input_ids = np.full((B, S), pad_id, np.int32)
  segment_ids = np.zeros((B, S), np.int32)
  positions = np.zeros((B, S), np.int32)
  offsets = store.offsets
  for i, (start, stop, read) in enumerate(zip(starts, stops, reads)):
    n = int(stop - start)
    ids = read.result()
    store.check_ids(ids, int(start))
    tok = np.arange(start, stop)
    doc = np.searchsorted(offsets, tok, side="right") - 1
    input_ids[i, :n] = ids
    segment_ids[i, :n] = np.cumsum(np.r_[True, doc[1:] != doc[:-1]])
    positions[i, :n] = tok - np.maximum(offsets[doc], start)
    if masks is not None:
      marked[i, :n] = masks[i].result() > 0
  same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
  if masks is not None:
    same &= marked[:, 1:]
  loss_mask = np.zeros((B, S), np.float32)
  loss_mask[:, :-1] = same
  targets = np.full((B, S), pad_id, np.int32)
  targets[:, :-1] = np.where(same, input_ids[:, 1:], pad_id)
  return {"input_ids": input_ids, "targets": targets,
          "segment_ids": segment_ids, "positions": positions,
          "loss_mask": loss_mask}


class TrainIterator(grain.DatasetIterator):
  """Infinite iterator of batch dicts; a grain ``DatasetIterator`` itself, so
  ``grain.checkpoint.CheckpointSave(it)`` works as well as JSON of
  ``get_state()``."""

  def __init__(self, inner: grain.DatasetIterator, config: dict[str, int],
               store: TokenStore, shard_index: int, shard_count: int):
    super().__init__(inner)
    self._inner = inner
    self._config = config
    self.store = store
    self.shard_index, self.shard_count = shard_index, shard_count

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._inner)

  def get_state(self) -> dict[str, Any]:
    return {"next_index": int(self._inner.get_state()["next_index"]),
            **self._config}

  def set_state(self, state: dict[str, Any]) -> None:
    for key, want in self._config.items():
      if state.get(key) != want:
        raise ValueError(
            f"iterator state has {key}={state.get(key)!r} but this iterator "
            f"has {key}={want!r} (store {self.store.path})")
    self._inner.set_state({"next_index": int(state["next_index"])})

  def __str__(self) -> str:
    return (f"TrainIterator({self.store.path}, {self._config}, "
            f"shard {self.shard_index}/{self.shard_count})")


def make_train_iterator(store_path: str, seq_len: int, global_batch_size: int,
                        seed: int, shard_index: int | None = None,
                        shard_count: int | None = None, *,
                        num_threads: int = 2, prefetch: int = 4
                        ) -> TrainIterator:
  """Iterator of this host's ``[global_batch_size // shard_count, seq_len]``
  batch dicts, forever. Shards default to ``jax.process_index()/count()``.

  ``num_threads``/``prefetch``: grain thread pool size and number of batches
  built ahead (0 to build on the calling thread).
  """
  if shard_index is None or shard_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} not in [0, {shard_count})")
  if global_batch_size <= 0 or global_batch_size % shard_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a "
                     f"positive multiple of shard_count={shard_count}")
  if seq_len <= 0:
    raise ValueError(f"seq_len={seq_len} must be positive")
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed={seed} must be in [0, 2**32)")
  store = TokenStore.open(store_path)
  if store.num_tokens == 0:
    raise ValueError(f"{store.path}: store has no tokens")
  row_starts = None
  if store.has_loss_mask:
    row_starts = document_rows(store.offsets, seq_len, store.path)
    num_rows = len(row_starts) - 1
  else:
    num_rows = -(-store.num_tokens // seq_len)
  local_batch = global_batch_size // shard_count
  pad_id = int(store.meta.get("extra", {}).get("pad_id", 0))

  ds = grain.MapDataset.range(num_rows).shuffle(seed=seed).repeat()
  ds = ds.batch(local_batch)[shard_index::shard_count]
  ds = ds.map(lambda rows: pack_rows(store, rows, seq_len, pad_id, row_starts))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                            prefetch_buffer_size=prefetch))
  config = {"seed": seed, "seq_len": seq_len,
            "global_batch_size": global_batch_size,
            "num_tokens": store.num_tokens}
  if row_starts is not None:
    config["packing"] = "documents"
  return TrainIterator(iter(ds), config, store, shard_index, shard_count)


def iterator_save_args(it: TrainIterator):
  """``ocp.args`` item to put in a ``Composite`` to save ``it``'s state."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  return ocp.args.JsonSave(it.get_state())


def iterator_restore_args():
  """``ocp.args`` item to restore the state; pass the result to ``set_state``."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  return ocp.args.JsonRestore()
