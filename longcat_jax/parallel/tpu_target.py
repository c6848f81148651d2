"""Plans for TPUs, compiled by the TPU compiler on a CPU host.

With `libtpu` installed (`pip install -e .[tpu]`), `jax.experimental.topologies` hands out
compile-only devices of any TPU topology: nothing runs, but `jax.jit(...).lower(...).compile()`
over them runs the real TPU compiler (XLA:TPU and Mosaic), so its buffer assignment, cost model
and collective schedule can be read off a CPU machine, as MaxText's `train_compile.py` does.

    target = tpu_target.Target.parse("v5p-256")          # or "v5p:4x4x8", "v5p-256,slices=2"
    mesh = tpu_target.make_mesh(target, {"fsdp": 16, "expert": 8})
    compiled = jax.jit(step, ...).lower(*abstract_args).compile()     # under the mesh
    plan = tpu_target.analyze(compiled, target, model_flops=...)
    print(tpu_target.format_plan(plan))

`analyze` reports the compiler's per-device memory (`memory_analysis`), its cost analysis
(FLOPs, bytes accessed), a ROOFLINE ESTIMATE of the step time (max of compute at the chip's
datasheet peak and HBM traffic at its datasheet bandwidth; communication not included) with the
MFU it implies, and the collectives of the scheduled HLO: an asynchronous collective is a
`*-start` / `*-done` pair (or `async-start` / `async-done` around one), and the compute the
scheduler placed between the two is what it overlaps. XLA turns a pair with nothing between into
a synchronous op, so a synchronous collective in the final HLO overlaps nothing.

Caveats: the cost analysis counts XLA's own ops; a Mosaic kernel counts only what its
`CostEstimate` declares (splash attention declares none here), so `model_flops` (analytic) is
used for the compute time when it is larger. The roofline ignores ICI/DCN time; the collective
bytes are listed beside it.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import math
import re
from typing import Mapping

import jax
import numpy as np
from jax.experimental import mesh_utils, topologies
from jax.sharding import AxisType, Mesh

from longcat_jax.parallel import sharding

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation's datasheet figures (per chip; one JAX device per chip)."""
  name: str                 # as in topology names: "v5p"
  device_kind: str          # jax Device.device_kind of its compile-only devices
  peak_bf16_flops: float    # FLOP/s, dense bf16
  hbm_bytes: float
  hbm_bandwidth: float      # bytes/s
  ici_bandwidth: float      # bytes/s per chip, bidirectional
  cores_in_name: int        # "v5p-256" counts TensorCores (2 per chip); "v6e-256" counts chips
  torus_dims: int
  source: str


CHIPS = {c.name: c for c in (
    Chip("v5p", "TPU v5", 459e12, 95 * GiB, 2765e9, 1200e9, 2, 3,
         "https://cloud.google.com/tpu/docs/v5p (459 TFLOP/s bf16, 95 GiB HBM at 2,765 GB/s, ICI 1,200 GB/s)"),
    Chip("v6e", "TPU v6 lite", 918e12, 32e9, 1638e9, 800e9, 1, 2,
         "https://cloud.google.com/tpu/docs/v6e (918 TFLOP/s bf16, 32 GB HBM at 1,638 GB/s, ICI 800 GB/s)"),
    Chip("v5e", "TPU v5 lite", 197e12, 16e9, 819e9, 400e9, 1, 2,
         "https://cloud.google.com/tpu/docs/v5e (197 TFLOP/s bf16, 16 GB HBM at 819 GB/s, ICI 400 GB/s)"),
)}
ALIASES = {"v5litepod": "v5e", "v6": "v6e"}


def slice_shape(chip: Chip, chips: int) -> tuple[int, ...]:
  """The standard slice shape of `chips` chips: start from 1 x .. x 1 and double the smallest
  dimension (the last of equals): v5p 128 chips -> 4x4x8, 512 -> 8x8x8; v6e 256 -> 16x16 (the
  shapes of the Cloud TPU docs' configuration tables)."""
  if chips < 1 or chips & (chips - 1):
    raise ValueError(f"{chip.name}: {chips} chips is not a power of two; give the shape (e.g. {chip.name}:4x4x8)")
  shape = [1] * chip.torus_dims
  while math.prod(shape) < chips:
    i = max(j for j in range(len(shape)) if shape[j] == min(shape))
    shape[i] *= 2
  return tuple(shape)


