"""Ordered-implementation dispatch, one small registry per op (the tokamax idea).

An op holds implementations in preference order. `implementation=None` ("auto") tries them in
order on the platform the computation runs on; the first that does not raise
`NotImplementedError` wins, and the XLA reference is always last. `"pallas"` tries only Pallas
implementations (compiled for the backend), `"interpret"` runs the Pallas implementations in
interpret mode (the simulated-device mode: any CPU), `"xla"` runs the pure-jnp path.

    @topk_route_op.register("triton", kind="pallas", platforms=("gpu",))
    def _topk_route_triton(logits, bias, ..., interpret=False): ...
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax

IMPLEMENTATIONS = (None, "auto", "pallas", "interpret", "xla")


def current_platform() -> str:
  """The platform ('cpu', 'gpu', 'tpu', or a plugin's name) computations run on by default."""
  p = jax.default_backend()
  return "gpu" if p in ("cuda", "rocm") else p


@dataclasses.dataclass
class _Impl:
  name: str
  fn: Callable
  kind: str  # "pallas" | "xla"
  platforms: tuple[str, ...] | None  # None = any platform


class Op:
  """A kernel entry point with ordered implementations."""

  def __init__(self, name: str):
    self.name = name
    self.impls: list[_Impl] = []

  def register(self, name: str, *, kind: str, platforms: Sequence[str] | None = None):
    if kind not in ("pallas", "xla"):
      raise ValueError(f"{self.name}: kind must be 'pallas' or 'xla', got {kind!r}")

    def deco(fn):
      impl = _Impl(name, fn, kind, tuple(platforms) if platforms else None)
      # XLA references go last so that auto prefers kernels.
      if kind == "xla":
        self.impls.append(impl)
      else:
        n_pallas = sum(i.kind == "pallas" for i in self.impls)
        self.impls.insert(n_pallas, impl)
      return fn

    return deco

  def candidates(self, implementation: str | None, platform: str | None = None) -> list[tuple[_Impl, bool]]:
    """(impl, interpret) pairs to try, in order."""
    if implementation not in IMPLEMENTATIONS:
      raise ValueError(f"{self.name}: implementation={implementation!r} must be one of "
                       "None, 'auto', 'pallas', 'interpret', 'xla'")
    platform = platform or current_platform()
    ok = lambda i: i.platforms is None or platform in i.platforms
    if implementation == "xla":
      return [(i, False) for i in self.impls if i.kind == "xla"]
    if implementation == "interpret":
      return [(i, True) for i in self.impls if i.kind == "pallas"]
    if implementation == "pallas":
      return [(i, False) for i in self.impls if i.kind == "pallas" and ok(i)]
    # auto: compiled kernels for this platform (never on CPU: the XLA path is faster there), then XLA.
    return [(i, False) for i in self.impls if ok(i) and (i.kind == "xla" or platform != "cpu")]

  def __call__(self, *args, implementation: str | None = None, **kwargs):
    tried = []
    for impl, interpret in self.candidates(implementation):
      try:
        if impl.kind == "pallas":
          return impl.fn(*args, interpret=interpret, **kwargs)
        return impl.fn(*args, **kwargs)
      except NotImplementedError as e:
        tried.append(f"{impl.name}: {e}")
    raise NotImplementedError(
        f"{self.name}: no implementation accepted implementation={implementation!r} on platform "
        f"{current_platform()!r}; tried: {tried or 'none registered'}")
