"""safetensors files read and written by byte range (no numpy backend, so F8 works too).

A safetensors file is `u64 N | N bytes of JSON header | data`; the header gives each tensor's
dtype, shape and `[begin, end)` byte range inside the data. Reading a row range of a tensor is one
positional read (`os.preadv` into the destination buffer; thread-safe, releases the GIL), so
many threads can read different tensors, or different rows of one tensor, at disk speed. `view`
gives the same rows as a read-only view of the file's memory map instead, for a caller that copies
them anyway (a transposing or converting copy then reads the page cache directly: one pass, not two).
`numpy` has no float8 type; `ml_dtypes` (a JAX dependency) provides `float8_e4m3fn`.

    files = CheckpointFiles("path/to/ckpt")          # index json or model.safetensors
    info = files.info("model.layers.0.mlp.experts.3.up_proj.weight")   # dtype, shape, file
    rows = files.read_rows(key, 128, 256)            # numpy [128, in], stored dtype
    rows = files.view(key, 128, 256)                 # the same rows, a view of the mapped file

Every problem is a `CheckpointError` naming the file and the tensor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import struct
import threading

import ml_dtypes
import numpy as np

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# safetensors dtype names -> numpy dtypes.
DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
  """A checkpoint problem, naming the file and the tensor."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one tensor lives: `file` (full path), absolute byte `offset`, stored `dtype`, `shape`."""
  name: str
  file: str
  offset: int
  dtype: np.dtype
  shape: tuple[int, ...]

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize


def read_header(path: str) -> dict[str, TensorInfo]:
  """Parses and checks one file's header: known dtypes, byte ranges that match the shapes and lie
  inside the file (a truncated download names its first tensor past the end)."""
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      raw = f.read(8)
      if len(raw) < 8:
        raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors header (truncated?)")
      (n,) = struct.unpack("<Q", raw)
      if 8 + n > size:
        raise CheckpointError(f"{path}: header of {n} bytes runs past the end of the {size}-byte file (truncated?)")
      header = json.loads(f.read(n))
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path}: cannot read as safetensors ({e})") from None
  header.pop("__metadata__", None)
  out = {}
  for name, h in header.items():
    st = h.get("dtype")
    if st not in DTYPES:
      raise CheckpointError(f"{path}: tensor {name!r} has dtype {st!r}, which this loader does not know "
                            f"(known: {sorted(DTYPES)})")
    begin, end = h["data_offsets"]
    info = TensorInfo(name, path, 8 + n + begin, DTYPES[st], tuple(h["shape"]))
    if end - begin != info.nbytes:
      raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {list(info.shape)} {st} "
                            f"({info.nbytes} expected)")
    if 8 + n + end > size:
      raise CheckpointError(f"{path}: tensor {name!r} ends at byte {8 + n + end} but the file has {size} bytes "
                            "(truncated shard?)")
    out[name] = info
  return out


