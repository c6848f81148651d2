"""Token store: a tokenized corpus as flat arrays on tensorstore (zarr3 + zstd).

Layout of a store directory::

  tokens/       zarr3 int32 [num_tokens], chunks of 32768 tokens, zstd level 3
  doc_offsets/  zarr3 int64 [num_docs + 1], offsets[0] = 0, offsets[-1] = num_tokens
  loss_mask/    zarr3 uint8 [num_tokens], only in chat stores (meta "loss_mask": true):
                1 on the tokens to train on (assistant replies), 0 elsewhere
  meta.json     {"format", "vocab_size", "tokenizer", "num_docs", "num_tokens",
                 "sources", "extra", "loss_mask"}

Document i is ``tokens[offsets[i]:offsets[i + 1]]``. A store is built under a
temporary sibling directory and renamed into place after ``meta.json`` is
written, so a directory at ``path`` is always complete; an interrupted write
leaves only a ``.<name>.tmp-*`` directory behind.

Token ids outside ``[0, vocab_size)`` raise ``ValueError`` naming the source
file (when writing) or the store path (when reading), the document index and
the token offset inside that document.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Iterable, Sequence

import numpy as np
import tensorstore as ts

FORMAT = "longcat_jax.token_store/v1"
META_FILE = "meta.json"
TOKEN_CHUNK = 1 << 15      # tokens per zarr chunk (128 KiB uncompressed)
OFFSET_CHUNK = 1 << 14     # offsets per zarr chunk
_FLUSH_CHUNKS = 32         # write to disk every this many full chunks


def _spec(path: str, dtype: str | None = None, chunk: int | None = None):
  spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}
  if dtype is not None:
    spec["metadata"] = {
        "data_type": dtype,
        "shape": [0],
        "chunk_grid": {"name": "regular",
                       "configuration": {"chunk_shape": [chunk]}},
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                   {"name": "zstd", "configuration": {"level": 3}}],
    }
  return spec


def _bad_id_error(where: str, ids: np.ndarray, vocab_size: int, doc: int,
                  doc_start: int) -> ValueError:
  """ValueError for the first id of ``ids`` outside [0, vocab_size).

  ``ids`` starts at token offset ``doc_start`` of document ``doc``.
  """
  pos = int(np.argmax((ids < 0) | (ids >= vocab_size)))
  return ValueError(
      f"{where}: token id {int(ids[pos])} at document {doc}, token offset "
      f"{doc_start + pos} is outside [0, {vocab_size})")


class _Appender:
  """Appends to a 1-D zarr3 array in whole chunks; keeps < flush size in RAM."""

  def __init__(self, path: str, dtype: str, chunk: int):
    self._arr = ts.open(_spec(path, dtype, chunk), create=True).result()
    self._dtype = np.dtype(dtype)
    self._chunk = chunk
    self._buf: list[np.ndarray] = []
    self._buf_len = 0
    self.size = 0  # elements appended so far (written + buffered)

  def append(self, values: np.ndarray):
    self._buf.append(np.asarray(values, dtype=self._dtype))
    self._buf_len += len(values)
    self.size += len(values)
    if self._buf_len >= _FLUSH_CHUNKS * self._chunk:
      self.flush(final=False)

  def flush(self, final: bool):
    data = np.concatenate(self._buf) if self._buf else np.zeros(0, self._dtype)
    n = len(data) if final else (len(data) // self._chunk) * self._chunk
    if n:
      start = self._arr.shape[0]
      self._arr = self._arr.resize(exclusive_max=[start + n]).result()
      self._arr[start:start + n].write(data[:n]).result()
    self._buf = [data[n:]]
    self._buf_len = len(data) - n


class TokenStoreWriter:
  """Appends documents to a new store; ``close()`` makes it appear at ``path``.

  Use as a context manager: on an exception the temporary directory is
  removed and nothing appears at ``path``. Memory use is bounded by the flush
  size (~4 MiB of tokens), not the corpus size.
  """

  def __init__(self, path: str, vocab_size: int, tokenizer: str = "",
               overwrite: bool = False, extra: dict | None = None,
               loss_mask: bool = False):
    self.path = os.path.abspath(path)
    if os.path.exists(self.path) and not overwrite:
      raise FileExistsError(f"token store already exists: {self.path}")
    if vocab_size <= 0 or vocab_size > 2**31:
      raise ValueError(f"vocab_size={vocab_size} must be in (0, 2**31]")
    self.vocab_size = int(vocab_size)
    self._overwrite = overwrite
    self._meta = {"format": FORMAT, "vocab_size": self.vocab_size,
                  "tokenizer": tokenizer, "extra": extra or {},
                  "loss_mask": bool(loss_mask)}
    parent = os.path.dirname(self.path)
    os.makedirs(parent, exist_ok=True)
    self._tmp = tempfile.mkdtemp(
        prefix=f".{os.path.basename(self.path)}.tmp-", dir=parent)
    self._tokens = _Appender(os.path.join(self._tmp, "tokens"), "int32",
                             TOKEN_CHUNK)
    self._offsets = _Appender(os.path.join(self._tmp, "doc_offsets"), "int64",
                              OFFSET_CHUNK)
    self._offsets.append(np.zeros(1, np.int64))
    self._mask = _Appender(os.path.join(self._tmp, "loss_mask"), "uint8",
                           TOKEN_CHUNK) if loss_mask else None
    self._sources: dict[str, None] = {}  # ordered set
    self.num_docs = 0
    self._closed = False

  @property
  def num_tokens(self) -> int:
    return self._tokens.size

  def add(self, tokens: Sequence[int] | np.ndarray,
          source: str | None = None, mask: np.ndarray | None = None) -> int:
    """Appends one document (1-D ids); returns its index.

    ``mask`` (0/1 per token, same length) is required in a store created with
    ``loss_mask=True`` and refused otherwise. Raises ValueError naming
    ``source`` (or the store path), the document index and token offset if an
    id is outside ``[0, vocab_size)``.
    """
    ids = np.asarray(tokens)
    if ids.ndim != 1 or not (ids.size == 0 or
                             np.issubdtype(ids.dtype, np.integer)):
      raise ValueError(f"{source or self.path}: document {self.num_docs} "
                       f"must be a 1-D integer sequence, got {ids.dtype}"
                       f"{list(ids.shape)}")
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise _bad_id_error(source or self.path, ids, self.vocab_size,
                          self.num_docs, 0)
    if (mask is None) != (self._mask is None):
      raise ValueError(f"{source or self.path}: document {self.num_docs}: "
                       + ("this store has a loss mask; pass mask="
                          if mask is None else "this store has no loss mask"))
    if mask is not None:
      mask = np.asarray(mask)
      if mask.shape != ids.shape:
        raise ValueError(f"{source or self.path}: document {self.num_docs}: "
                         f"mask shape {mask.shape} != tokens {ids.shape}")
      self._mask.append(mask.astype(np.uint8))
    self._tokens.append(ids)
    self._offsets.append(np.array([self._tokens.size], np.int64))
    if source is not None:
      self._sources[source] = None
    self.num_docs += 1
    return self.num_docs - 1

  def close(self) -> "TokenStore":
    """Flushes, writes meta.json and atomically renames into place."""
    if self._closed:
      raise RuntimeError(f"writer for {self.path} already closed")
    self._tokens.flush(final=True)
    self._offsets.flush(final=True)
    if self._mask is not None:
      self._mask.flush(final=True)
    meta = dict(self._meta, num_docs=self.num_docs,
                num_tokens=self.num_tokens, sources=list(self._sources))
    with open(os.path.join(self._tmp, META_FILE), "w") as f:
      json.dump(meta, f, indent=1)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(self._tmp, 0o777 & ~umask)  # mkdtemp made it 0700
    if self._overwrite and os.path.exists(self.path):
      old = self._tmp + ".old"
      os.rename(self.path, old)
      shutil.rmtree(old)
    os.rename(self._tmp, self.path)  # atomic on one filesystem
    self._closed = True
    return TokenStore.open(self.path)

  def abort(self):
    """Discards everything written so far."""
    self._closed = True
    shutil.rmtree(self._tmp, ignore_errors=True)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is not None:
      self.abort()
    elif not self._closed:
      self.close()


class TokenStore:
  """Read access to a complete store. ``offsets`` (int64 [num_docs+1]) is in RAM,
  tokens are read from disk on demand (thread-safe)."""

  def __init__(self, path: str, meta: dict, tokens: ts.TensorStore,
               offsets: np.ndarray, mask: ts.TensorStore | None = None):
    self.path, self.meta, self._tokens, self.offsets = path, meta, tokens, offsets
    self._mask = mask
    self.has_loss_mask: bool = mask is not None
    self.vocab_size: int = meta["vocab_size"]
    self.num_docs: int = meta["num_docs"]
    self.num_tokens: int = meta["num_tokens"]

  @staticmethod
  def create(path: str, vocab_size: int, tokenizer: str = "",
             overwrite: bool = False, extra: dict | None = None,
             loss_mask: bool = False) -> TokenStoreWriter:
    return TokenStoreWriter(path, vocab_size, tokenizer, overwrite, extra,
                            loss_mask)

  @staticmethod
  def exists(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META_FILE))

  @classmethod
  def open(cls, path: str, cache_bytes: int = 64 << 20) -> "TokenStore":
    path = os.path.abspath(path)
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
      raise FileNotFoundError(f"{path}: not a token store (no {META_FILE})")
    with open(meta_path) as f:
      meta = json.load(f)
    if meta.get("format") != FORMAT:
      raise ValueError(f"{meta_path}: format {meta.get('format')!r}, "
                       f"expected {FORMAT!r}")
    ctx = ts.Context({"cache_pool": {"total_bytes_limit": cache_bytes}})
    tokens = ts.open(_spec(os.path.join(path, "tokens")), read=True,
                     context=ctx).result()
    offsets = ts.open(_spec(os.path.join(path, "doc_offsets")),
                      read=True).result().read().result()
    n_docs, n_tok = meta["num_docs"], meta["num_tokens"]
    if tokens.shape != (n_tok,) or offsets.shape != (n_docs + 1,) or (
        offsets[-1] != n_tok):
      raise ValueError(
          f"{path}: arrays disagree with {META_FILE} (tokens {tokens.shape}, "
          f"doc_offsets {offsets.shape}, meta num_tokens={n_tok}, "
          f"num_docs={n_docs})")
    mask = None
    if meta.get("loss_mask"):
      mask = ts.open(_spec(os.path.join(path, "loss_mask")), read=True,
                     context=ctx).result()
      if mask.shape != (n_tok,):
        raise ValueError(f"{path}: loss_mask has shape {mask.shape}, "
                         f"tokens ({n_tok},)")
    return cls(path, meta, tokens, offsets, mask)

  def read_range_async(self, start: int, stop: int) -> ts.Future:
    """Future of int32 tokens [stop - start] (no validation)."""
    if not 0 <= start <= stop <= self.num_tokens:
      raise IndexError(f"{self.path}: token range [{start}, {stop}) outside "
                       f"[0, {self.num_tokens})")
    return self._tokens[start:stop].read()

  def read_mask_range_async(self, start: int, stop: int) -> ts.Future:
    """Future of the uint8 loss mask [stop - start] (chat stores only)."""
    if self._mask is None:
      raise ValueError(f"{self.path}: store has no loss mask")
    if not 0 <= start <= stop <= self.num_tokens:
      raise IndexError(f"{self.path}: token range [{start}, {stop}) outside "
                       f"[0, {self.num_tokens})")
    return self._mask[start:stop].read()

  def read_range(self, start: int, stop: int, check: bool = True
                 ) -> np.ndarray:
    """int32 tokens [stop - start] of the flat stream; validated if ``check``."""
    ids = self.read_range_async(start, stop).result()
    if check:
      self.check_ids(ids, start)
    return ids

  def read_doc(self, i: int, check: bool = True) -> np.ndarray:
    """int32 tokens of document ``i``."""
    if not 0 <= i < self.num_docs:
      raise IndexError(f"{self.path}: document {i} outside [0, {self.num_docs})")
    return self.read_range(int(self.offsets[i]), int(self.offsets[i + 1]), check)

  def check_ids(self, ids: np.ndarray, start: int):
    """Raises ValueError if ids (at flat offset ``start``) leave the vocab."""
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      pos = start + int(np.argmax((ids < 0) | (ids >= self.vocab_size)))
      doc = int(np.searchsorted(self.offsets, pos, side="right")) - 1
      doc_start = int(self.offsets[doc])
      raise _bad_id_error(os.path.join(self.path, "tokens"),
                          ids[pos - start:], self.vocab_size, doc,
                          pos - doc_start)

  def iter_docs(self, check: bool = True) -> Iterable[np.ndarray]:
    for i in range(self.num_docs):
      yield self.read_doc(i, check)
