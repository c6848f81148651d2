"""Hugging Face checkpoint interop: `load_pretrained` / `save_pretrained` (spec section 7).

Keys follow `transformers.LongcatFlashForCausalLM` (PyTorch [out, in] layout, one tensor per
expert). Loading is lazy: one stacked JAX leaf at a time is assembled from safetensors slices, so
host memory peaks at the largest stacked tensor plus the result. Every problem (unknown key,
missing tensor, wrong shape, truncated/corrupt file) is a `CheckpointError` naming the file and
the tensor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from typing import Callable, Iterator

import flax
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from longcat_jax import config as config_lib
from longcat_jax.config import ConfigDict, qk_head_dim
from longcat_jax.model import EXPERT_BIAS, LongcatForCausalLM

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# Keys that are understood but not part of the main model's variables.
_ASIDE = re.compile(r"^model\.mtp\.")
# LongCat-2.0: n-gram tables stored with the MTP module, which the released code never reads
# (`mtp_disable_over_tokenizer`); kept aside (`read_mtp_tensors`) and never loaded.
_UNUSED_MTP_NGRAM = re.compile(r"^model\.mtp\..*oe_embed_(tokens|proj)\d+\.weight$")
_IGNORED = re.compile(r"(rotary_emb\.(inv_freq|original_inv_freq)$)")


class CheckpointError(ValueError):
  """A checkpoint problem, naming the file and the tensor."""


# ---------------------------------------------------------------------------------------------
# The key map: each JAX leaf is built from HF tensors; the transform maps one HF tensor
# (numpy, [out, in]) to one JAX slice.


@dataclasses.dataclass(frozen=True)
class Leaf:
  collection: str
  path: tuple[str, ...]
  hf_key: str                      # template with {l} (layer) and/or {e} (expert) fields
  to_jax: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]
  per_layer: bool = False
  per_expert: bool = False


def _t(x):
  return np.ascontiguousarray(x.T)


def _ident(x):
  return x


def _leaves(c: ConfigDict) -> list[Leaf]:
  nh, qk, v, r = c.num_heads, qk_head_dim(c), c.v_head_dim, c.kv_lora_rank
  kvd = c.qk_nope_head_dim + v
  heads_in = lambda d: (lambda w: _t(w).reshape(w.shape[1], nh, d))          # [nh*d, in] -> [in, nh, d]
  heads_out = lambda d: (lambda w: w.reshape(w.shape[0], -1).T.copy())        # [in, nh, d] -> [nh*d, in]
  o_in = lambda w: _t(w).reshape(nh, v, w.shape[0])                           # [H, nh*v] -> [nh, v, H]
  o_out = lambda w: w.reshape(nh * v, -1).T.copy()
  leaves = [
      Leaf("params", ("embed_tokens",), "model.embed_tokens.weight", _ident, _ident),
      Leaf("params", ("final_norm", "scale"), "model.norm.weight", _ident, _ident),
  ]
  if not c.tie_word_embeddings:
    leaves.append(Leaf("params", ("lm_head",), "lm_head.weight", _t, _t))
  if c.ngram_embedding is not None:
    leaves += _ngram_leaves(c)
  if c.sparse_attention is not None:
    leaves += _indexer_leaves(c)
  lay = ("decoder", "layers")
  pre = "model.layers.{l}."
  for i in (0, 1):
    a = f"{pre}self_attn.{i}."
    leaves += [
        Leaf("params", lay + (f"input_norm_{i}", "scale"), f"{pre}input_layernorm.{i}.weight", _ident, _ident, True),
        Leaf("params", lay + (f"post_attn_norm_{i}", "scale"), f"{pre}post_attention_layernorm.{i}.weight",
             _ident, _ident, True),
        Leaf("params", lay + (f"attn_{i}", "q_a"), a + "q_a_proj.weight", _t, _t, True),
        Leaf("params", lay + (f"attn_{i}", "q_a_norm"), a + "q_a_layernorm.weight", _ident, _ident, True),
        Leaf("params", lay + (f"attn_{i}", "q_b"), a + "q_b_proj.weight", heads_in(qk), heads_out(qk), True),
        Leaf("params", lay + (f"attn_{i}", "kv_a"), a + "kv_a_proj_with_mqa.weight", _t, _t, True),
        Leaf("params", lay + (f"attn_{i}", "kv_a_norm"), a + "kv_a_layernorm.weight", _ident, _ident, True),
        Leaf("params", lay + (f"attn_{i}", "kv_b"), a + "kv_b_proj.weight", heads_in(kvd), heads_out(kvd), True),
        Leaf("params", lay + (f"attn_{i}", "o"), a + "o_proj.weight", o_in, o_out, True),
    ]
    for proj, ours in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
      leaves.append(Leaf("params", lay + (f"mlp_{i}", ours), f"{pre}mlps.{i}.{proj}.weight", _t, _t, True))
  moe = lay + ("moe",)
  leaves += [
      Leaf("params", moe + ("router",), pre + "mlp.router.classifier.weight", _t, _t, True),
      Leaf(EXPERT_BIAS, moe + ("router",), pre + "mlp.router.e_score_correction_bias", _ident, _ident, True),
  ]
  if c.num_ffn_experts:
    for proj, ours in (("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_down")):
      leaves.append(Leaf("params", moe + (ours,), pre + f"mlp.experts.{{e}}.{proj}.weight", _t, _t, True, True))
  if c.mtp_num_heads:
    leaves += _mtp_leaves_v2(c, leaves) if c.mtp_shared_module else _mtp_leaves(c, leaves)
  return leaves


def released_v2_layout(c: ConfigDict) -> bool:
  """Whether `c` is written in the released LongCat-2.0 layout (`model.oe_embed_*`, one MTP module)."""
  return c.sparse_attention is not None or bool(c.mtp_shared_module)


def _mtp_leaves_v2(c: ConfigDict, main: list[Leaf]) -> list[Leaf]:
  """LongCat-2.0's ONE MTP module `model.mtp.layers.0.*` <-> params['mtp'] (`mtp_shared_module`):
  its MLA under `self_attn.*` with its own indexer `self_attn.indexer.*`, `transformer_layer.mlp.*`,
  `eh_proj`, `enorm.m` / `hnorm.m`, and `model.mtp.embed_tokens` / `model.mtp.norm` (key names of
  the release as third-party converters read them; docs/LONGCAT2.md section 4)."""
  pre, path = "model.mtp.layers.0.", ("mtp", "layer")
  leaves = [Leaf("params", ("mtp", "final_norm", "scale"), "model.mtp.norm.weight", _ident, _ident),
            Leaf("params", ("mtp", "embed_tokens"), MTP_EMBED_KEY, _ident, _ident)]
  leaves += [
      Leaf("params", path + ("eh_proj",), pre + "eh_proj.weight", _t, _t),
      Leaf("params", path + ("enorm", "scale"), pre + "enorm.m.weight", _ident, _ident),
      Leaf("params", path + ("hnorm", "scale"), pre + "hnorm.m.weight", _ident, _ident),
      Leaf("params", path + ("input_norm", "scale"), pre + "input_layernorm.weight", _ident, _ident),
      Leaf("params", path + ("post_attn_norm", "scale"), pre + "post_attention_layernorm.weight", _ident, _ident),
  ]
  single = lambda l, p, k: Leaf(l.collection, p, k, l.to_jax, l.to_hf)  # the main per-layer transform, once
  for l in main:
    if l.path[:3] == ("decoder", "layers", "attn_0"):
      leaves.append(single(l, path + ("attn", l.path[-1]), pre + "self_attn." + l.hf_key.split("self_attn.0.", 1)[1]))
    elif l.path[:3] == ("decoder", "layers", "indexer"):
      leaves.append(single(l, path + ("indexer", l.path[-1]),
                           pre + "self_attn.indexer." + l.hf_key.split("self_attn.0.indexer.", 1)[1]))
    elif l.path[:3] == ("decoder", "layers", "mlp_0"):
      leaves.append(single(l, path + ("mlp", l.path[-1]), pre + "transformer_layer.mlp." + l.hf_key.split("mlps.0.", 1)[1]))
  return leaves


MTP_EMBED_KEY = "model.mtp.embed_tokens.weight"


def _mtp_leaves(c: ConfigDict, main: list[Leaf]) -> list[Leaf]:
  """`model.mtp.*` <-> params['mtp'] (spec section 7; `longcat_jax.model.mtp`).

  Head k is `model.mtp.layers.{k}.*`; its MLA and MLP reuse the main layer's transforms. The
  heads share `model.mtp.norm.weight`; `model.mtp.embed_tokens.weight` is the main embedding
  (shared, written as a copy, checked on load).
  """
  block = lambda ours, theirs: [(l, l.path[-1], l.hf_key.split(theirs, 1)[1]) for l in main
                                if l.path[:3] == ("decoder", "layers", ours)]
  leaves = [Leaf("params", ("mtp", "final_norm", "scale"), "model.mtp.norm.weight", _ident, _ident)]
  for k in range(c.mtp_num_heads):
    pre, path = f"model.mtp.layers.{k}.", ("mtp", f"layer_{k}")
    leaves += [
        Leaf("params", path + ("eh_proj",), pre + "eh_proj.weight", _t, _t),
        Leaf("params", path + ("enorm", "scale"), pre + "enorm.m.weight", _ident, _ident),
        Leaf("params", path + ("hnorm", "scale"), pre + "hnorm.m.weight", _ident, _ident),
        Leaf("params", path + ("input_norm", "scale"), pre + "input_layernorm.weight", _ident, _ident),
        Leaf("params", path + ("post_attn_norm", "scale"), pre + "post_attention_layernorm.weight", _ident, _ident),
    ]
    for leaf, name, hf_name in block("attn_0", "self_attn.0."):
      leaves.append(Leaf("params", path + ("attn", name), pre + "self_attn." + hf_name, leaf.to_jax, leaf.to_hf))
    for leaf, name, hf_name in block("mlp_0", "mlps.0."):
      leaves.append(Leaf("params", path + ("mlp", name), pre + "transformer_layer.mlp." + hf_name, leaf.to_jax,
                         leaf.to_hf))
  return leaves


def _ngram_leaves(c: ConfigDict) -> list[Leaf]:
  """`model.ngram_embeddings.{embedders,post_projs}.{i}.weight` (Flash-Lite; spec section 4).

  Tables are stored with exactly M_i = m + 2i + 1 rows and padded here to the sharding multiple.
  """
  from longcat_jax.model import ngram

  def pad_to(rows, stored):
    def to_jax(w):
      if w.ndim != 2 or w.shape[0] != stored:
        raise ValueError(f"n-gram table has {w.shape[0]} rows, expected {stored}")
      return np.pad(w, ((0, rows - stored), (0, 0)))
    return to_jax

  v2 = released_v2_layout(c)
  # LongCat-2.0: `model.oe_embed_tokens{i}` / `model.oe_embed_proj{i}` (mlx-lm longcat2.py `sanitize`,
  # SGLang LongcatFlashProEmbedding.load_weight); Flash-Lite: `model.ngram_embeddings.*`.
  table_key = "model.oe_embed_tokens{i}.weight" if v2 else "model.ngram_embeddings.embedders.{i}.weight"
  proj_key = "model.oe_embed_proj{i}.weight" if v2 else "model.ngram_embeddings.post_projs.{i}.weight"
  leaves = []
  for i, (rows, stored) in enumerate(zip(ngram.ngram_table_rows(c), ngram.ngram_moduli(c))):
    leaves += [
        Leaf("params", ("ngram_embedding", f"table_{i}"), table_key.format(i=i),
             pad_to(rows, stored), lambda w, stored=stored: w[:stored]),
        Leaf("params", ("ngram_embedding", f"post_proj_{i}"), proj_key.format(i=i), _t, _t),
    ]
  return leaves


def _indexer_leaves(c: ConfigDict) -> list[Leaf]:
  """The sparse-attention indexer of each layer, in the first attention block (LongCat-2.0 as
  SGLang loads it: `model.layers.{l}.self_attn.0.indexer.{wq_b,wk,k_norm,weights_proj}.weight`,
  DeepSeek-V3.2's indexer names; docs/LONGCAT2.md)."""
  from longcat_jax.model.sparse_attention import sparse_settings
  s = sparse_settings(c)
  hi, di = s["index_heads"], s["index_dim"]
  pre, ind = "model.layers.{l}.self_attn.0.indexer.", ("decoder", "layers", "indexer")
  return [
      Leaf("params", ind + ("wq_b",), pre + "wq_b.weight", lambda w: _t(w).reshape(w.shape[1], hi, di),
           lambda w: w.reshape(w.shape[0], -1).T.copy(), True),
      Leaf("params", ind + ("wk",), pre + "wk.weight", _t, _t, True),
      Leaf("params", ind + ("k_norm",), pre + "k_norm.weight", _ident, _ident, True),
      Leaf("params", ind + ("weights_proj",), pre + "weights_proj.weight", _t, _t, True),
  ]


def _instances(leaf: Leaf, c: ConfigDict) -> Iterator[tuple[tuple[int, ...], str]]:
  """(index into the stacked leaf, HF key) for every HF tensor behind a leaf."""
  layers = range(c.num_layers) if leaf.per_layer else [None]
  experts = range(c.num_ffn_experts) if leaf.per_expert else [None]
  for l in layers:
    for e in experts:
      idx = tuple(i for i in (l, e) if i is not None)
      yield idx, leaf.hf_key.format(l=l, e=e)


def _identity_expert_key(key: str, c: ConfigDict) -> bool:
  """HF's save_pretrained also writes gate/up for the zero (identity) experts; they are unused."""
  m = re.match(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj)\.weight$", key)
  return bool(m) and c.num_ffn_experts <= int(m.group(2)) < c.num_ffn_experts + c.zero_experts


# ---------------------------------------------------------------------------------------------
# Reading.


class _TensorIndex:
  """Maps tensor names to files; opens each safetensors file lazily and reports bad files clearly."""

  def __init__(self, path: str):
    self.path = path
    self._handles = {}
    index_file, single = os.path.join(path, INDEX_NAME), os.path.join(path, SINGLE_NAME)
    if os.path.exists(index_file):
      try:
        with open(index_file) as f:
          self.weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index_file}: not a valid safetensors index ({e})") from None
    elif os.path.exists(single):
      self.weight_map = {k: SINGLE_NAME for k in self._open(SINGLE_NAME).keys()}
    else:
      raise CheckpointError(f"{path}: no {INDEX_NAME} or {SINGLE_NAME} found")

  def _open(self, fname):
    full = os.path.join(self.path, fname)
    if fname not in self._handles:
      if not os.path.exists(full):
        raise CheckpointError(f"{full}: file listed in the index does not exist")
      try:
        self._handles[fname] = safe_open(full, framework="numpy")
      except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{full}: cannot open as safetensors (truncated or corrupt?): {e}") from None
    return self._handles[fname]

  def file_of(self, key: str) -> str:
    return os.path.join(self.path, self.weight_map[key])

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._open(self.weight_map[key]).get_slice(key).get_shape())

  def dtype(self, key: str) -> str:
    """The stored dtype's numpy name, read from the header only."""
    st = self._open(self.weight_map[key]).get_slice(key).get_dtype()
    return {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}.get(st, "float32")

  def get(self, key: str) -> np.ndarray:
    fname = self.weight_map[key]
    handle = self._open(fname)
    try:
      return handle.get_tensor(key)
    except Exception as e:
      raise CheckpointError(f"{self.file_of(key)}: cannot read tensor {key!r} (truncated or corrupt?): {e}") from None


