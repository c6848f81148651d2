"""Device mesh, the one logical-axis table, and shardings derived from it (the MaxText idea).

Every parameter and the main activations carry logical axis names (`embed`, `heads`, `exp`,
`batch`, ...; see `longcat_jax/model/layers.py`). `LOGICAL_AXIS_RULES` maps them to the five mesh
axes, so a new parallel layout is an edit of that table (or of the mesh sizes), never of the model.

    pc = parallel_config(mesh=dict(data=2, expert=2, tensor=2))
    mesh = make_mesh(pc)
    shardings = variable_shardings(model, mesh)          # {"params": ..., "expert_bias": ...}
    check_replicated(shardings, mesh)                    # no big weight left replicated
    model = model.clone(placement=MeshPlacement(mesh))   # constraints + expert/context parallelism
    step = jax.jit(train_step, in_shardings=..., out_shardings=...)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from longcat_jax.model.moe import EXPERT_BIAS
from longcat_jax.model.placement import LOCAL

MESH_AXES = ("data", "fsdp", "expert", "tensor", "context")

# Logical axis -> mesh axes, in priority order (flax semantics: for each rule in turn, a logical
# axis present in an array takes the rule's mesh axes if it has none yet and none of them is used
# by another dimension). Activations come first so that `batch` claims fsdp/expert before an
# activation's `embed` could; weights then fall through to the FSDP rules.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # Activations.
    ("batch", ("data", "fsdp", "expert")),     # every non-model axis splits the tokens
    ("length", "context"),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("vocab", "tensor"),                        # logits and embed_tokens / lm_head rows
    # Weights.
    ("exp", "expert"),                          # FFN experts: expert parallelism
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("expert_mlp", "tensor"),
    ("embed", ("fsdp", "expert")),              # dense weights: FSDP over fsdp x expert
    ("embed", "fsdp"),                          # expert weights (expert already used by `exp`)
    ("q_lora", ("fsdp", "expert")),
    ("q_lora", "fsdp"),
    ("kv_lora", ("fsdp", "expert")),
    ("kv_lora", "fsdp"),
    # N-gram embedding tables (Lite / 2.0): columns over `expert`, rows over what is left, so a
    # lookup moves [tokens, d / expert] partial rows, not [tokens, d] (model/ngram.py).
    ("ngram_dim", "expert"),
    ("ngram_vocab", ("fsdp", "expert")),
    ("ngram_vocab", "fsdp"),
    ("index_heads", "tensor"),                  # sparse-attention indexer
    ("exp_all", None),                          # router classes (N + Z): small, embed shards it
    ("index_dim", None),
    ("norm", None),
    ("qk_dim", None),
    ("kv_dim", None),
    ("layers", None),                           # the scanned layer axis
)

def override_rules(rules=LOGICAL_AXIS_RULES, **mapping) -> tuple:
  """The table with the first rule of each named logical axis replaced (a layout edit):
  `override_rules(batch=("data", "fsdp"), length=("context", "expert"))`; see `parse_rules`."""
  out, seen = [], set()
  for logical, axes in rules:
    if logical in mapping and logical not in seen:
      seen.add(logical)
      axes = mapping[logical]
    out.append((logical, axes))
  missing = set(mapping) - seen
  if missing:
    raise ValueError(f"override_rules: no rule for logical axes {sorted(missing)} in the table")
  return tuple(out)


def parse_rules(text: str) -> dict[str, tuple[str, ...] | None]:
  """'batch=data+fsdp,length=context+expert,vocab=' -> {'batch': ('data', 'fsdp'), 'length':
  ('context', 'expert'), 'vocab': None} (the CLI form of `override_rules`' edits; '+' joins mesh
  axes, nothing after '=' leaves the logical axis unsharded)."""
  out = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, eq, axes = part.partition("=")
    names = tuple(a for a in axes.split("+") if a) if eq else None
    if not eq or not name or any(a not in MESH_AXES for a in names):
      raise ValueError(f"rules entry {part!r}: want logical=axis[+axis...] with mesh axes from {MESH_AXES}")
    out[name] = names or None
  return out


def fit_batch_rules(mesh, global_batch: int, rules=LOGICAL_AXIS_RULES) -> tuple:
  """If `global_batch` does not divide by the mesh axes of `batch`, moves axes (innermost first)
  from `batch` to `length` until it does: e.g. 256 sequences on fsdp=64 x expert=16 shard the
  batch over fsdp and each sequence over expert."""
  first = lambda name: next(a for l, a in rules if l == name)
  flat = lambda a: () if a is None else ((a,) if isinstance(a, str) else tuple(a))
  batch, length = list(flat(first("batch"))), list(flat(first("length")))
  moved = False
  while batch and global_batch % _axis_size(mesh, batch):
    length.append(batch.pop())
    moved = True
  if global_batch % _axis_size(mesh, batch):
    raise ValueError(f"global batch {global_batch} is not divisible by any split of the mesh {dict(mesh.shape)}")
  return override_rules(rules, batch=tuple(batch), length=tuple(length)) if moved else tuple(rules)


EP_TRANSPORTS = ("auto", "ragged", "gather", "ragged_emulated")


def parallel_config(**overrides: Any) -> ml_collections.ConfigDict:
  """Parallel layout: mesh axis sizes (-1 fills with what is left) and expert-parallel options.

  `dcn_data` > 1 splits the `data` axis into that many groups across the slow network (slices or
  hosts: `mesh_utils.create_hybrid_device_mesh`), the rest of `data` stays inside a group.
  `ep_transport`: how tokens reach their experts' devices (see `expert_parallel.py`): `ragged`
  (`jax.lax.ragged_all_to_all`, GPU/TPU), `gather` (all-gather + reduce-scatter, any backend),
  `auto` (ragged where the mesh's platform supports it). `ep_chunk_tokens` > 0 dispatches the
  local tokens in chunks of that many (bounds the dropless worst-case buffers, see SCALING.md).
  """
  c = ml_collections.ConfigDict()
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, expert=1, tensor=1, context=1))
  c.dcn_data = 1
  c.ep_transport = "auto"
  c.ep_chunk_tokens = 0
  for k, v in overrides.items():
    if k == "mesh":
      unknown = set(v) - set(MESH_AXES)
      if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
      c.mesh.update(v)
    elif k not in c:
      raise ValueError(f"parallel config has no field {k!r}; fields: {sorted(c)}")
    else:
      c[k] = v
  if c.ep_transport not in EP_TRANSPORTS:
    raise ValueError(f"ep_transport={c.ep_transport!r} must be one of {EP_TRANSPORTS}")
  return c


def parse_mesh(text: str) -> dict[str, int]:
  """'fsdp=64,expert=16' -> {'fsdp': 64, 'expert': 16} (the CLI form of a mesh)."""
  out = {}
  for part in filter(None, text.split(",")):
    name, _, size = part.partition("=")
    if name not in MESH_AXES or not size.lstrip("-").isdigit():
      raise ValueError(f"mesh entry {part!r}: want axis=size with axis in {MESH_AXES}")
    out[name] = int(size)
  return out


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Fills the (at most one) -1 axis so that the product equals `num_devices`."""
  sizes = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ValueError(f"mesh axes {fill} are all -1; at most one axis can fill the remaining devices")
  bad = [f"{a}={s}" for a, s in sizes.items() if s == 0 or s < -1]
  if bad:
    raise ValueError(f"mesh sizes {bad} must be positive (or -1 to fill)")
  known = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f"mesh {sizes}: {num_devices} devices are not divisible by the fixed axes' "
                       f"product {known}, so {fill[0]!r} cannot fill them")
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"mesh {sizes} has {math.prod(sizes.values())} devices, but {num_devices} "
                     "are available")
  return sizes


