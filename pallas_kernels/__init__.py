"""Kernels for LongCat's hot paths, each beside its pure-jnp reference, behind one dispatch.

Every public function takes `implementation=None|"pallas"|"interpret"|"xla"` (None = choose by
platform; "MODE:tpu" etc. for another target platform; see `registry.py`). GPU kernels are
Triton, TPU kernels Mosaic (`*_tpu.py`, and megablox in grouped_matmul.py). The model reaches them through `config.kernels`.
"""

from pallas_kernels.registry import Op, current_platform
from pallas_kernels.topk_route import topk_route, topk_route_reference
from pallas_kernels.grouped_matmul import grouped_matmul, grouped_matmul_reference
from pallas_kernels.mla_attention import mla_attention, mla_attention_reference
from pallas_kernels.mla_decode import mla_decode_attention, mla_decode_reference
from pallas_kernels.mqa_attention import mqa_attention, mqa_attention_reference
# TPU (Mosaic) kernels: importing them registers them in the ops above, after the GPU kernels.
from pallas_kernels import mla_attention_tpu, mla_decode_tpu, sparse_attention_tpu  # noqa: F401

__all__ = ["Op", "current_platform", "topk_route", "topk_route_reference", "grouped_matmul",
           "grouped_matmul_reference", "mla_attention", "mla_attention_reference",
           "mla_decode_attention", "mla_decode_reference", "mqa_attention", "mqa_attention_reference"]