def _expected_shape(leaf: Leaf, full_shape: tuple[int, ...]) -> tuple[int, ...]:
  n = int(leaf.per_layer) + int(leaf.per_expert)
  return tuple(full_shape[n:])


def read_config(path: str, **overrides) -> ConfigDict:
  cfg_file = os.path.join(path, CONFIG_NAME)
  if not os.path.exists(cfg_file):
    raise CheckpointError(f"{path}: no {CONFIG_NAME}")
  with open(cfg_file) as f:
    hf = json.load(f)
  return config_lib.from_hf_config(hf, **overrides)


def load_pretrained(path: str, dtype=None, *, config_overrides: dict | None = None):
  """Reads a HF LongCat directory -> (model, variables).

  `variables` = {"params": ..., "expert_bias": ...}, plain JAX arrays in JAX layout. `dtype`
  (e.g. jnp.bfloat16) sets the parameter and compute dtype; None keeps the checkpoint's dtype
  (router weights and expert bias always stay float32). `model.mtp.*` tensors load into
  params['mtp'] when config.json has `num_nextn_predict_layers` > 0 (else they are left aside:
  `read_mtp_tensors`).
  """
  index = _TensorIndex(path)
  overrides = dict(config_overrides or {})
  stored_dtype = None
  first = next((k for k in index.weight_map if k.endswith("embed_tokens.weight")), None)
  if dtype is None and first is not None:
    stored_dtype = index.dtype(first)
  name = jnp.dtype(dtype or stored_dtype or np.float32).name
  overrides.setdefault("param_dtype", name)
  overrides.setdefault("dtype", name)
  c = read_config(path, **overrides)
  if c.mtp_num_heads and not any(_ASIDE.match(k) for k in index.weight_map):
    warnings.warn(f"{path}: config.json has {c.mtp_num_heads} MTP head(s) but the checkpoint holds no "
                  "model.mtp.* tensors; loading the main model only (mtp_num_heads=0)")
    c.mtp_num_heads = 0
  config_lib.validate(c)
  model = LongcatForCausalLM(c)

  leaves = _leaves(c)
  wanted = {}
  for leaf in leaves:
    for idx, key in _instances(leaf, c):
      wanted[key] = (leaf, idx)
  aside = lambda k: (_UNUSED_MTP_NGRAM.match(k) or k == MTP_EMBED_KEY) if c.mtp_num_heads else _ASIDE.match(k)
  unknown = [k for k in index.weight_map
             if k not in wanted and not aside(k) and not _IGNORED.search(k) and not _identity_expert_key(k, c)]
  if unknown:
    raise CheckpointError(f"{path}: {len(unknown)} tensor(s) this model does not understand, e.g. "
                          f"{unknown[0]!r} in {index.file_of(unknown[0])} (all: {unknown[:8]}...)")
  missing = [k for k in wanted if k not in index.weight_map]
  if missing:
    raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[0]!r} "
                          f"(config.json says num_layers={c.num_layers}, num_ffn_experts={c.num_ffn_experts})")

  shapes = jax.eval_shape(lambda: model_variables_shapes(model))
  variables = {}
  for leaf in leaves:
    target = _get(shapes[leaf.collection], leaf.path)
    f32 = leaf.collection == EXPERT_BIAS or leaf.path[-1] == "router"
    np_dtype = np.float32 if f32 else jnp.dtype(name)
    out = np.empty(target.shape, np_dtype)
    want = _expected_shape(leaf, target.shape)
    for idx, key in _instances(leaf, c):
      raw = index.get(key)
      try:
        w = leaf.to_jax(raw)
      except ValueError:  # reshape of a wrong-sized tensor
        w = None
      if w is None or w.shape != want:
        got = raw.shape
        raise CheckpointError(f"{index.file_of(key)}: tensor {key!r} has shape {list(got)}, which does not map "
                              f"to the expected JAX shape {list(want)} for config {c.name!r}")
      out[idx] = w.astype(np_dtype)
    _set(variables.setdefault(leaf.collection, {}), leaf.path, jnp.asarray(out))
    del out
  if c.mtp_num_heads and not c.mtp_shared_module and MTP_EMBED_KEY in index.weight_map:
    if not np.array_equal(index.get(MTP_EMBED_KEY), index.get("model.embed_tokens.weight")):
      warnings.warn(f"{index.file_of(MTP_EMBED_KEY)}: {MTP_EMBED_KEY} differs from model.embed_tokens.weight; "
                    "the MTP head here shares the main embedding, so the MTP copy is not used")
  return model, variables