def make_mesh(parallel: ml_collections.ConfigDict | Mapping[str, int] | None = None,
              devices: Sequence[Any] | None = None) -> Mesh:
  """A `Mesh` with axes `MESH_AXES` (all `Auto`, i.e. GSPMD-partitioned under jit).

  `parallel` is a `parallel_config()` (or a plain {axis: size} dict); `devices` default to
  `jax.devices()` (every process's devices, so this is the global mesh under multi-host).
  """
  if parallel is None:
    parallel = parallel_config()
  if not isinstance(parallel, ml_collections.ConfigDict):
    parallel = parallel_config(mesh=dict(parallel))
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_mesh_shape(parallel.mesh, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  dcn = int(parallel.dcn_data)
  if dcn > 1:
    if sizes["data"] % dcn:
      raise ValueError(f"dcn_data={dcn} does not divide the 'data' mesh axis ({sizes['data']})")
    ici = (sizes["data"] // dcn,) + shape[1:]
    granule_is_process = not hasattr(devices[0], "slice_index")
    grid = mesh_utils.create_hybrid_device_mesh(ici, (dcn, 1, 1, 1, 1), devices,
                                                process_is_granule=granule_is_process)
  else:
    # Keep jax.devices() order (process-major): the outer `data` axis then splits across hosts.
    grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def abstract_mesh(sizes: Mapping[str, int], num_devices: int) -> jax.sharding.AbstractMesh:
  """A device-free mesh of the given shape (for layout checks of layouts larger than the host)."""
  s = resolve_mesh_shape(sizes, num_devices)
  return jax.sharding.AbstractMesh(tuple(s[a] for a in MESH_AXES), MESH_AXES,
                                   axis_types=(AxisType.Auto,) * len(MESH_AXES))


# ----------------------------------------------------------------------------------------------
# Logical names -> PartitionSpec -> NamedSharding.


def _axis_size(mesh, axes) -> int:
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh,
                    rules=LOGICAL_AXIS_RULES) -> P:
  """Like `nn.logical_to_mesh_axes`, but a rule is taken only if its mesh axes divide the dim.

  Mesh axes of size 1 are dropped from the result. Unmatched names stay unsharded (and large
  unsharded weights are what `replicated_params` reports).
  """
  if len(names) != len(shape):
    raise ValueError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
  result: list[Any] = [None] * len(names)
  done = [n is None for n in names]
  used: set[str] = set()
  for logical, mesh_axes in rules:
    if logical not in names:
      continue
    pos = list(names).index(logical)
    if done[pos]:
      continue
    axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
    missing = [a for a in axes if a not in mesh.shape]
    if missing:
      raise ValueError(f"rule {logical!r} -> {mesh_axes!r} names mesh axes {missing} that the mesh "
                       f"{dict(mesh.shape)} does not have")
    if used & set(axes) or shape[pos] % _axis_size(mesh, axes):
      continue
    done[pos] = True
    used |= set(axes)
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    result[pos] = axes[0] if len(axes) == 1 else (axes or None)
  return P(*result)


def _is_partitioned(x) -> bool:
  return isinstance(x, nn.Partitioned)


def abstract_variables(model, batch: int = 1, seq: int = 8):
  """`jax.eval_shape` of `model.init`: boxed (logically partitioned) ShapeDtypeStructs, nothing
  allocated. Only the collections that are state (`params`, `expert_bias`) are kept. (Shapes do
  not depend on the placement, so the model is traced on one device.)"""
  model = model.clone(placement=LOCAL)
  ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  shapes = jax.eval_shape(lambda r, i: model.init(r, i), jax.ShapeDtypeStruct((2,), jnp.uint32), ids)
  return {k: shapes[k] for k in ("params", EXPERT_BIAS) if k in shapes}


def logical_names(boxed_tree):
  """Per-leaf logical axis names (a tuple; all None for unannotated state such as expert_bias)."""
  return jax.tree.map(lambda x: tuple(x.names) if _is_partitioned(x) else (None,) * len(x.shape),
                      boxed_tree, is_leaf=_is_partitioned)


def variable_shardings(model, mesh, rules=LOGICAL_AXIS_RULES, boxed=None):
  """NamedShardings for the model's state, {"params": ..., "expert_bias": ...}, plain trees that
  match `init_variables(model, rng)`. `expert_bias` (small, read by every token) is replicated."""
  boxed = abstract_variables(model) if boxed is None else boxed
  def one(x):
    names = tuple(x.names) if _is_partitioned(x) else (None,) * len(x.shape)
    shape = nn.meta.unbox(x).shape
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))
  return jax.tree.map(one, boxed, is_leaf=_is_partitioned)