@dataclasses.dataclass(frozen=True)
class Target:
  """A TPU topology to compile for: the chip, its slice shape and the number of slices."""
  chip: Chip
  shape: tuple[int, ...]
  num_slices: int = 1

  @classmethod
  def parse(cls, text: str) -> "Target":
    """"v5p-256" (Cloud naming: TensorCores for v5p, chips for v5e/v6e), "v5p:4x4x8" (slice
    shape), either with ",slices=N" for N slices over the data-center network."""
    name, *opts = text.split(",")
    slices = 1
    for opt in opts:
      key, _, value = opt.partition("=")
      if key.strip() != "slices" or not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"TPU target {text!r}: option {opt!r} is not slices=N (N >= 1)")
      slices = int(value)
    m = re.fullmatch(r"([a-z0-9]+?)(?:-(\d+)|:(\d+(?:x\d+)*))", name.strip())
    gen = m and ALIASES.get(m.group(1), m.group(1))
    if not m or gen not in CHIPS:
      raise ValueError(f"TPU target {text!r}: want GEN-COUNT or GEN:AxBxC with GEN one of "
                       f"{sorted(CHIPS)} (e.g. v5p-256, v5p:4x4x8, v6e-256,slices=2)")
    chip = CHIPS[gen]
    if m.group(2):
      count = int(m.group(2))
      if count % chip.cores_in_name:
        raise ValueError(f"TPU target {text!r}: {chip.name} counts {chip.cores_in_name} cores per chip")
      try:
        shape = slice_shape(chip, count // chip.cores_in_name)
      except ValueError as e:
        raise ValueError(f"TPU target {text!r}: {e}") from None
    else:
      shape = tuple(int(d) for d in m.group(3).split("x"))
      if len(shape) != chip.torus_dims:
        raise ValueError(f"TPU target {text!r}: {chip.name} slices are {chip.torus_dims}-D")
    return cls(chip, shape, slices)

  @property
  def name(self) -> str:
    return f"{self.chip.name}:{'x'.join(map(str, self.shape))}" + (
        f" x {self.num_slices} slices" if self.num_slices > 1 else "")

  @property
  def num_devices(self) -> int:
    return math.prod(self.shape) * self.num_slices

  def devices(self) -> list:
    """Compile-only devices of the topology (needs libtpu; nothing is opened)."""
    if importlib.util.find_spec("libtpu") is None:
      raise RuntimeError(f"compiling for {self.name} needs the TPU compiler: pip install -e '.[tpu]' (libtpu)")
    kwargs = {"num_slices": self.num_slices} if self.num_slices > 1 else {}
    devs = topologies.get_topology_desc(f"{self.chip.name}:{'x'.join(map(str, self.shape))}", "tpu",
                                        **kwargs).devices
    if devs[0].device_kind != self.chip.device_kind or len(devs) != self.num_devices:
      raise RuntimeError(f"libtpu gave {len(devs)} {devs[0].device_kind!r} devices for {self.name}; "
                         f"expected {self.num_devices} {self.chip.device_kind!r}")
    return list(devs)


def make_mesh(target: Target, sizes: Mapping[str, int], devices=None) -> Mesh:
  """The trainer's mesh axes over the target's devices. One slice: `mesh_utils.create_device_mesh`
  (axes laid along the torus). Several: the `data` axis spans the slices (`dcn_data`)."""
  devices = target.devices() if devices is None else devices
  sizes = sharding.resolve_mesh_shape(dict(sizes), len(devices))
  if target.num_slices > 1:
    return sharding.make_mesh(sharding.parallel_config(mesh=sizes, dcn_data=target.num_slices), devices)
  shape = tuple(sizes[a] for a in sharding.MESH_AXES)
  grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  return Mesh(grid, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * len(sharding.MESH_AXES))


# ---------------------------------------------------------------------------------------------
# The compiled program: memory, cost, roofline, collectives.


@dataclasses.dataclass
class Collective:
  kind: str                 # all-gather, all-reduce, reduce-scatter, all-to-all, ...
  category: str             # from the op's source location (layer part)
  bytes: int                # result size per device
  computation: str          # the HLO computation it is scheduled in
  asynchronous: bool
  overlapped: collections.Counter  # categories of the compute ops scheduled between start and done


@dataclasses.dataclass
class Plan:
  target: Target
  memory: dict              # bytes per device: arguments, outputs, aliased, temporaries, code, total
  flops: float              # compiler cost analysis, per device
  bytes_accessed: float
  model_flops: float        # analytic, per device (0 if not given)
  roofline_seconds: float
  compute_seconds: float
  memory_seconds: float
  mfu: float                # model_flops / (roofline time * peak); nan without model_flops
  collectives: list


_COLLECTIVE = re.compile(r"\s(all-gather|all-reduce|reduce-scatter|all-to-all|ragged-all-to-all|"
                         r"collective-permute|async)(-start|-done)?\(")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_SHAPE = re.compile(r"\b(pred|[subf]\d+|bf16)\[([\d,]*)\]")
_NBYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
           "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_OPCODE = re.compile(r"\s([a-z][a-z0-9\-]*)\((?:%|\))")
# Ops that move no data through the cores: never counted as overlapping compute.
_BOOKKEEPING = {"get-tuple-element", "bitcast", "parameter", "constant", "tuple", "copy-start",
                "copy-done", "opt-barrier", "after-all", "partition-id", "replica-id", "add-dependency"}


def category(op_name: str) -> str:
  """The model part an HLO op comes from: the path segment after `layers/` (attn_0, mlp_0, moe,
  attn_1, mlp_1, ...; `moe` split into its dispatch shard_map and the router), else a coarse tag."""
  m = re.search(r"/layers/([a-z_]+\d*)(/shard_map)?", op_name)
  if m:
    return m.group(1) + ("/dispatch" if m.group(2) and m.group(1) == "moe" else "")
  for key, cat in (("mtp", "mtp"), ("embed", "embedding"), ("lm_head", "lm_head"), ("loss", "loss"),
                   ("optimizer", "optimizer"), ("adam", "optimizer")):
    if key in op_name:
      return cat
  return "other"


def _result_bytes(decl: str) -> int:
  head = decl.split(" ", 1)[0] if not decl.startswith("(") else decl[:decl.index(")") + 1]
  return sum(_NBYTES.get(t, 4) * math.prod(int(d) for d in dims.split(",") if d)
             for t, dims in _SHAPE.findall(head))


_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*->.*\{$")


def _computations(hlo: str):
  """{name: [(instr name, text)]} in schedule order (the compiled module is scheduled). An
  instruction may span lines (a Mosaic kernel's config): continuation lines join its text."""
  comps, current = {}, None
  for line in hlo.splitlines():
    if current is None:
      if (h := _HEADER.match(line)):
        current = comps.setdefault(h.group(1), [])
    elif line == "}":
      current = None
    elif (m := _INSTR.match(line)):
      current.append((m.group(1), m.group(2)))
    elif current:
      current[-1] = (current[-1][0], current[-1][1] + "\n" + line)
  return comps


def _is_compute(text: str) -> bool:
  """An instruction that occupies the core (fusion, dot, kernel, loop, ...): not bookkeeping, not
  another collective."""
  m = _OPCODE.search(" " + text)
  return bool(m) and m.group(1) not in _BOOKKEEPING and not _COLLECTIVE.search(" " + text)


def collectives(hlo: str) -> list[Collective]:
  """Every collective in the compiled (scheduled) HLO with what is scheduled during it."""
  comps = _computations(hlo)
  # Collectives wrapped by async-start: the computation they call holds the collective itself.
  wrapped = {name: m.group(1) for name, instrs in comps.items() for _, text in instrs
             if (m := _COLLECTIVE.search(" " + text)) and m.group(1) != "async"}
  out = []
  for comp, instrs in comps.items():
    if comp in wrapped and len(instrs) <= 3:  # the body of an async wrapper, counted at its start
      continue
    for pos, (name, text) in enumerate(instrs):
      m = _COLLECTIVE.search(" " + text)
      if not m or m.group(2) == "-done":
        continue
      kind = m.group(1)
      if kind == "async":
        called = re.search(r"calls=%([\w.\-]+)", text)
        kind = wrapped.get(called.group(1)) if called else None
        if kind is None:
          continue  # an async call that is not a collective (e.g. a SparseCore offload)
      op = re.search(r'op_name="([^"]*)"', text)
      over = collections.Counter()
      if m.group(2) == "-start":
        for _, later in instrs[pos + 1:]:
          if re.search(rf"-done\(%{re.escape(name)}[),]", later):
            break
          if _is_compute(later):
            lop = re.search(r'op_name="([^"]*)"', later)
            over[category(lop.group(1) if lop else "")] += 1
      out.append(Collective(kind, category(op.group(1) if op else ""), _result_bytes(text), comp,
                            m.group(2) == "-start", over))
  return out


def analyze(compiled, target: Target, model_flops: float = 0.0) -> Plan:
  """The plan of a program compiled for `target` (see the module docstring). model_flops: the
  analytic FLOPs per device of one call (e.g. `train.metrics.training_flops_per_token` x tokens
  / devices)."""
  ma = compiled.memory_analysis()
  memory = dict(arguments=ma.argument_size_in_bytes, outputs=ma.output_size_in_bytes,
                aliased=ma.alias_size_in_bytes, temporaries=ma.temp_size_in_bytes,
                code=ma.generated_code_size_in_bytes)
  memory["total"] = (memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"]
                     + memory["code"])
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
    cost = cost[0] if cost else {}
  flops, nbytes = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  chip = target.chip
  compute = max(flops, model_flops) / chip.peak_bf16_flops
  mem = nbytes / chip.hbm_bandwidth
  t = max(compute, mem)
  mfu = model_flops / (t * chip.peak_bf16_flops) if model_flops and t > 0 else math.nan
  return Plan(target, memory, flops, nbytes, model_flops, t, compute, mem, mfu,
              collectives(compiled.as_text()))


def overlap_summary(plan: Plan, kinds_of: str = "moe/dispatch") -> dict:
  """For the collectives of one category (default: the MoE dispatch shard_map), how many are
  asynchronous and which model parts the scheduler ran during them: {"collectives", "async",
  "overlapped": Counter}. The ScMoE question is whether attn_1 / mlp_0 / mlp_1 appear there."""
  mine = [c for c in plan.collectives if c.category == kinds_of]
  over = collections.Counter()
  for c in mine:
    over.update(c.overlapped)
  return dict(collectives=len(mine), asynchronous=sum(c.asynchronous for c in mine), overlapped=over)


def _fmt_bytes(b: float) -> str:
  return f"{b / GiB:.2f} GiB" if b >= 2**28 else f"{b / 2**20:.1f} MiB"


def format_plan(plan: Plan) -> str:
  """A printable report (what `experiments/plan.py --target tpu:...` prints)."""
  c, m = plan.target.chip, plan.memory
  lines = [f"== TPU compiler ({plan.target.name}, {plan.target.num_devices} x {c.device_kind}), per device:",
           f"  arguments {_fmt_bytes(m['arguments'])}, outputs not aliased {_fmt_bytes(m['outputs'] - m['aliased'])}, "
           f"temporaries {_fmt_bytes(m['temporaries'])}, code {_fmt_bytes(m['code'])}: TOTAL "
           f"{_fmt_bytes(m['total'])} of {_fmt_bytes(c.hbm_bytes)} HBM "
           f"({'fits' if m['total'] <= c.hbm_bytes else 'DOES NOT FIT'}, {100 * m['total'] / c.hbm_bytes:.0f}%)",
           f"  cost analysis: {plan.flops / 1e12:.3f} TFLOP (XLA ops; Mosaic kernels only as declared), "
           f"{plan.bytes_accessed / GiB:.2f} GiB accessed"
           + (f"; analytic model FLOPs {plan.model_flops / 1e12:.3f} TFLOP" if plan.model_flops else ""),
           f"  ROOFLINE ESTIMATE (not a measurement; no communication time): step >= "
           f"{plan.roofline_seconds * 1e3:.2f} ms = max(compute {plan.compute_seconds * 1e3:.2f} ms at "
           f"{c.peak_bf16_flops / 1e12:.0f} TFLOP/s, HBM {plan.memory_seconds * 1e3:.2f} ms at "
           f"{c.hbm_bandwidth / 1e9:,.0f} GB/s)"
           + (f"; MFU <= {100 * plan.mfu:.1f}% (100% = compute-bound at the analytic FLOPs: only the "
              "HBM term can lower this bound)" if not math.isnan(plan.mfu) else ""),
           f"  datasheet: {c.source}"]
  by_kind = collections.defaultdict(lambda: [0, 0, 0])
  for col in plan.collectives:
    k = by_kind[(col.kind, col.category)]
    k[0] += 1
    k[1] += col.asynchronous
    k[2] += col.bytes
  total = sum(col.bytes for col in plan.collectives)
  lines.append(f"  collectives (an op in a loop body counted once): {len(plan.collectives)} ops, "
               f"{_fmt_bytes(total)} results; at ICI {c.ici_bandwidth / 1e9:,.0f} GB/s that is "
               f">= {total / c.ici_bandwidth * 1e3:.2f} ms if nothing overlapped")
  for (kind, cat), (n, n_async, b) in sorted(by_kind.items(), key=lambda kv: -kv[1][2]):
    lines.append(f"    {kind:<18} {cat:<14} {n:>4} ops, {n_async:>3} async, {_fmt_bytes(b):>10}")
  moe = overlap_summary(plan)
  if moe["collectives"]:
    dense = {k: v for k, v in moe["overlapped"].items() if not k.startswith("moe")}
    lines.append(f"  ScMoE overlap: {moe['asynchronous']} of {moe['collectives']} MoE-dispatch collectives are "
                 f"asynchronous; compute scheduled during them: {dict(moe['overlapped']) or 'none'}; "
                 f"dense-branch ops among it: {dense or 'none'}")
  return "\n".join(lines)
