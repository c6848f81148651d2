"""Hugging Face checkpoint interop: `load_pretrained` / `save_pretrained` (spec sections 4b, 7).

Every released LongCat layout (`layouts.LAYOUTS`: Flash, Flash-FP8, Thinking-2601, Flash-Lite,
LongCat-2.0 names), BF16 or block-FP8, is read shard by shard:

    mesh = sharding.make_mesh(sharding.parallel_config(mesh=dict(fsdp=2, expert=4)))
    model, variables = load_pretrained(path, jnp.bfloat16, mesh=mesh)   # leaves already sharded

Each leaf is built per device from the safetensors byte ranges of that device's own layers,
experts, rows and columns (`jax.make_array_from_single_device_arrays`), so a process only reads
what its addressable devices hold; the files are memory-mapped and each leaf's tensors prefetched.
On CPU devices a shard's host memory is its device buffer: a thread pool copies the stored rows
straight into it (transposed to the JAX layout, converted, FP8 dequantized, in that one copy) and
`device_put` adopts it without a copy. On accelerators the shards are filled in chunks of at most
`host_bytes / (3 * workers + window + local devices)` bytes, written into the device buffers in
place (one shard_map'd dynamic_update_slice per chunk for the whole mesh). Either way host memory
beyond the arrays stays around `host_bytes` (default: half the largest stored tensor) plus XLA's
compiled programs. Without a mesh every leaf lands whole on the default device.

`save_pretrained` writes tensor by tensor from the shards (never a whole stacked leaf on a host):
the header of every file is computed first, then each process writes the bytes of the shards it
owns (`replica_id == 0`) at their offsets; process 0 writes headers, index and config.

Every problem is a `CheckpointError` naming the file and the tensor.
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import functools
import itertools
import json
import math
import mmap
import os
import shutil
import warnings

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import multihost_utils

from longcat_jax import config as config_lib
from longcat_jax.config import ConfigDict
from longcat_jax.interop import fp8, layouts
from longcat_jax.interop.layouts import MTP_EMBED_KEY, Leaf
from longcat_jax.interop.safetensors_io import (INDEX_NAME, CheckpointError, CheckpointFiles, TensorInfo,
                                                plan_files, pwrite_all)
from longcat_jax.model import LongcatForCausalLM
from longcat_jax.model.placement import LOCAL
from longcat_jax.parallel import sharding as sharding_lib
from longcat_jax.parallel.placement import MeshPlacement

CONFIG_NAME = "config.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_BLOCK = (128, 128)
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(DEFAULT_BLOCK),
              "activation_scheme": "dynamic"}

_ASIDE = ("model.mtp.",)          # MTP tensors when the config has no MTP head: kept aside
_IGNORED = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")


def _workers(n: int | None) -> int:
  return n or min(16, (os.cpu_count() or 2) * 2)


# ---------------------------------------------------------------------------------------------
# Config and the checkpoint's tensor inventory.


def read_config(path: str, **overrides) -> ConfigDict:
  cfg_file = os.path.join(path, CONFIG_NAME)
  if not os.path.exists(cfg_file):
    raise CheckpointError(f"{path}: no {CONFIG_NAME}")
  with open(cfg_file) as f:
    hf = json.load(f)
  try:
    return config_lib.from_hf_config(hf, **overrides)
  except ValueError as e:
    raise CheckpointError(f"{cfg_file}: {e}") from None


def _quant_block(c: ConfigDict) -> tuple[int, int] | None:
  q = (c.get("hf_format") or {}).get("quantization")
  return tuple(q.get("weight_block_size", DEFAULT_BLOCK)) if q else None


def _inventory(files: CheckpointFiles, c: ConfigDict, leaves: list[Leaf], shapes) -> dict[str, tuple[Leaf, tuple]]:
  """{HF key: (leaf, index)}; refuses unknown and missing tensors, wrong shapes, F8 weights
  without (or with wrongly shaped) scales and F8 dtypes other than e4m3, before reading any data."""
  wanted = {key: (leaf, idx) for leaf in leaves for idx, key in leaf.instances(c)}
  extra = set(layouts.identity_expert_keys(c)) | ({MTP_EMBED_KEY} if c.mtp_num_heads and not c.mtp_shared_module
                                                  else set())
  scale_keys = {k + fp8.SCALE_SUFFIX for k in wanted}
  unknown = [k for k in files.keys() if k not in wanted and k not in extra and k not in scale_keys
             and not k.startswith(_ASIDE) and not k.endswith(_IGNORED) and not layouts.UNUSED_MTP_NGRAM.match(k)]
  if unknown:
    raise CheckpointError(f"{files.path}: {len(unknown)} tensor(s) this model does not understand, e.g. "
                          f"{unknown[0]!r} in {files.info(unknown[0]).file} (all: {unknown[:8]}...)")
  missing = [k for k in wanted if k not in files]
  if missing:
    raise CheckpointError(f"{files.path}: {len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[0]!r} "
                          f"(config.json says num_layers={c.num_layers}, num_ffn_experts={c.num_ffn_experts})")
  block = _quant_block(c)
  for key, (leaf, _) in wanted.items():
    t = files.info(key)
    want = leaf.hf_shape(_get(shapes[leaf.collection], leaf.path).shape[leaf.lead:])
    if t.shape != want:
      raise CheckpointError(f"{t.file}: tensor {key!r} has shape {list(t.shape)}, which does not map to the "
                            f"expected shape {list(want)} for config {c.name!r}")
    scale = key + fp8.SCALE_SUFFIX
    if t.dtype.name.startswith("float8"):
      if t.dtype != fp8.E4M3:
        raise CheckpointError(f"{t.file}: tensor {key!r} is stored as {t.dtype.name}; only float8_e4m3fn "
                              "(F8_E4M3) block-quantized weights are supported")
      if scale not in files:
        raise CheckpointError(f"{t.file}: FP8 tensor {key!r} has no {scale!r} (a weight without its scale)")
      if block is None:
        raise CheckpointError(f"{t.file}: FP8 tensor {key!r}, but config.json has no quantization_config "
                              "(weight_block_size)")
      s = files.info(scale)
      if len(t.shape) != 2 or s.shape != fp8.scale_shape(t.shape, block):
        raise CheckpointError(f"{s.file}: scale {scale!r} has shape {list(s.shape)}; weight {list(t.shape)} with "
                              f"blocks {list(block)} needs {list(fp8.scale_shape(t.shape, block))}")
    elif scale in files:
      raise CheckpointError(f"{files.info(scale).file}: {scale!r} scales tensor {key!r}, which is stored as "
                            f"{t.dtype.name}, not FP8")
  return wanted


def _check_covers(leaves: list[Leaf], shapes, c: ConfigDict) -> None:
  """The layout table must name every variable of the model exactly once."""
  have = {(l.collection,) + l.path for l in leaves}
  want = {(k,) + tuple(getattr(p, "key", p) for p in path)
          for k in shapes for path, _ in jax.tree_util.tree_flatten_with_path(shapes[k])[0]}
  if have != want:
    raise CheckpointError(f"layout {layouts.architecture(c)!r} does not cover the model: no tensor for "
                          f"{sorted(want - have)[:4]}, no variable for {sorted(have - want)[:4]}")


def _record_format(c: ConfigDict, files: CheckpointFiles, wanted) -> None:
  """What save_pretrained needs to write the same tensors back: the main (embedding) dtype's
  exceptions (e.g. a float32 router in a BF16 release), the FP8 set, the extra copies."""
  fmt = dict(c.hf_format or {})
  main = files.info("model.embed_tokens.weight").dtype
  dtypes, quantized = {}, set()
  for key, (leaf, _) in wanted.items():
    t = files.info(key)
    if t.dtype == fp8.E4M3:
      quantized.add(leaf.hf_key)
    elif t.dtype != main:
      dtypes[leaf.hf_key] = t.dtype.name
  fmt["main_dtype"] = main.name
  fmt["dtypes"] = sorted(dtypes.items())      # (template, dtype) pairs: ConfigDict keys cannot hold dots
  fmt["quantized"] = sorted(quantized)
  fmt["identity_experts"] = any(k in files for k in layouts.identity_expert_keys(c)[:1])
  fmt["mtp_embed_copy"] = MTP_EMBED_KEY in files
  c.hf_format = fmt


# ---------------------------------------------------------------------------------------------
# Index arithmetic: a box of JAX slice indices <-> HF rows/columns.


def _cover(leaf: Leaf, slice_shape, box):
  """The smallest box >= `box` whose HF image is a box (non-leading axes of a group made full), and
  that HF box as [(start, stop)] per HF dim."""
  cover, hf = list(box), []
  for g in leaf.hf_axes:
    inner = math.prod(slice_shape[a] for a in g[1:])
    for a in g[1:]:
      cover[a] = (0, slice_shape[a])
    hf.append((cover[g[0]][0] * inner, cover[g[0]][1] * inner))
  return cover, hf


def _hf_to_jax(x: np.ndarray, leaf: Leaf, extents) -> np.ndarray:
  """An HF block -> the JAX slice block with the given per-axis extents (a view)."""
  order = [a for g in leaf.hf_axes for a in g]
  x = x.reshape([extents[a] for a in order])
  return x.transpose(np.argsort(order))


def _jax_to_hf(x: np.ndarray, leaf: Leaf) -> np.ndarray:
  order = [a for g in leaf.hf_axes for a in g]
  shape = [math.prod(x.shape[a] for a in g) for g in leaf.hf_axes]
  return x.transpose(order).reshape(shape)


def _chunks(box, order, itemsize: int, limit: int):
  """Splits a box (list of (start, stop)) into sub-boxes of at most `limit` bytes, cutting along the
  axes of `order` (outermost first); the other axes stay whole. All chunks of a box have one shape
  (the last one is moved back to end at the box's end, overlapping its neighbour), so the in-place
  device update compiles once per leaf."""
  ext = [b - a for a, b in box]
  size = math.prod(e for i, e in enumerate(ext) if i not in order) * itemsize
  k = len(order)
  while k > 0 and size * ext[order[k - 1]] <= limit:
    size *= ext[order[k - 1]]
    k -= 1
  if k == 0:
    yield list(box)
    return
  split, outer = order[k - 1], order[:k - 1]
  lo, hi = box[split]
  step = min(max(1, limit // max(size, 1)), hi - lo)
  for idx in itertools.product(*[range(*box[a]) for a in outer]):
    for s in range(lo, hi, step):
      b = list(box)
      for a, i in zip(outer, idx):
        b[a] = (i, i + 1)
      b[split] = (min(s, hi - step), min(s, hi - step) + step)
      yield b


# ---------------------------------------------------------------------------------------------
# Reading.


class _Reader:
  """Reads JAX boxes of leaves from a checkpoint (FP8 dequantized on the fly)."""

  def __init__(self, files: CheckpointFiles, c: ConfigDict, limit: int):
    self.files, self.c, self.block, self.limit = files, c, _quant_block(c) or DEFAULT_BLOCK, limit

  def hf_block(self, key: str, ranges, dtype) -> np.ndarray:
    """HF rows/cols `ranges` of tensor `key`: a view of the mapped file in the stored dtype, or for
    FP8 a `dtype` array dequantized `limit` bytes of stored rows at a time."""
    t = self.files.info(key)
    (r0, r1) = ranges[0]
    rows = self.files.view(key, r0, r1)
    if t.dtype != fp8.E4M3:
      return rows if len(ranges) == 1 else rows[:, ranges[1][0]:ranges[1][1]]
    c0, c1 = ranges[1]
    scale = self.files.read(key + fp8.SCALE_SUFFIX)
    out = np.empty((r1 - r0, c1 - c0), dtype)
    step = max(1, self.limit // max(1, t.shape[1] * t.dtype.itemsize))
    for a in range(r0, r1, step):
      b = min(a + step, r1)
      out[a - r0:b - r0] = fp8.dequantize(rows[a - r0:b - r0, c0:c1], scale, (a, b), (c0, c1), self.block, dtype)
    return out

  def box_into(self, out: np.ndarray, leaf: Leaf, key: str, slice_shape, box, dtype) -> None:
    """Copies the JAX slice box of one HF tensor into `out` (the HF -> JAX transpose and the dtype
    conversion happen in this one copy), then lets go of the mapped pages it read."""
    cover, hf = _cover(leaf, slice_shape, box)
    rows = hf[0]
    stored_rows = leaf.hf_rows
    if stored_rows is not None and hf[0][1] > stored_rows:  # row-padded n-gram table: zeros beyond
      r0, r1 = hf[0]
      hf[0] = rows = (min(r0, stored_rows), stored_rows)
      x = self.hf_block(key, hf, dtype) if hf[0][1] > hf[0][0] else None
      full = np.zeros((r1 - r0,) + ((hf[1][1] - hf[1][0],) if len(hf) > 1 else ()), dtype)
      if x is not None:
        full[:x.shape[0]] = x
      x = full
    else:
      x = self.hf_block(key, hf, dtype)
    x = _hf_to_jax(x, leaf, [b - a for a, b in cover])
    out[...] = x[tuple(slice(b0 - c0, b1 - c0) for (b0, b1), (c0, _) in zip(box, cover))]
    del x
    self.files.release(key, *rows)

  def prefetch(self, leaf: Leaf, boxes) -> None:
    """Asks the kernel to start reading every stored tensor that `boxes` of the leaf touch (their
    whole byte ranges), so the disk streams while the threads copy."""
    for box in boxes:
      for idx in itertools.product(*[range(*b) for b in box[:leaf.lead]]):
        self.files.prefetch(_key(leaf, idx))

  def chunk(self, leaf: Leaf, shape, chunk, dtype, out: np.ndarray | None = None) -> np.ndarray:
    """A chunk (box over the whole stacked leaf) read into one host array (`out` if given)."""
    out = np.empty([b - a for a, b in chunk], dtype) if out is None else out
    lead, inner = chunk[:leaf.lead], chunk[leaf.lead:]
    for idx in itertools.product(*[range(*b) for b in lead]):
      rel = tuple(i - b[0] for i, b in zip(idx, lead))
      self.box_into(out[rel], leaf, _key(leaf, idx), shape[leaf.lead:], inner, dtype)
    return out


def _key(leaf: Leaf, idx) -> str:
  """The HF tensor name of one (layer, expert) / (expert,) index of a stacked leaf."""
  return leaf.hf_key.format(**dict(zip(("l", "e")[:leaf.lead] if leaf.per_layer else ("e",), idx)))


@functools.lru_cache(maxsize=None)
def _update_fn(sharding):
  """(buf, update, starts [ndim]) -> buf with every device's shard updated in place by its own
  piece of `update` at `starts` (shard-relative): one program for the whole mesh."""
  def dus(buf, x, starts):
    st = tuple(starts[i] for i in range(buf.ndim))
    if buf.dtype.itemsize == 2:  # XLA:CPU widens a bf16/f16 update to f32 (a whole-buffer pass); bits are bits
      u = lax.dynamic_update_slice(lax.bitcast_convert_type(buf, jnp.uint16), lax.bitcast_convert_type(x, jnp.uint16), st)
      return lax.bitcast_convert_type(u, buf.dtype)
    return lax.dynamic_update_slice(buf, x, st)
  if isinstance(sharding, jax.sharding.NamedSharding):
    P = jax.sharding.PartitionSpec
    dus = jax.shard_map(dus, mesh=sharding.mesh, in_specs=(sharding.spec, sharding.spec, P()),
                        out_specs=sharding.spec)
  return jax.jit(dus, donate_argnums=0, out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _zeros_fn(shape, dtype, sharding):
  return jax.jit(functools.partial(jnp.zeros, shape, dtype), out_shardings=sharding)


def _load_leaf(reader: _Reader, leaf: Leaf, shape, dtype, sharding, pool, limit: int, window: int):
  """One leaf as a jax.Array with `sharding`, built from this process's addressable shards only.

  A shard that fits in `limit` bytes is read whole and placed; a bigger one is filled chunk by
  chunk in place (every device its own chunk k at once, `_update_fn`). Every process runs the
  same sequence of programs (chunking depends on the shard shape only)."""
  shape = tuple(shape)
  index_map = sharding.addressable_devices_indices_map(shape)
  boxes = collections.defaultdict(list)       # distinct box -> devices holding it (replicas)
  for dev, idx in index_map.items():
    boxes[tuple(s.indices(n)[:2] for s, n in zip(idx, shape))].append(dev)
  shard_shape = tuple(sharding.shard_shape(shape))
  order = list(range(leaf.lead)) + [leaf.lead + leaf.hf_axes[0][0]]
  rel_chunks = list(_chunks([(0, n) for n in shard_shape], order, np.dtype(dtype).itemsize, limit))
  if all(d.platform == "cpu" for d in index_map):
    return _load_leaf_host(reader, leaf, shape, dtype, sharding, pool, boxes, shard_shape, rel_chunks)
  tasks = [(k, box) for k in range(len(rel_chunks)) for box in boxes]
  pending, it = collections.deque(), iter(tasks)

  def submit():
    for k, box in itertools.islice(it, window - len(pending)):
      ch = [(b[0] + r0, b[0] + r1) for b, (r0, r1) in zip(box, rel_chunks[k])]
      pending.append((k, box, pool.submit(reader.chunk, leaf, shape, ch, dtype)))

  submit()
  if len(rel_chunks) == 1:
    arrays = {}
    while pending:
      _, box, fut = pending.popleft()
      host = fut.result()
      submit()
      for d in boxes[box]:
        arrays[d] = jax.device_put(host, d)
    return jax.make_array_from_single_device_arrays(shape, sharding, [arrays[d] for d in index_map])
  # The starting buffers: zeros made by XLA, so that the first update already runs in place (a
  # buffer device_put from host memory is not donatable: the first update would copy every shard).
  buf = _zeros_fn(shape, np.dtype(dtype), sharding)()
  update = _update_fn(sharding)
  chunk_shape = tuple(b - a for a, b in rel_chunks[0])
  global_chunk = tuple(c * (n // s) for c, n, s in zip(chunk_shape, shape, shard_shape))
  previous = None
  for k, rel in enumerate(rel_chunks):
    pieces = {}
    for _ in boxes:
      _, box, fut = pending.popleft()
      host = fut.result()
      submit()
      for d in boxes[box]:
        pieces[d] = jax.device_put(host, d)
      del host
    x = jax.make_array_from_single_device_arrays(global_chunk, sharding, [pieces[d] for d in index_map])
    if previous is not None:   # one update in flight: async dispatch would otherwise queue every chunk
      jax.block_until_ready(previous)
    buf = previous = update(buf, x, np.asarray([r[0] for r in rel], np.int32))
  return buf


def _host_array(shape, dtype) -> np.ndarray:
  """Uninitialised host memory for one shard, page-aligned, so that XLA:CPU adopts it as the
  device buffer without a copy. (Measured here and not used: transparent huge pages, whose direct
  compaction stalled the fill 2.5x, and MADV_POPULATE_WRITE, which zeroes in one thread before
  the parallel fill.)"""
  dtype = np.dtype(dtype)
  n = math.prod(shape)
  m = mmap.mmap(-1, max(n * dtype.itemsize, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
  return np.frombuffer(m, dtype, count=n).reshape(shape)


def _load_leaf_host(reader: _Reader, leaf: Leaf, shape, dtype, sharding, pool, boxes, shard_shape, rel_chunks):
  """The CPU case of `_load_leaf`: the memory of each shard is the device buffer itself. The
  leaf's tensors are prefetched (the disk streams while the threads copy), every shard is
  allocated once (`_host_array`), its chunks are copied straight from the mapped files into it by
  the thread pool (the HF -> JAX transpose and any dtype conversion happen in that one copy), and
  `device_put` then adopts it; so nothing beyond the arrays is held but each thread's FP8
  temporaries (`limit` bytes)."""
  reader.prefetch(leaf, boxes)
  hosts = {box: _host_array(shard_shape, dtype) for box in boxes}
  futures = []
  for rel in rel_chunks:
    view = tuple(slice(a, b) for a, b in rel)
    for box, host in hosts.items():
      ch = [(b[0] + r0, b[0] + r1) for b, (r0, r1) in zip(box, rel)]
      futures.append(pool.submit(reader.chunk, leaf, shape, ch, dtype, host[view]))
  for f in futures:
    f.result()
  arrays = {d: jax.device_put(hosts[box], d) for box, devices in boxes.items() for d in devices}
  order = sharding.addressable_devices_indices_map(shape)
  return jax.make_array_from_single_device_arrays(shape, sharding, [arrays[d] for d in order])


def _release_freed_memory() -> None:
  """Returns freed heap memory to the OS (glibc keeps the chunk buffers of a leaf, sized below its
  adaptive mmap threshold, in its arenas; without this the next leaf's chunks fragment them)."""
  if _LIBC is not None:
    _LIBC.malloc_trim(0)


def _libc():
  try:
    lib = ctypes.CDLL("libc.so.6")
    return lib if hasattr(lib, "malloc_trim") else None
  except OSError:  # not glibc (macOS, musl)
    return None


_LIBC = _libc()


def read_format(path: str, c: ConfigDict) -> dict:
  """`c.hf_format` as `load_pretrained` records it for the checkpoint at `path` (stored dtypes,
  FP8 tensors, extra copies), from the safetensors headers alone: what a training run started
  from `path` needs in its config so that an export writes the same layout back."""
  files = CheckpointFiles(path)
  try:
    c = c.copy_and_resolve_references()
    shapes = flax.linen.meta.unbox(sharding_lib.abstract_variables(LongcatForCausalLM(c)))
    leaves = layouts.leaves(c)
    _check_covers(leaves, shapes, c)
    _record_format(c, files, _inventory(files, c, leaves, shapes))
    return c.hf_format.to_dict() if isinstance(c.hf_format, ConfigDict) else dict(c.hf_format)
  finally:
    files.close()


def load_pretrained(path: str, dtype=None, *, mesh=None, shardings=None, rules=sharding_lib.LOGICAL_AXIS_RULES,
                    config_overrides: dict | None = None, host_bytes: int | None = None,
                    max_workers: int | None = None):
  """Reads a HF LongCat directory -> (model, variables).

  `variables` = {"params": ..., "expert_bias": ...} in JAX layout. `dtype` (e.g. jnp.bfloat16)
  sets the parameter and compute dtype; None keeps the checkpoint's (the embedding's) dtype; FP8
  weights are dequantized to it; router weights and the expert bias always stay float32.
  With `mesh` every leaf is sharded by the logical-axis table (`sharding.variable_shardings(model,
  mesh, rules)`) and the returned model holds the mesh placement (`parallel.MeshPlacement`);
  `shardings` (a tree like `variables`) overrides the layout; neither: the default device.
  `host_bytes` bounds the host memory in flight (default: half the largest stored tensor, >= 8 MiB;
  XLA's compiled update programs add a fixed few tens of MiB);
  `max_workers` the reading threads. `model.mtp.*` tensors load into params['mtp'] when config.json
  has MTP layers (else they are left aside: `read_mtp_tensors`).
  """
  files = CheckpointFiles(path)
  overrides = dict(config_overrides or {})
  if dtype is None:
    emb = files.tensors.get("model.embed_tokens.weight")
    stored = emb.dtype.name if emb is not None else "float32"
    dtype = stored if stored in config_lib.DTYPES else "float32"
  name = jnp.dtype(dtype).name
  overrides.setdefault("param_dtype", name)
  overrides.setdefault("dtype", name)
  c = read_config(path, **overrides)
  if c.mtp_num_heads and not any(k.startswith(_ASIDE) for k in files.keys()):
    warnings.warn(f"{path}: config.json has {c.mtp_num_heads} MTP head(s) but the checkpoint holds no "
                  "model.mtp.* tensors; loading the main model only (mtp_num_heads=0)")
    c.mtp_num_heads = 0
  config_lib.validate(c)
  placement = MeshPlacement(mesh, tuple(rules)) if mesh is not None and mesh.size > 1 else LOCAL
  model = LongcatForCausalLM(c, placement=placement)
  boxed = sharding_lib.abstract_variables(model)
  shapes = flax.linen.meta.unbox(boxed)
  leaves = layouts.leaves(c)
  _check_covers(leaves, shapes, c)
  wanted = _inventory(files, c, leaves, shapes)
  _record_format(c, files, wanted)
  if shardings is None:
    if mesh is not None:
      shardings = sharding_lib.variable_shardings(model, mesh, rules, boxed)
    else:
      one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      shardings = jax.tree.map(lambda _: one, shapes)
  largest = max(files.info(k).nbytes for k in wanted)
  workers = _workers(max_workers)
  window = workers + 2
  budget = host_bytes or max(largest // 2, 8 << 20)
  # In flight: each reading thread holds ~3 chunks (row block, HF block, chunk), finished reads
  # wait in the window, one chunk per local device is being placed. Same on every process.
  limit = max(budget // (3 * workers + window + jax.local_device_count()), 1 << 16)
  reader = _Reader(files, c, limit)
  variables = {}
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for leaf in leaves:
      target = _get(shapes[leaf.collection], leaf.path)
      dt = np.float32 if leaf.float32 else jnp.dtype(name)
      arr = _load_leaf(reader, leaf, target.shape, dt, _get(shardings[leaf.collection], leaf.path), pool, limit,
                       window=window)
      _set(variables.setdefault(leaf.collection, {}), leaf.path, arr)
      _release_freed_memory()
  files.close()
  return model, variables


def read_mtp_tensors(path: str) -> dict[str, np.ndarray]:
  """The `model.mtp.*` tensors of a checkpoint, by HF name (numpy, HF layout, stored dtype)."""
  files = CheckpointFiles(path)
  return {k: files.read(k) for k in files.keys() if k.startswith(_ASIDE)}  # incl. 2.0's unused MTP n-gram tables


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


# ---------------------------------------------------------------------------------------------
# Writing.


def _fresh_scales(arr, leaf: Leaf, block) -> np.ndarray:
  """amax / 448 per block of every HF tensor of a (possibly sharded) leaf: [lead..., ob, ib],
  computed on the devices (no host ever holds the leaf), returned to every process."""
  lead = leaf.lead
  order = list(range(lead)) + [lead + a for a in itertools.chain(*leaf.hf_axes)]

  def f(x):
    hf_shape = leaf.hf_shape(x.shape[lead:])
    y = jnp.abs(x.astype(jnp.float32)).transpose(order).reshape(x.shape[:lead] + hf_shape)
    ob, ib = fp8.scale_shape(hf_shape, block)
    pad = [(0, 0)] * lead + [(0, ob * block[0] - hf_shape[0]), (0, ib * block[1] - hf_shape[1])]
    y = jnp.pad(y, pad).reshape(x.shape[:lead] + (ob, block[0], ib, block[1]))
    return y.max(axis=(lead + 1, lead + 3)) / fp8.E4M3_MAX

  sh = getattr(arr, "sharding", None)
  out_sh = jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec()) if isinstance(
      sh, jax.sharding.NamedSharding) else None
  res = jax.jit(f, out_shardings=out_sh)(arr)
  return np.asarray(res.addressable_data(0), np.float32)


class _ScaleSource:
  """FP8 scales for the writer: kept ones (a checkpoint path or {key: array}) or fresh ones."""

  def __init__(self, given, block):
    self.files = CheckpointFiles(given) if isinstance(given, str) else None
    self.given = None if isinstance(given, str) else given
    self.block = block

  def get(self, key, hf_shape):
    skey = key + fp8.SCALE_SUFFIX
    if self.files is not None and skey in self.files:
      s = self.files.read(skey)
    elif self.given is not None and skey in self.given:
      s = np.asarray(self.given[skey], np.float32)
    else:
      return None
    if s.shape != fp8.scale_shape(hf_shape, self.block):
      raise CheckpointError(f"fp8_scales: {skey!r} has shape {list(s.shape)}, weight {list(hf_shape)} with blocks "
                            f"{list(self.block)} needs {list(fp8.scale_shape(hf_shape, self.block))}")
    return s


def _write_box(fd: int, t: TensorInfo, hf_ranges, data: np.ndarray) -> None:
  """Writes an HF block (rows [r0, r1) x cols [c0, c1) of tensor `t`) at its place in the file."""
  row_elems = math.prod(t.shape[1:]) if len(t.shape) > 1 else 1
  item = t.dtype.itemsize
  r0 = hf_ranges[0][0]
  if len(t.shape) < 2 or len(hf_ranges) < 2 or (hf_ranges[1][0] == 0 and hf_ranges[1][1] == t.shape[1]):
    pwrite_all(fd, data, t.offset + r0 * row_elems * item)
    return
  c0 = hf_ranges[1][0]
  data = np.ascontiguousarray(data)
  for i in range(data.shape[0]):
    pwrite_all(fd, data[i], t.offset + ((r0 + i) * row_elems + c0) * item)


def _shard_boxes(arr, shape):
  """(box, single-device array) of the shards this process owns (replica 0; one owner each)."""
  if not isinstance(arr, jax.Array):
    arr = jnp.asarray(arr)
  for s in arr.addressable_shards:
    if s.replica_id == 0:
      yield [sl.indices(n)[:2] for sl, n in zip(s.index, shape)], s.data


def _write_leaf(arr, leaf: Leaf, where, fds, block, scales, limit: int) -> None:
  """One leaf's HF tensors into their files, from the shards this process owns, chunk by chunk
  (at most `limit` bytes of a shard on the host at a time)."""
  shape = tuple(arr.shape)
  slice_shape = shape[leaf.lead:]
  order = list(range(leaf.lead)) + [leaf.lead + leaf.hf_axes[0][0]]
  itemsize = np.dtype(arr.dtype).itemsize
  for box, data in _shard_boxes(arr, shape):
    for ch in _chunks(box, order, itemsize, limit):
      host = np.asarray(data[tuple(slice(a - b[0], z - b[0]) for (a, z), b in zip(ch, box))])
      lead, inner = ch[:leaf.lead], ch[leaf.lead:]
      cover, hf = _cover(leaf, slice_shape, inner)
      if cover != list(inner):
        raise CheckpointError(f"cannot write {leaf.hf_key!r}: a shard splits a merged axis "
                              f"(slice box {inner} of {list(slice_shape)}); shard that leaf on its outer axes")
      for idx in itertools.product(*[range(*b) for b in lead]):
        key = _key(leaf, idx)
        x = _jax_to_hf(host[tuple(i - b[0] for i, b in zip(idx, lead))], leaf)
        rng = list(hf)
        if leaf.hf_rows is not None:   # drop the padding rows of an n-gram table
          keep = max(0, min(rng[0][1], leaf.hf_rows) - rng[0][0])
          x, rng[0] = x[:keep], (rng[0][0], rng[0][0] + keep)
          if keep == 0:
            continue
        fname, t = where[key]
        if t.dtype == fp8.E4M3:
          x = fp8.quantize(x, scales[key], rng[0], rng[1], block)
        else:
          x = x.astype(t.dtype, copy=False)
        _write_box(fds[fname], t, rng, x)


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def save_pretrained(path: str, model: LongcatForCausalLM, variables, *, max_shard_bytes: int = 2 << 30,
                    extra_tensors: dict[str, np.ndarray] | None = None, quantization: str | None = "auto",
                    fp8_scales=None, host_bytes: int = 256 << 20) -> None:
  """Writes `config.json` + `*.safetensors` + index in the layout the model's checkpoint came from
  (`config.hf_format`; a fresh model: transformers' LongcatFlash layout).

  `quantization`: "auto" (as loaded), None (high precision) or "fp8" (block e4m3 with
  `weight_scale_inv`, quantization_config written). FP8 scales: `fp8_scales` (a checkpoint path or
  {"...weight_scale_inv": array}) keeps given ones, so FP8 -> JAX -> FP8 gives the same bytes;
  otherwise amax / 448 per block. Sharded leaves are written from their shards; with several
  processes each writes what it owns and process 0 writes the index, so call it on every
  process (the directory must be shared). Files go to a temporary directory first, so a failed
  save leaves a previous checkpoint at `path` untouched.
  """
  c = model.config
  fmt = dict(c.get("hf_format") or {})
  variables = flax.linen.meta.unbox(variables)
  leaves = layouts.leaves(c)
  quant = fmt.get("quantization") if quantization == "auto" else (
      dict(FP8_CONFIG) if quantization == "fp8" else None)
  if quantization not in ("auto", "fp8", None, "none"):
    raise ValueError(f"quantization={quantization!r} must be 'auto', 'fp8' or None")
  if quantization == "fp8" and fmt.get("quantization"):
    quant = dict(fmt["quantization"])
  block = tuple(quant.get("weight_block_size", DEFAULT_BLOCK)) if quant else None
  quantized = set(fmt["quantized"]) if quant and fmt.get("quantization") and fmt.get("quantized") else None
  loaded = "dtypes" in fmt            # a loaded checkpoint: its exceptions to the main dtype, else defaults
  dtypes = {k: v for k, v in (fmt.get("dtypes") or [])}
  param_dtype = np.dtype(jnp.dtype(c.param_dtype))

  def stored_dtype(leaf):
    if loaded:   # float32-kept leaves (router) go back in their stored dtype
      return np.dtype(dtypes.get(leaf.hf_key) or (fmt["main_dtype"] if leaf.float32 else param_dtype))
    return np.dtype(np.float32 if leaf.float32 else param_dtype)

  specs, fp8_keys = [], []
  for leaf in leaves:
    arr = _get(variables[leaf.collection], leaf.path)
    hf_shape = leaf.hf_shape(arr.shape[leaf.lead:])
    is_q = bool(quant) and (leaf.hf_key in quantized if quantized is not None else leaf.fp8)
    dt = fp8.E4M3 if is_q else stored_dtype(leaf)
    for _, key in leaf.instances(c):
      specs.append((key, dt, hf_shape))
      if is_q:
        specs.append((key + fp8.SCALE_SUFFIX, np.dtype(np.float32), fp8.scale_shape(hf_shape, block)))
        fp8_keys.append(key)
  extras = []
  identity = fmt.get("identity_experts", layouts.LAYOUTS[layouts.architecture(c)].identity_expert_tensors)
  if c.num_ffn_experts and c.zero_experts and identity:
    zero = np.zeros((c.expert_ffn_size, c.hidden_size), np.dtype(dtypes.get(
        "model.layers.{l}.mlp.experts.{e}.gate_proj.weight") or param_dtype))
    extras += [(k, zero) for k in layouts.identity_expert_keys(c)]
  specs += [(k, v.dtype, v.shape) for k, v in extras]
  mtp_copy = bool(c.mtp_num_heads) and not c.mtp_shared_module and fmt.get("mtp_embed_copy", True)
  if mtp_copy:  # the MTP head shares the main embedding; the released layout stores a copy
    emb = variables["params"]["embed_tokens"]
    specs.append((MTP_EMBED_KEY, np.dtype(dtypes.get("model.embed_tokens.weight") or param_dtype), tuple(emb.shape)))
  for k, v in (extra_tensors or {}).items():
    v = np.asarray(v)
    extras.append((k, v))
    specs.append((k, v.dtype, v.shape))
  plans = plan_files(specs, max_shard_bytes)
  where = {t.name: (p.name, t) for p in plans for t in p.tensors}

  main = jax.process_index() == 0
  parent = os.path.dirname(os.path.abspath(path)) or "."
  tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(path))}.tmp")
  if main:
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
    os.makedirs(tmp)
  _barrier("save_pretrained:start")
  fds = {}
  try:
    for p in plans:
      fds[p.name] = os.open(os.path.join(tmp, p.name), os.O_WRONLY | os.O_CREAT, 0o644)
      os.ftruncate(fds[p.name], p.size)
      if main:
        pwrite_all(fds[p.name], p.header, 0)
    _write_tensors(variables, leaves, c, where, fds, fp8_keys, block, fp8_scales, host_bytes, main)
    if main:
      for k, v in extras:
        fname, t = where[k]
        _write_box(fds[fname], t, [(0, t.shape[0] if t.shape else 1)], np.asarray(v).astype(t.dtype))
      if mtp_copy:
        emb_leaf = next(l for l in leaves if l.path == ("embed_tokens",))
        _write_copy(variables["params"]["embed_tokens"], emb_leaf, where[MTP_EMBED_KEY], fds, host_bytes)
  finally:
    for fd in fds.values():
      os.close(fd)
  _barrier("save_pretrained:written")
  if main:
    weight_map = {t.name: p.name for p in plans for t in p.tensors}
    total = sum(t.nbytes for p in plans for t in p.tensors)
    with open(os.path.join(tmp, INDEX_NAME), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    hf = config_lib.to_hf_config(c)
    hf["dtype"] = jnp.dtype(c.param_dtype).name
    if quant:
      hf["quantization_config"] = dict(quant)
    with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
      json.dump(hf, f, indent=2)
    _replace_dir(tmp, path)
  _barrier("save_pretrained:done")


def _write_tensors(variables, leaves, c, where, fds, fp8_keys, block, fp8_scales, host_bytes, main):
  """Every leaf's shards into their files; FP8 scales (kept or fresh) written by process 0."""
  source = _ScaleSource(fp8_scales, block) if fp8_keys and fp8_scales is not None else None
  fp8_set = set(fp8_keys)
  for leaf in leaves:
    arr = _get(variables[leaf.collection], leaf.path)
    if not isinstance(arr, jax.Array):
      arr = jnp.asarray(arr)
    inst = list(leaf.instances(c))
    scales = {}
    if inst and inst[0][1] in fp8_set:
      hf_shape = leaf.hf_shape(arr.shape[leaf.lead:])
      kept = {key: source.get(key, hf_shape) for _, key in inst} if source is not None else {}
      fresh = None
      for idx, key in inst:
        if kept.get(key) is None:
          if fresh is None:
            fresh = _fresh_scales(arr, leaf, block)
          kept[key] = fresh[idx] if idx else fresh
      scales = kept
      if main:
        for _, key in inst:
          fname, t = where[key + fp8.SCALE_SUFFIX]
          pwrite_all(fds[fname], np.ascontiguousarray(scales[key], np.float32), t.offset)
    _write_leaf(arr, leaf, where, fds, block, scales, max(host_bytes // 4, 1 << 16))


def _write_copy(arr, leaf, target, fds, host_bytes):
  """A second copy of a leaf under another name (the MTP embedding), from the shards."""
  fname, t = target
  where = {leaf.hf_key: (fname, t)}
  _write_leaf(arr if isinstance(arr, jax.Array) else jnp.asarray(arr), leaf, where, fds, None, {},
              max(host_bytes // 4, 1 << 16))


def _replace_dir(tmp: str, path: str) -> None:
  """Moves `tmp` to `path`; an existing `path` is swapped out only after `tmp` is complete."""
  if os.path.exists(path):
    old = path.rstrip("/") + f".old-{os.getpid()}"
    os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old)
  else:
    os.rename(tmp, path)