def abstract_state(model, mesh, rules=LOGICAL_AXIS_RULES):
  """ShapeDtypeStructs with shardings for the model's variables (the planner's input)."""
  boxed = abstract_variables(model)
  shardings = variable_shardings(model, mesh, rules, boxed)
  shapes = nn.meta.unbox(boxed)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                      shardings)


def train_state_shardings(tx, abstract_state, param_shardings, mesh):
  """Shardings for a `train.TrainState`: optimizer moments follow their parameters (found with
  `optax.tree_map_params`, no path strings); counters, step, rng and spike-guard statistics are
  replicated, as is a moment that is a scalar placeholder (Muon's unused second moment)."""
  rep = NamedSharding(mesh, P())
  opt = optax.tree_map_params(tx, lambda x, s: rep if x.ndim == 0 else s, abstract_state.opt_state,
                              param_shardings["params"], transform_non_params=lambda _: rep)
  return abstract_state.replace(step=rep, params=param_shardings["params"], opt_state=opt,
                                expert_bias=param_shardings["expert_bias"], rng=rep,
                                guard=jax.tree.map(lambda _: rep, abstract_state.guard))


def batch_spec(mesh, rules=LOGICAL_AXIS_RULES, shape: Sequence[int] | None = None) -> P:
  """PartitionSpec of a [batch, seq] array (token ids, targets, masks)."""
  shape = shape or (_axis_size(mesh, mesh.axis_names),) * 2  # divisible by anything
  return logical_to_spec(("batch", "length"), shape, mesh, rules)