def read_mtp_tensors(path: str) -> dict[str, np.ndarray]:
  """The `model.mtp.*` tensors of a checkpoint, by HF name (numpy, HF layout)."""
  index = _TensorIndex(path)
  return {k: index.get(k) for k in index.weight_map if _ASIDE.match(k)}


def model_variables_shapes(model: LongcatForCausalLM):
  ids = jnp.zeros((1, 1), jnp.int32)
  v = model.init(jax.random.key(0), ids)
  return {k: flax.linen.meta.unbox(v[k]) for k in ("params", EXPERT_BIAS) if k in v}


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


def save_pretrained(path: str, model: LongcatForCausalLM, variables, *, max_shard_bytes: int = 2 << 30,
                    extra_tensors: dict[str, np.ndarray] | None = None) -> None:
  """Writes `config.json` + sharded `*.safetensors` + index in the HF LongCat layout.

  Files are written to a temporary directory and moved into place at the end, so a failed save
  leaves any previous checkpoint at `path` untouched. Zero-expert gate/up tensors, which the
  reference allocates but never uses, are written as zeros so transformers loads without warnings.
  """
  c = model.config
  variables = flax.linen.meta.unbox(variables)
  tensors: list[tuple[str, np.ndarray]] = []
  for leaf in _leaves(c):
    arr = _get(variables[leaf.collection], leaf.path)
    arr = np.asarray(jax.device_get(arr))
    for idx, key in _instances(leaf, c):
      tensors.append((key, leaf.to_hf(arr[idx])))
  if c.num_ffn_experts and c.zero_experts:
    zeros = np.zeros((c.expert_ffn_size, c.hidden_size), np.asarray(
        jax.device_get(variables["params"]["embed_tokens"])).dtype)
    for l in range(c.num_layers):
      for e in range(c.num_ffn_experts, c.num_ffn_experts + c.zero_experts):
        for proj in ("gate_proj", "up_proj"):
          tensors.append((f"model.layers.{l}.mlp.experts.{e}.{proj}.weight", zeros))
  if c.mtp_num_heads and not c.mtp_shared_module:  # shares the main embedding; the released layout stores a copy
    tensors.append((MTP_EMBED_KEY, np.asarray(jax.device_get(variables["params"]["embed_tokens"]))))
  for k, v in (extra_tensors or {}).items():
    tensors.append((k, np.asarray(v)))

  shards, cur, cur_bytes = [], [], 0
  for key, arr in tensors:
    if cur and cur_bytes + arr.nbytes > max_shard_bytes:
      shards.append(cur)
      cur, cur_bytes = [], 0
    cur.append((key, arr))
    cur_bytes += arr.nbytes
  shards.append(cur)

  parent = os.path.dirname(os.path.abspath(path)) or "."
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(path))}.tmp-{os.getpid()}")
  if os.path.exists(tmp):
    import shutil
    shutil.rmtree(tmp)
  os.makedirs(tmp)
  weight_map, total = {}, 0
  for i, shard in enumerate(shards):
    fname = SINGLE_NAME if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in shard}, os.path.join(tmp, fname), metadata={"format": "pt"})
    for k, v in shard:
      weight_map[k] = fname
      total += v.nbytes
  with open(os.path.join(tmp, INDEX_NAME), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  hf = config_lib.to_hf_config(c)
  hf["dtype"] = jnp.dtype(c.param_dtype).name
  with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
    json.dump(hf, f, indent=2)
  _replace_dir(tmp, path)


def _replace_dir(tmp: str, path: str) -> None:
  """Moves `tmp` to `path`; an existing `path` is swapped out only after `tmp` is complete."""
  import shutil
  if os.path.exists(path):
    old = path.rstrip("/") + f".old-{os.getpid()}"
    os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old)
  else:
    os.rename(tmp, path)
