"""Tokenizers with one small interface: ``vocab_size``, ``bos_id``, ``eos_id``,
``pad_id``, ``name``, ``encode(str) -> list[int]``, ``decode(list[int]) -> str``.

* ``ByteTokenizer``: built in, no files. pad=0, bos=1, eos=2 (LongCat's bos/eos
  ids), byte ``b`` -> id ``3 + b``; vocab_size = 259.
* ``HFTokenizer``: wraps a Hugging Face ``tokenizers`` ``tokenizer.json``
  (e.g. LongCat's). bos/eos/pad are given explicitly, or read from a
  ``tokenizer_config.json`` next to the file, or looked up among common special
  token spellings.

``load_tokenizer(None | "byte" | path)`` picks one.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np


class ByteTokenizer:
  """UTF-8 bytes as tokens: id = 3 + byte; 0/1/2 = pad/bos/eos."""

  name = "byte"
  pad_id, bos_id, eos_id = 0, 1, 2
  _OFFSET = 3
  vocab_size = 256 + _OFFSET

  def encode_np(self, text: str) -> np.ndarray:
    """Text -> int32 ids [len(utf8 bytes)] (no bos/eos)."""
    raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    return raw.astype(np.int32) + self._OFFSET

  def encode(self, text: str) -> list[int]:
    return self.encode_np(text).tolist()

  def decode(self, ids: Sequence[int]) -> str:
    """Ids -> text; special ids are dropped, invalid UTF-8 becomes U+FFFD."""
    ids = np.asarray(ids, dtype=np.int64)
    ids = ids[(ids >= self._OFFSET) & (ids < self.vocab_size)]
    return (ids - self._OFFSET).astype(np.uint8).tobytes().decode(
        "utf-8", errors="replace")


# Common spellings, most specific first. LongCat-Flash uses <longcat_s> etc.
_BOS = ("<longcat_s>", "<s>", "<|begin_of_text|>", "<bos>", "[BOS]",
        "<|startoftext|>", "<|im_start|>")
_EOS = ("</longcat_s>", "</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>",
        "[EOS]", "<|eot_id|>", "<|im_end|>")
_PAD = ("<longcat_pad>", "<pad>", "[PAD]", "<|pad|>", "<|padding|>")


class HFTokenizer:
  """A Hugging Face ``tokenizers.Tokenizer`` behind the common interface."""

  def __init__(self, tok, name: str, bos_id: int | None = None,
               eos_id: int | None = None, pad_id: int | None = None):
    self._tok = tok
    self.name = name
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
    self.bos_id = self._find(bos_id, _BOS, "bos")
    self.eos_id = self._find(eos_id, _EOS, "eos")
    found_pad = self._find(pad_id, _PAD, "pad", required=False)
    self.pad_id = 0 if found_pad is None else found_pad

  def _find(self, given, candidates, what, required=True):
    if isinstance(given, str):
      idx = self._tok.token_to_id(given)
      if idx is None:
        raise ValueError(f"{self.name}: {what} token {given!r} not in vocab")
      return idx
    if given is not None:
      if not 0 <= given < self.vocab_size:
        raise ValueError(f"{self.name}: {what}_id={given} outside "
                         f"[0, {self.vocab_size})")
      return int(given)
    for tok in candidates:
      idx = self._tok.token_to_id(tok)
      if idx is not None:
        return idx
    if required:
      raise ValueError(
          f"{self.name}: no {what} token found (tried {candidates}); pass "
          f"{what}_id= explicitly")
    return None

  @classmethod
  def from_file(cls, path: str, bos_id: int | str | None = None,
                eos_id: int | str | None = None,
                pad_id: int | str | None = None) -> "HFTokenizer":
    """Loads ``tokenizer.json`` (or a directory holding one).

    Special tokens not given are taken from ``tokenizer_config.json`` in the
    same directory (``bos_token``/``eos_token``/``pad_token``) if present,
    else from the common spellings above.
    """
    import tokenizers  # pylint: disable=import-outside-toplevel
    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer file not found: {path}")
    tok = tokenizers.Tokenizer.from_file(path)
    cfg_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    if os.path.isfile(cfg_path):
      with open(cfg_path) as f:
        cfg = json.load(f)
      def tok_str(key):
        v = cfg.get(key)
        return v.get("content") if isinstance(v, dict) else v
      bos_id = bos_id if bos_id is not None else tok_str("bos_token")
      eos_id = eos_id if eos_id is not None else tok_str("eos_token")
      pad_id = pad_id if pad_id is not None else tok_str("pad_token")
    return cls(tok, os.path.abspath(path), bos_id, eos_id, pad_id)

  def encode_np(self, text: str) -> np.ndarray:
    return np.asarray(self.encode(text), dtype=np.int32)

  def encode(self, text: str) -> list[int]:
    """Text -> ids, without bos/eos (the caller adds them)."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(path: str | None = None, **kwargs):
  """None or "byte" -> ByteTokenizer; else a tokenizer.json path (or its dir)."""
  if path is None or path == "byte":
    return ByteTokenizer()
  return HFTokenizer.from_file(path, **kwargs)
