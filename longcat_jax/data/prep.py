"""Text files -> token store. Each file is one document: [bos] + encode(text) + [eos].

  python -m longcat_jax.data.prep --input "docs/**/*.txt" [--input more.txt] \
      --output /data/store [--tokenizer tokenizer.json|byte] [--max-files N]

With no ``--input`` the corpus is the Python standard library's ``.py`` files
(``default_corpus_files``): every machine has it, so the training job can run
with no data arguments (``prepare_default_corpus``).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import sysconfig
import time

import numpy as np

from longcat_jax.data.store import TokenStore
from longcat_jax.data.tokenizer import load_tokenizer

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests",
              "idle_test"}


def default_corpus_files(max_files: int | None = None) -> list[str]:
  """Sorted ``.py`` files of this interpreter's stdlib (no site-packages/tests)."""
  root = sysconfig.get_paths()["stdlib"]
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
    files.extend(os.path.join(dirpath, f) for f in filenames
                 if f.endswith(".py"))
  files.sort()
  return files[:max_files] if max_files is not None else files


def expand_inputs(patterns: list[str]) -> list[str]:
  """Paths / globs (``**`` allowed) -> sorted unique files; errors on no match."""
  files = set()
  for pat in patterns:
    matches = [p for p in glob.glob(pat, recursive=True) if os.path.isfile(p)]
    if not matches:
      raise FileNotFoundError(f"--input {pat!r} matched no files")
    files.update(os.path.abspath(p) for p in matches)
  return sorted(files)


def prepare(files: list[str], output: str, tokenizer=None,
            overwrite: bool = False, progress: bool = True) -> TokenStore:
  """Tokenizes ``files`` (one document each) into a new store at ``output``."""
  tok = tokenizer if tokenizer is not None and not isinstance(
      tokenizer, str) else load_tokenizer(tokenizer)
  encode = getattr(tok, "encode_np", None) or (
      lambda s: np.asarray(tok.encode(s), np.int32))
  bos, eos = np.array([tok.bos_id], np.int32), np.array([tok.eos_id], np.int32)
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  with TokenStore.create(output, tok.vocab_size, tokenizer=tok.name,
                         overwrite=overwrite,
                         extra={"bos_id": tok.bos_id, "eos_id": tok.eos_id,
                                "pad_id": tok.pad_id}) as writer:
    bar = tqdm(files, desc="tokenizing", unit="file", disable=not progress)
    for path in bar:
      with open(path, encoding="utf-8", errors="replace") as f:
        ids = encode(f.read())
      writer.add(np.concatenate([bos, ids, eos]), source=path)
      bar.set_postfix(tokens=writer.num_tokens, refresh=False)
    return writer.close()


def prepare_default_corpus(out_dir: str, max_files: int | None = None,
                           tokenizer=None) -> str:
  """Builds the stdlib corpus store under ``out_dir`` unless already there.

  Returns the store path, ``out_dir/stdlib-py<X.Y>-<tokenizer>-<N|all>``.
  Safe if several processes race: each builds privately and the first rename
  wins.
  """
  tok = load_tokenizer(tokenizer) if tokenizer is None or isinstance(
      tokenizer, str) else tokenizer
  tok_tag = "byte" if tok.name == "byte" else os.path.basename(
      os.path.dirname(tok.name)) or "hf"
  py = f"{sys.version_info.major}.{sys.version_info.minor}"
  path = os.path.join(out_dir, f"stdlib-py{py}-{tok_tag}-"
                               f"{'all' if max_files is None else max_files}")
  if TokenStore.exists(path):
    return path
  try:
    prepare(default_corpus_files(max_files), path, tok, progress=False)
  except OSError:
    if not TokenStore.exists(path):  # lost a rename race only if it exists
      raise
  return path


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--input", action="append", default=[],
                 help="file or glob (repeatable); default: Python stdlib .py")
  p.add_argument("--output", required=True, help="store directory to create")
  p.add_argument("--tokenizer", default="byte",
                 help="'byte' or path to a Hugging Face tokenizer.json")
  p.add_argument("--max-files", type=int, default=None)
  p.add_argument("--overwrite", action="store_true")
  args = p.parse_args(argv)
  files = (expand_inputs(args.input) if args.input else default_corpus_files())
  if args.max_files is not None:
    files = files[:args.max_files]
  t0 = time.time()
  store = prepare(files, args.output, args.tokenizer, args.overwrite)
  dt = time.time() - t0
  print(f"wrote {store.path}: {store.num_docs} docs, {store.num_tokens} tokens "
        f"(vocab {store.vocab_size}, tokenizer {store.meta['tokenizer']}) "
        f"from {len(files)} files in {dt:.1f}s "
        f"({store.num_tokens / max(dt, 1e-9) / 1e6:.2f} M tok/s)")


if __name__ == "__main__":
  main()
