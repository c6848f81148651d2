"""Text generation and chat from a LongCat checkpoint, streaming tokens as they come.

    python -m longcat_jax.generate --checkpoint DIR --prompt "def fib(n):" [--tokenizer tokenizer.json]
        [--max-new-tokens 128] [--temperature 0.7] [--top-k 50] [--top-p 0.9] [--draft-tokens 1]
    python -m longcat_jax.generate --checkpoint DIR --chat [--system "You are ..."]  < questions.txt
    python -m longcat_jax.generate --checkpoint DIR [--chat] --prompt-file prompts.txt

DIR is a Hugging Face LongCat directory, or a training run directory (WORKDIR with checkpoints/:
its latest checkpoint, and the tokenizer / chat template it came with, see `longcat_jax.export`).
The tokenizer is `--tokenizer`, else DIR's tokenizer.json when present, else the built-in byte
tokenizer (`longcat_jax.data.tokenizer`).

Plain prompts start with the tokenizer's bos token unless --no-bos. Several --prompt flags (or the
lines of --prompt-file) decode as one batch (printed at the end); a single prompt streams.

--chat: each line of stdin is a user turn. The conversation so far is rendered with DIR's chat
template (`longcat_jax.data.chat`, as transformers renders it) with the generation prompt, the
reply streams to stdout (one line per reply, end-of-turn tokens not printed) and joins the
conversation as the assistant's message. Replies stop at DIR's EOS ids (generation_config.json,
else config.json, else the tokenizer's eos). With --prompt-file, each line is a separate one-turn
conversation and all are decoded as one batch. --token-log FILE appends one JSON line per reply
{"prompt_ids", "reply_ids"} for scripts.

MTP speculative decoding is on (1 draft token) when the checkpoint has an MTP module, unless
--draft-tokens says otherwise; greedy speculative tokens equal plain greedy tokens. Throughput
(prefill and decode tokens/s, MTP acceptance rate) goes to stderr. `generate` (the function) is
`longcat_jax.inference.generate`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types

import jax.numpy as jnp

from longcat_jax import export
from longcat_jax.data.chat import ChatError, ChatTemplate, eos_token_ids
from longcat_jax.data.tokenizer import load_tokenizer
from longcat_jax.inference import generate  # noqa: F401  (longcat_jax.generate(model, variables, ...))
from longcat_jax.inference.engine import prefill_bucket
from longcat_jax.interop import CheckpointError, load_pretrained


def _parse(argv):
  p = argparse.ArgumentParser(prog="python -m longcat_jax.generate", description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True, help="Hugging Face LongCat directory or training run directory")
  p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
  p.add_argument("--prompt-file", default=None, help="one prompt per line, decoded as one batch")
  p.add_argument("--chat", action="store_true", help="chat: user turns from stdin (or --prompt-file), "
                 "rendered with the checkpoint's chat template")
  p.add_argument("--system", default=None, help="--chat: a system message to start the conversation")
  p.add_argument("--context", type=int, default=4096,
                 help="--chat: conversation tokens the session's cache holds (fixed, so decoding compiles once)")
  p.add_argument("--token-log", default=None, help="append {prompt_ids, reply_ids} per reply to this JSONL")
  p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: DIR/tokenizer.json, else bytes)")
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
  p.add_argument("--top-k", type=int, default=None)
  p.add_argument("--top-p", type=float, default=None)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--draft-tokens", type=int, default=None,
                 help="MTP speculative decoding: tokens drafted per step (default: 1 with an MTP module, else 0)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: the checkpoint's")
  p.add_argument("--kernels", choices=("auto", "pallas", "interpret", "xla"), default=None)
  p.add_argument("--no-bos", action="store_true", help="do not start prompts with the bos token")
  args = p.parse_args(argv)
  if not args.chat and not args.prompt and args.prompt_file is None:
    p.error("give --prompt, --prompt-file or --chat")
  return args


def _tokenizer(args, files_dir):
  path = args.tokenizer
  if path is None and files_dir and os.path.isfile(os.path.join(files_dir, "tokenizer.json")):
    path = os.path.join(files_dir, "tokenizer.json")
  return load_tokenizer(path)


def _load(args):
  """(model, variables, files_dir): a HF directory, or a training run's latest checkpoint."""
  overrides = {"kernels": args.kernels} if args.kernels else None
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(args.dtype)
  if os.path.isdir(os.path.join(args.checkpoint, "checkpoints")):
    model, variables, _ = export.load_run(args.checkpoint)
    if overrides or dtype is not None:
      c = model.config.copy_and_resolve_references()
      c.update(overrides or {})
      if dtype is not None:
        c.dtype = jnp.dtype(dtype).name
      model = model.clone(config=c)
    return model, variables, export.run_files_dir(args.checkpoint)
  model, variables = load_pretrained(args.checkpoint, dtype=dtype, config_overrides=overrides)
  return model, variables, args.checkpoint


def _read_prompts(path):
  with open(path, encoding="utf-8") as f:
    prompts = [line.rstrip("\n") for line in f]
  prompts = [p for p in prompts if p.strip()]
  if not prompts:
    raise ValueError(f"--prompt-file {path}: no prompts (every line is blank)")
  return prompts


class _TextStream:
  """Prints the decoded text of one row as it grows. The whole row is decoded each time and text
  ending in U+FFFD (an incomplete UTF-8 / multi-token character) waits for the next token."""

  def __init__(self, tokenizer, out, skip=()):
    self.tokenizer, self.out, self.ids, self.printed = tokenizer, out, [], ""
    self.skip = frozenset(skip)

  def __call__(self, new_per_row, final: bool = False):
    self.ids.extend(t for t in new_per_row[0] if t not in self.skip)
    text = self.tokenizer.decode(self.ids)
    if (final or not text.endswith("\ufffd")) and text.startswith(self.printed):
      self.out.write(text[len(self.printed):])
      self.out.flush()
      self.printed = text

  def finish(self):
    self([[]], final=True)
    self.out.write("\n")


