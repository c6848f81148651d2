"""Top-k routing over FFN + zero experts (spec section 3).

`topk_route(logits [T, N+Z] f32, bias [N+Z], k, num_ffn_experts, routed_scaling_factor)`
  -> weights [T, k] f32, indices [T, k] int32, ffn_counts [N] int32.

Softmax over all experts in float32; the expert bias only selects (no gradient through it);
weights are the unbiased probabilities times `routed_scaling_factor`, not renormalised. Zero
experts are the last Z ids. `ffn_counts[i]` is how many (token, slot) pairs chose FFN expert i.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.registry import Op

topk_route_op = Op("topk_route")


def topk_route(logits, bias, k: int, num_ffn_experts: int, routed_scaling_factor: float, *,
               implementation: str | None = None):
  if logits.ndim != 2:
    raise ValueError(f"topk_route: logits must be [tokens, experts], got shape {logits.shape}")
  if bias.shape != logits.shape[-1:]:
    raise ValueError(f"topk_route: bias shape {bias.shape} does not match logits' expert axis {logits.shape[-1]}")
  if not 0 < k <= logits.shape[-1]:
    raise ValueError(f"topk_route: k={k} must be in [1, {logits.shape[-1]}]")
  return topk_route_op(logits, bias, k, num_ffn_experts, routed_scaling_factor,
                       implementation=implementation)


@topk_route_op.register("xla", kind="xla")
def topk_route_reference(logits, bias, k, num_ffn_experts, routed_scaling_factor):
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  scores_for_choice = jax.lax.stop_gradient(probs) + jax.lax.stop_gradient(bias.astype(jnp.float32))
  _, indices = jax.lax.top_k(scores_for_choice, k)
  weights = jnp.take_along_axis(probs, indices, axis=-1) * routed_scaling_factor
  counts = jnp.bincount(indices.reshape(-1), length=logits.shape[-1])[:num_ffn_experts]
  return weights, indices.astype(jnp.int32), counts.astype(jnp.int32)