class CheckpointFiles:
  """The tensors of a checkpoint directory (index json or a single file), read by byte range."""

  def __init__(self, path: str):
    self.path = path
    index_file, single = os.path.join(path, INDEX_NAME), os.path.join(path, SINGLE_NAME)
    if os.path.exists(index_file):
      try:
        with open(index_file) as f:
          weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_file}: not a valid safetensors index ({e})") from None
      files = sorted(set(weight_map.values()))
      for fname in files:
        if not os.path.exists(os.path.join(path, fname)):
          key = next(k for k, v in weight_map.items() if v == fname)
          raise CheckpointError(f"{index_file}: names file {fname!r} (e.g. for tensor {key!r}), which does not "
                                f"exist in {path}")
    elif os.path.exists(single):
      weight_map, files = None, [SINGLE_NAME]
    else:
      raise CheckpointError(f"{path}: no {INDEX_NAME} or {SINGLE_NAME} found")
    self.tensors: dict[str, TensorInfo] = {}
    for fname in files:
      for name, info in read_header(os.path.join(path, fname)).items():
        if weight_map is not None and weight_map.get(name) != fname:
          continue  # the index is authoritative (a stale copy in another file is ignored)
        self.tensors[name] = info
    if weight_map is not None:
      absent = [k for k, v in weight_map.items() if k not in self.tensors]
      if absent:
        raise CheckpointError(f"{os.path.join(path, weight_map[absent[0]])}: tensor {absent[0]!r} is listed in "
                              f"{INDEX_NAME} but not in that file's header ({len(absent)} such)")
    self._fds: dict[str, int] = {}
    self._maps: dict[str, mmap.mmap] = {}
    self._lock = threading.Lock()

  def keys(self):
    return self.tensors.keys()

  def __contains__(self, key) -> bool:
    return key in self.tensors

  def info(self, key: str) -> TensorInfo:
    return self.tensors[key]

  def _fd(self, file: str) -> int:
    with self._lock:
      if file not in self._fds:
        self._fds[file] = os.open(file, os.O_RDONLY)
      return self._fds[file]

  def read_rows(self, key: str, start: int = 0, stop: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Rows [start, stop) of tensor `key` (all of a 0/1-D tensor's elements along dim 0), stored dtype."""
    t = self.tensors[key]
    shape = t.shape or (1,)
    stop = shape[0] if stop is None else stop
    row_bytes = math.prod(shape[1:]) * t.dtype.itemsize
    want = (stop - start,) + tuple(shape[1:])
    if out is None:
      out = np.empty(want, t.dtype)
    buf = memoryview(out.reshape(-1).view(np.uint8))
    offset, nbytes = t.offset + start * row_bytes, (stop - start) * row_bytes
    try:
      got = 0
      fd = self._fd(t.file)
      while got < nbytes:
        n = os.preadv(fd, [buf[got:nbytes]], offset + got)
        if n <= 0:
          break
        got += n
    except OSError as e:
      raise CheckpointError(f"{t.file}: cannot read tensor {key!r}: {e}") from None
    if got != nbytes:
      raise CheckpointError(f"{t.file}: tensor {key!r}: read {got} of {nbytes} bytes (file truncated?)")
    return out.reshape(want) if t.shape else out.reshape(())

  def read(self, key: str) -> np.ndarray:
    return self.read_rows(key)

  def view(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows [start, stop) of tensor `key` as a read-only view of its file's memory map (no copy;
    the pages are read when touched). `read_header` checked that every tensor lies inside its file,
    so a view never reaches past the end (unless the file shrinks while open: then SIGBUS)."""
    t = self.tensors[key]
    shape = t.shape or (1,)
    stop = shape[0] if stop is None else stop
    row = math.prod(shape[1:])
    with self._lock:
      m = self._maps.get(t.file)
      if m is None:
        try:
          with open(t.file, "rb") as f:
            m = self._maps[t.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
          raise CheckpointError(f"{t.file}: cannot map the file to read tensor {key!r}: {e}") from None
    x = np.frombuffer(m, t.dtype, count=(stop - start) * row, offset=t.offset + start * row * t.dtype.itemsize)
    return x.reshape((stop - start,) + tuple(shape[1:])) if t.shape else x.reshape(())

  def prefetch(self, key: str) -> None:
    """Starts an asynchronous read of tensor `key` into the page cache (POSIX_FADV_WILLNEED)."""
    t = self.tensors[key]
    if hasattr(os, "posix_fadvise"):
      os.posix_fadvise(self._fd(t.file), t.offset, t.nbytes, os.POSIX_FADV_WILLNEED)

  def release(self, key: str, start: int = 0, stop: int | None = None) -> None:
    """Unmaps the pages of rows [start, stop) of `key` from this process (they stay in the page
    cache), so that a loader's resident memory does not grow with what it has read. A page shared
    with a neighbouring range that another thread is still copying is simply read again."""
    t = self.tensors[key]
    m = self._maps.get(t.file)
    if m is None or not hasattr(mmap, "MADV_DONTNEED"):
      return
    shape = t.shape or (1,)
    stop = shape[0] if stop is None else stop
    row = math.prod(shape[1:]) * t.dtype.itemsize
    a = (t.offset + start * row) // mmap.PAGESIZE * mmap.PAGESIZE
    b = min(-(-(t.offset + stop * row) // mmap.PAGESIZE) * mmap.PAGESIZE, len(m))
    if b > a:
      m.madvise(mmap.MADV_DONTNEED, a, b - a)

  def close(self):
    with self._lock:
      for fd in self._fds.values():
        os.close(fd)
      self._fds.clear()
      self._maps.clear()   # unmapped when the last view of each is gone

  def __del__(self):
    try:
      self.close()
    except Exception:  # interpreter shutdown
      pass


# ---------------------------------------------------------------------------------------------
# Writing: the header first (all shapes are known in advance), then each tensor's bytes at its
# offset, possibly from several threads or processes, in any order.


@dataclasses.dataclass(frozen=True)
class FilePlan:
  """One output file: its tensors in order with their absolute offsets, and the header bytes."""
  name: str
  tensors: tuple[TensorInfo, ...]
  header: bytes

  @property
  def size(self) -> int:
    return len(self.header) + sum(t.nbytes for t in self.tensors)


def plan_files(specs: list[tuple[str, np.dtype, tuple[int, ...]]], max_shard_bytes: int) -> list[FilePlan]:
  """Splits (name, dtype, shape) in order into files of at most `max_shard_bytes` (a bigger tensor
  gets a file of its own); names them like transformers does. Deterministic, so every process
  computes the same plan."""
  groups, cur, cur_bytes = [], [], 0
  for name, dtype, shape in specs:
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if cur and cur_bytes + nbytes > max_shard_bytes:
      groups.append(cur)
      cur, cur_bytes = [], 0
    cur.append((name, np.dtype(dtype), tuple(shape)))
    cur_bytes += nbytes
  groups.append(cur)
  plans = []
  for i, group in enumerate(groups):
    fname = SINGLE_NAME if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
    header, pos = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in group:
      n = math.prod(shape) * dtype.itemsize
      header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
      pos += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes
    head = struct.pack("<Q", len(text)) + text
    tensors = tuple(TensorInfo(name, fname, len(head) + header[name]["data_offsets"][0], dtype, shape)
                    for name, dtype, shape in group)
    plans.append(FilePlan(fname, tensors, head))
  return plans


def pwrite_all(fd: int, data, offset: int) -> None:
  """Writes bytes or a numpy array (any dtype, made contiguous) at `offset`."""
  if isinstance(data, np.ndarray):
    data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
  view = memoryview(data).cast("B")
  done = 0
  while done < len(view):
    done += os.pwrite(fd, view[done:], offset + done)