def main(argv=None) -> int:
  args = _parse(argv)
  try:
    return _main(args)
  except (ValueError, ChatError, CheckpointError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1


def _main(args) -> int:
  model, variables, files_dir = _load(args)
  tok = _tokenizer(args, files_dir)
  if tok.vocab_size > model.config.vocab_size:
    print(f"warning: tokenizer {tok.name} has {tok.vocab_size} ids but the model's vocab_size is "
          f"{model.config.vocab_size}", file=sys.stderr)
  if args.draft_tokens is None:
    args.draft_tokens = 1 if "mtp" in variables["params"] else 0
  if args.chat:
    if files_dir is None:
      raise ValueError(f"{args.checkpoint}: --chat needs a chat template, and this run records no tokenizer "
                       "directory")
    template = ChatTemplate.from_dir(files_dir, tokenizer=tok)
    eos = eos_token_ids(files_dir) or [tok.eos_id]
    if args.prompt_file is not None or args.prompt:
      texts = args.prompt + (_read_prompts(args.prompt_file) if args.prompt_file else [])
      convs = [_start(args) + [{"role": "user", "content": t}] for t in texts]
      prompts = [template.tokenize(c, add_generation_prompt=True) for c in convs]
      out = _generate(args, model, variables, prompts, eos, None)
      for i, (row, n) in enumerate(zip(out.tokens, out.num_tokens)):
        reply = [int(t) for t in row[:n]]
        _log_tokens(args, prompts[i], reply)
        print(tok.decode([t for t in reply if t not in eos]))
      return 0
    return _chat_loop(args, model, variables, tok, template, eos)
  texts = args.prompt + (_read_prompts(args.prompt_file) if args.prompt_file else [])
  prompts = [([] if args.no_bos else [tok.bos_id]) + tok.encode(p) for p in texts]
  stream = _TextStream(tok, sys.stdout) if len(prompts) == 1 else None
  if stream is not None:
    sys.stdout.write(texts[0])
  out = _generate(args, model, variables, prompts, tok.eos_id, stream)
  if stream is None:
    for p, row, n in zip(texts, out.tokens, out.num_tokens):
      print(p + tok.decode(row[:n]))
  else:
    stream.finish()
  for i, (row, n) in enumerate(zip(out.tokens, out.num_tokens)):
    _log_tokens(args, prompts[i], [int(t) for t in row[:n]])
  return 0


def _start(args):
  return [{"role": "system", "content": args.system}] if args.system else []


def _log_tokens(args, prompt, reply):
  if args.token_log:
    with open(args.token_log, "a") as f:
      f.write(json.dumps({"prompt_ids": [int(t) for t in prompt], "reply_ids": reply}) + "\n")


def _chat_loop(args, model, variables, tok, template, eos) -> int:
  """One reply per stdin line; the conversation grows by the user turn and the reply text."""
  conversation = _start(args)
  interactive = sys.stdin.isatty()
  context = min(args.context, model.config.max_position_embeddings)
  cache_size = prefill_bucket(context)  # one size for the session: the decode step compiles once
  while True:
    if interactive:
      print("> ", end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    if not line:
      return 0
    text = line.rstrip("\n")
    if not text.strip():
      continue
    conversation.append({"role": "user", "content": text})
    prompt = template.tokenize(conversation, add_generation_prompt=True)
    if len(prompt) + args.max_new_tokens > context:
      raise ValueError(f"the conversation has {len(prompt)} tokens, which with --max-new-tokens "
                       f"{args.max_new_tokens} exceeds the context of {context} tokens (--context, "
                       "max_position_embeddings); start a new conversation")
    stream = _TextStream(tok, sys.stdout, skip=eos)
    out = _generate(args, model, variables, [prompt], eos, stream, cache_size)
    stream.finish()
    reply = [int(t) for t in out.tokens[0, :out.num_tokens[0]]]
    _log_tokens(args, prompt, reply)
    conversation.append({"role": "assistant", "content": tok.decode([t for t in reply if t not in eos])})


def _generate(args, model, variables, prompts, eos, stream, cache_size=None):
  out = generate(model, variables, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                 top_p=args.top_p, eos_token_id=eos, seed=args.seed, num_draft_tokens=args.draft_tokens,
                 stream=stream, cache_size=cache_size)
  _report(args, prompts, out)
  return out


def _report(args, prompts, out):
  prompt_tokens = sum(map(len, prompts))
  print(f"prefill: {prompt_tokens} prompt tokens, first token after {out.prefill_seconds:.3f} s "
        "(a first call includes compilation)", file=sys.stderr)
  print(f"decode: {int(out.num_tokens.sum())} tokens in {out.decode_steps} steps, "
        f"{out.decode_tokens_per_second:.1f} tokens/s after the first step", file=sys.stderr)
  if out.acceptance_rate is not None:
    print(f"MTP draft acceptance: {out.acceptance_rate:.1%} ({args.draft_tokens} draft token(s) per step)",
          file=sys.stderr)


class _CallableModule(types.ModuleType):
  """Importing this module rebinds the package attribute `longcat_jax.generate` from the
  function to the module; calling the module keeps `longcat_jax.generate(model, ...)` working."""

  def __call__(self, *args, **kwargs):
    return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
  sys.exit(main())