def batch_sharding(mesh, rules=LOGICAL_AXIS_RULES, shape: Sequence[int] | None = None):
  return NamedSharding(mesh, batch_spec(mesh, rules, shape))


def shard_batch(batch, mesh, rules=LOGICAL_AXIS_RULES):
  """Places a host-global numpy batch {name: [B, S]} on the mesh (single process; for multi-host
  use `distributed.global_batch`)."""
  return {k: jax.device_put(v, batch_sharding(mesh, rules, v.shape)) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# The replicated-parameter check.


@dataclasses.dataclass(frozen=True)
class Replicated:
  path: str
  shape: tuple[int, ...]
  bytes: int

  def __str__(self):
    return f"{self.path} {list(self.shape)} ({self.bytes / 2**20:.1f} MiB)"


def replicated_params(shardings, shapes, mesh=None, threshold_bytes: int = 2**20) -> list[Replicated]:
  """Leaves of at least `threshold_bytes` whose sharding uses no mesh axis of size > 1.

  `shardings` and `shapes` (anything with .shape/.dtype) are trees of the same structure.
  """
  out = []
  flat_sh = jax.tree_util.tree_flatten_with_path(shardings)[0]
  flat_x = jax.tree.leaves(shapes)
  if len(flat_sh) != len(flat_x):
    raise ValueError(f"shardings ({len(flat_sh)} leaves) and shapes ({len(flat_x)}) differ in structure")
  for (path, sh), x in zip(flat_sh, flat_x):
    m = mesh or sh.mesh
    spec_axes = [a for d in sh.spec if d is not None for a in ((d,) if isinstance(d, str) else d)]
    if any(m.shape[a] > 1 for a in spec_axes) or math.prod(m.shape.values()) == 1:
      continue
    nbytes = math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
    if nbytes >= threshold_bytes:
      out.append(Replicated(jax.tree_util.keystr(path), tuple(x.shape), nbytes))
  return out


def check_replicated(shardings, shapes, mesh=None, threshold_bytes: int = 2**20) -> None:
  """Raises ValueError naming every parameter >= threshold that is left fully replicated."""
  bad = replicated_params(shardings, shapes, mesh, threshold_bytes)
  if bad:
    m = mesh or jax.tree.leaves(shardings)[0].mesh
    raise ValueError(f"{len(bad)} parameters of >= {threshold_bytes} bytes are replicated on every "
                     f"device of mesh {dict(m.shape)}; add or fix a rule in LOGICAL_AXIS_RULES:\n  "
                     + "\n  ".join(map(str, bad)))
