"""Ordered-implementation dispatch, one small registry per op (the tokamax idea).

An op holds implementations in preference order: vendor-library calls (e.g. cuDNN through
`jax.nn.dot_product_attention`, where they measured faster), then Pallas kernels, then XLA paths
(each in registration order, the exact reference last). Each implementation may raise
`NotImplementedError` for shapes or platforms it cannot do; the next one is tried.

`implementation=` on every public entry point:
  None / "auto"  the platform the computation runs on decides: library calls and compiled kernels
                 registered for it, then the XLA paths. On CPU only the XLA paths (Pallas on CPU
                 is interpret-only).
  "pallas"       only Pallas kernels registered for this platform, compiled (Triton / Mosaic).
  "interpret"    the Pallas kernels in interpret mode, whatever their platform (tests on CPU).
  "xla"          only the pure-jnp paths.
  "MODE:PLATFORM" (e.g. "auto:tpu", "pallas:tpu", "interpret:tpu") the same modes for a target
                 platform other than the one JAX runs on: compiling a TPU program ahead of time on a
                 CPU host (the planner), or testing it there. "interpret:P" is what auto picks on P
                 with its Pallas kernels interpreted (library calls skipped, XLA paths after them);
                 plain "interpret" keeps every Pallas kernel whatever its platform, in
                 registration order. While an implementation runs, `current_platform()` names the
                 target, so XLA paths that differ by platform follow it.

    op = Op("topk_route")
    op.register("triton", kind="pallas", platforms=("gpu",))(topk_route_pallas)  # fn(..., interpret=bool)
    op.register("xla", kind="xla")(topk_route_reference)
"""

from __future__ import annotations

import contextvars
import dataclasses
from typing import Callable, Sequence

import jax

IMPLEMENTATIONS = (None, "auto", "pallas", "interpret", "xla")
KINDS = ("library", "pallas", "xla")  # preference order under auto
PLATFORMS = ("cpu", "gpu", "tpu")  # targets a "MODE:PLATFORM" implementation may name

# The platform an op is being dispatched for, while one of its implementations is traced (set
# only inside `Op.__call__`, for a "MODE:PLATFORM" implementation).
_target = contextvars.ContextVar("pallas_kernels_target_platform", default=None)


def current_platform() -> str:
  """The platform ('cpu', 'gpu', 'tpu', or a plugin's name) the computation being traced targets:
  the one named by a "MODE:PLATFORM" implementation while it is dispatched, else JAX's default."""
  if (t := _target.get()) is not None:
    return t
  p = jax.default_backend()
  return "gpu" if p in ("cuda", "rocm") else p


def parse_implementation(implementation: str | None) -> tuple[str | None, str | None]:
  """"pallas:tpu" -> ("pallas", "tpu"); "auto" -> ("auto", None). ValueError names the bad part."""
  if implementation is None or ":" not in implementation:
    mode, platform = implementation, None
  else:
    mode, platform = implementation.split(":", 1)
    if platform not in PLATFORMS or mode in ("xla", "", None):
      raise ValueError(f"implementation={implementation!r}: want MODE:PLATFORM with MODE one of "
                       f"'auto', 'pallas', 'interpret' and PLATFORM one of {PLATFORMS}")
  if mode not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r} must be one of None, 'auto', 'pallas', "
                     "'interpret', 'xla' (optionally MODE:PLATFORM, e.g. 'auto:tpu')")
  return mode, platform


@dataclasses.dataclass(frozen=True)
class Implementation:
  name: str
  fn: Callable
  kind: str  # "library" (auto only) | "pallas" (called with interpret=bool) | "xla"
  platforms: tuple[str, ...] | None  # None = any platform
  auto: bool = True  # False: only when asked for by mode ("pallas"/"interpret"), never by auto

  def runs_on(self, platform: str) -> bool:
    return self.platforms is None or platform in self.platforms


class Op:
  """A kernel entry point with ordered implementations."""

  def __init__(self, name: str):
    self.name = name
    self.impls: list[Implementation] = []

  def register(self, name: str, *, kind: str, platforms: Sequence[str] | None = None, auto: bool = True):
    """Decorator adding `fn` after the implementations of its kind registered so far. auto=False
    keeps a kernel out of the automatic choice (where it measured slower than the XLA path)."""
    if kind not in KINDS:
      raise ValueError(f"{self.name}: kind must be one of {KINDS}, got {kind!r}")
    if any(i.name == name for i in self.impls):
      raise ValueError(f"{self.name}: an implementation named {name!r} is already registered")

    def deco(fn):
      impl = Implementation(name, fn, kind, tuple(platforms) if platforms else None, auto)
      # Keep the impls grouped by kind in KINDS order, registration order within a kind.
      rank = KINDS.index(kind)
      self.impls.insert(sum(KINDS.index(i.kind) <= rank for i in self.impls), impl)
      return fn

    return deco

  def get(self, name: str) -> Implementation:
    """One implementation by name (tests call a specific kernel this way)."""
    for impl in self.impls:
      if impl.name == name:
        return impl
    raise KeyError(f"{self.name}: no implementation {name!r}; registered: {[i.name for i in self.impls]}")

  def candidates(self, implementation: str | None,
                 platform: str | None = None) -> list[tuple[Implementation, bool]]:
    """(impl, interpret) pairs to try, in order. `platform`: the target when the implementation
    names none (default: `current_platform()`)."""
    try:
      mode, target = parse_implementation(implementation)
    except ValueError as e:
      raise ValueError(f"{self.name}: {e}") from None
    platform = target or platform or current_platform()
    implementation = mode
    if implementation == "xla":
      return [(i, False) for i in self.impls if i.kind == "xla"]
    if implementation == "interpret" and target is not None:  # auto's choice on target, interpreted
      return [(i, i.kind == "pallas") for i in self.impls
              if i.runs_on(platform) and (i.kind == "xla" or (i.kind == "pallas" and i.auto))]
    if implementation == "interpret":
      return [(i, True) for i in self.impls if i.kind == "pallas"]
    if implementation == "pallas":
      return [(i, False) for i in self.impls if i.kind == "pallas" and i.runs_on(platform)]
    # auto: compiled kernels for this platform (never on CPU: the XLA path is faster there), then XLA.
    return [(i, False) for i in self.impls
            if i.runs_on(platform) and (i.kind == "xla" or (platform != "cpu" and i.auto))]

  def __call__(self, *args, implementation: str | None = None, **kwargs):
    tried = []
    target = parse_implementation(implementation)[1]
    for impl, interpret in self.candidates(implementation):
      token = _target.set(target) if target else None
      try:
        if impl.kind == "pallas":
          return impl.fn(*args, interpret=interpret, **kwargs)
        return impl.fn(*args, **kwargs)
      except NotImplementedError as e:
        tried.append(f"{impl.name}: {e}")
      finally:
        if token is not None:
          _target.reset(token)
    raise NotImplementedError(
        f"{self.name}: no implementation accepted implementation={implementation!r} on platform "
        f"{target or current_platform()!r}; tried: {tried or 'none registered for this mode and platform'}")
