"""Text generation from a Hugging Face LongCat checkpoint, streaming tokens as they come.

    python -m longcat_jax.generate --checkpoint DIR --prompt "def fib(n):" [--tokenizer tokenizer.json]
        [--max-new-tokens 128] [--temperature 0.7] [--top-k 50] [--top-p 0.9] [--draft-tokens 1]

The tokenizer is `--tokenizer`, else DIR/tokenizer.json when present, else the built-in byte
tokenizer (`longcat_jax.data.tokenizer`). Prompts start with the tokenizer's bos token unless
--no-bos. Several --prompt flags decode as one batch (printed at the end); a single prompt streams.
Throughput (prefill and decode tokens/s, and the MTP acceptance rate with --draft-tokens) goes to
stderr. `generate` (the function) is `longcat_jax.inference.generate`.
"""

from __future__ import annotations

import argparse
import os
import sys
import types

import jax.numpy as jnp

from longcat_jax.data.tokenizer import load_tokenizer
from longcat_jax.inference import generate  # noqa: F401  (longcat_jax.generate(model, variables, ...))
from longcat_jax.interop import load_pretrained


def _parse(argv):
  p = argparse.ArgumentParser(prog="python -m longcat_jax.generate", description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True, help="Hugging Face LongCat checkpoint directory")
  p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
  p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: DIR/tokenizer.json, else bytes)")
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
  p.add_argument("--top-k", type=int, default=None)
  p.add_argument("--top-p", type=float, default=None)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--draft-tokens", type=int, default=0, help="MTP speculative decoding: tokens drafted per step")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: the checkpoint's")
  p.add_argument("--kernels", choices=("auto", "pallas", "interpret", "xla"), default=None)
  p.add_argument("--no-bos", action="store_true", help="do not start prompts with the bos token")
  return p.parse_args(argv)


def _tokenizer(args):
  path = args.tokenizer
  if path is None and os.path.isfile(os.path.join(args.checkpoint, "tokenizer.json")):
    path = os.path.join(args.checkpoint, "tokenizer.json")
  return load_tokenizer(path)


class _TextStream:
  """Prints the decoded text of one row as it grows. The whole row is decoded each time and text
  ending in U+FFFD (an incomplete UTF-8 / multi-token character) waits for the next token."""

  def __init__(self, tokenizer, out):
    self.tokenizer, self.out, self.ids, self.printed = tokenizer, out, [], ""

  def __call__(self, new_per_row, final: bool = False):
    self.ids.extend(new_per_row[0])
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

  tok = _tokenizer(args)
  overrides = {"kernels": args.kernels} if args.kernels else None
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(args.dtype)
  model, variables = load_pretrained(args.checkpoint, dtype=dtype, config_overrides=overrides)
  if tok.vocab_size > model.config.vocab_size:
    print(f"warning: tokenizer {tok.name} has {tok.vocab_size} ids but the model's vocab_size is "
          f"{model.config.vocab_size}", file=sys.stderr)
  prompts = [([] if args.no_bos else [tok.bos_id]) + tok.encode(p) for p in args.prompt]
  stream = _TextStream(tok, sys.stdout) if len(prompts) == 1 else None
  if stream is not None:
    sys.stdout.write(args.prompt[0])
  out = generate(model, variables, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                 top_p=args.top_p, eos_token_id=tok.eos_id, seed=args.seed, num_draft_tokens=args.draft_tokens,
                 stream=stream)
  if stream is None:
    for p, row, n in zip(args.prompt, out.tokens, out.num_tokens):
      print(p + tok.decode(row[:n]))
  else:
    stream.finish()
  prompt_tokens = sum(map(len, prompts))
  print(f"prefill: {prompt_tokens} prompt tokens, first token after {out.prefill_seconds:.3f} s "
        "(a first call includes compilation)", file=sys.stderr)
  print(f"decode: {int(out.num_tokens.sum())} tokens in {out.decode_steps} steps, "
        f"{out.decode_tokens_per_second:.1f} tokens/s after the first step", file=sys.stderr)
  if out.acceptance_rate is not None:
    print(f"MTP draft acceptance: {out.acceptance_rate:.1%} ({args.draft_tokens} draft token(s) per step)",
          file=sys.stderr)
  return 0


class _CallableModule(types.ModuleType):
  """Importing this module rebinds the package attribute `longcat_jax.generate` from the
  function to the module; calling the module keeps `longcat_jax.generate(model, ...)` working."""

  def __call__(self, *args, **kwargs):
    return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
  sys.exit(main())
