"""Text files or chat conversations -> token store.

  python -m longcat_jax.data.prep --input "docs/**/*.txt" [--input more.txt] \
      --output /data/store [--tokenizer tokenizer.json|byte] [--max-files N]
  python -m longcat_jax.data.prep --chat data.jsonl --tokenizer CHECKPOINT_DIR \
      --output /data/chat [--seq-len 2048] [--strict]

Text: each file is one document, [bos] + encode(text) + [eos].

Chat (``--chat``): each JSONL row ``{"messages": [{"role", "content"}, ...]}`` is
one document, rendered with the checkpoint's chat template and tokenizer
(``longcat_jax.data.chat``: the template writes bos/eos and turn markers) and
stored with a loss mask that is 1 only on assistant tokens. Bad rows (invalid
JSON, no assistant turn, unknown role, a template that fails, more than
``--seq-len`` tokens) are counted and reported with their line numbers, then
skipped, or, with ``--strict``, refused (nothing is written). Nothing is
truncated.

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

from longcat_jax.data.chat import ChatError, ChatTemplate, read_jsonl_conversations
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


class BadRows(ValueError):
  """``prepare_chat(strict=True)`` found bad rows; ``.report`` lists them."""

  def __init__(self, message: str, report: dict):
    super().__init__(message)
    self.report = report


def _reason(msg: str) -> str:
  """A short category for a bad row's message (for the counts)."""
  for key in ("not valid JSON", "no 'messages'", "unknown role", "no assistant", "template",
              "tokens, more than", "must be"):
    if key in msg:
      return {"must be": "malformed message", "tokens, more than": "longer than seq_len",
              "no 'messages'": "no messages field"}.get(key, key)
  return "other"


def prepare_chat(jsonl: str, output: str, tokenizer_dir: str, seq_len: int | None = None,
                 strict: bool = False, overwrite: bool = False) -> tuple[TokenStore | None, dict]:
  """Chat JSONL -> a store with a loss mask (see the module docstring).

  Returns (store, report); report = {"rows", "written", "bad": [(line, message)],
  "counts": {reason: n}}. With ``strict`` any bad row raises ``BadRows`` and nothing is
  written.
  """
  template = ChatTemplate.from_dir(tokenizer_dir)
  tok = template.tokenizer
  rows = read_jsonl_conversations(jsonl)
  docs, bad = [], []
  for line, messages in rows:
    try:
      if isinstance(messages, ChatError):
        raise messages
      ids, mask = template.tokenize_with_mask(messages)
      if seq_len is not None and len(ids) > seq_len:
        raise ChatError(f"{len(ids)} tokens, more than seq_len={seq_len}")
    except ChatError as e:
      bad.append((line, str(e)))
      continue
    docs.append((line, ids, mask))
  counts: dict[str, int] = {}
  for _, msg in bad:
    counts[_reason(msg)] = counts.get(_reason(msg), 0) + 1
  report = {"rows": len(rows), "written": 0, "bad": bad, "counts": counts}
  if bad and strict:
    raise BadRows(f"{jsonl}: {len(bad)} bad row(s) of {len(rows)}, first at line {bad[0][0]}: {bad[0][1]}",
                  report)
  if not docs:
    raise BadRows(f"{jsonl}: no usable rows ({len(bad)} bad of {len(rows)})", report)
  extra = {"bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
           "chat": {"source": os.path.abspath(jsonl), "tokenizer_dir": os.path.abspath(tokenizer_dir),
                    "seq_len": seq_len, "mask": "assistant"}}
  with TokenStore.create(output, tok.vocab_size, tokenizer=tok.name, overwrite=overwrite, extra=extra,
                         loss_mask=True) as writer:
    for line, ids, mask in docs:
      writer.add(ids, source=f"{os.path.abspath(jsonl)}:{line}", mask=mask)
    store = writer.close()
  report["written"] = len(docs)
  return store, report


def format_report(path: str, report: dict, limit: int = 20) -> str:
  """Human-readable summary of ``prepare_chat``'s report."""
  lines = [f"{path}: {report['rows']} rows, {report['written']} written, {len(report['bad'])} bad"
           + (" (" + ", ".join(f"{k}: {v}" for k, v in sorted(report["counts"].items())) + ")"
              if report["bad"] else "")]
  for line, msg in report["bad"][:limit]:
    lines.append(f"  {path}:{line}: {msg}")
  if len(report["bad"]) > limit:
    lines.append(f"  ... and {len(report['bad']) - limit} more")
  return "\n".join(lines)


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
                 help="'byte' or path to a Hugging Face tokenizer.json; with --chat the "
                      "checkpoint directory (tokenizer.json + tokenizer_config.json)")
  p.add_argument("--chat", default=None, help="chat JSONL ({'messages': [...]} per line)")
  p.add_argument("--seq-len", type=int, default=None,
                 help="--chat: rows longer than this are bad rows (the training seq_len)")
  p.add_argument("--strict", action="store_true", help="--chat: refuse bad rows instead of skipping them")
  p.add_argument("--max-files", type=int, default=None)
  p.add_argument("--overwrite", action="store_true")
  args = p.parse_args(argv)
  if args.chat is not None:
    return _main_chat(args)
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


def _main_chat(args) -> int:
  if args.input:
    print("error: --chat and --input are exclusive", file=sys.stderr)
    return 2
  if args.tokenizer == "byte":
    print("error: --chat needs --tokenizer DIR (a checkpoint/tokenizer directory with a chat template)",
          file=sys.stderr)
    return 2
  try:
    store, report = prepare_chat(args.chat, args.output, args.tokenizer, args.seq_len, args.strict,
                                 args.overwrite)
  except BadRows as e:
    print(format_report(args.chat, e.report), file=sys.stderr)
    print(f"error: {e}" + (" (--strict: nothing written)" if args.strict else ""), file=sys.stderr)
    return 1
  except (ChatError, FileNotFoundError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(format_report(args.chat, report), file=sys.stderr)
  mask = int(store.read_mask_range_async(0, store.num_tokens).result().sum())
  print(f"wrote {store.path}: {store.num_docs} conversations, {store.num_tokens} tokens, {mask} assistant "
        f"tokens (vocab {store.vocab_size}, tokenizer {store.meta['tokenizer']})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
