"""Chat conversations -> tokens and an assistant-only loss mask, with a checkpoint's own chat template.

    template = ChatTemplate.from_dir("path/to/checkpoint")      # tokenizer.json + tokenizer_config.json
    ids, mask = template.tokenize_with_mask(messages)          # int32 [T], uint8 [T] (1 = assistant token)
    prompt = template.tokenize(messages, add_generation_prompt=True)

Rendering follows `transformers`' `apply_chat_template` (transformers 5.x,
`utils/chat_template_utils.py`): a jinja2 `ImmutableSandboxedEnvironment` with `trim_blocks` and
`lstrip_blocks`, the `loopcontrols` extension, a `tojson` filter that does not HTML-escape,
`raise_exception(msg)`, `strftime_now(fmt)`, and the special tokens of tokenizer_config.json
(`bos_token`, `eos_token`, ...) as template variables. The rendered text is tokenized in one piece
without adding special tokens (the template writes them), as transformers does.

Assistant spans (which characters the loss mask covers), in order of preference:
  1. `{% generation %} ... {% endgeneration %}` blocks when the template has them (what
     transformers' `return_assistant_tokens_mask` reads);
  2. otherwise prefix rendering: for assistant message i, the span is the text that
     `render(messages[:i+1])` adds after `render(messages[:i], add_generation_prompt=True)` (the
     reply and its end-of-turn tokens, not the assistant header). This needs a prefix-stable
     template: each of these renders must be a prefix of the full conversation's render, and a
     template that breaks this raises `ChatError` rather than guessing.
A token is an assistant token if its characters overlap a span (as transformers maps its spans).
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from datetime import datetime
from typing import Sequence

import numpy as np

from longcat_jax.data.tokenizer import HFTokenizer

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
KNOWN_ROLES = ("system", "user", "assistant", "tool")
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatError(ValueError):
  """A conversation that cannot be rendered or masked; the message says which message and why."""


def _token_str(v):
  return v.get("content") if isinstance(v, dict) else v


def check_messages(messages) -> None:
  """Raises ChatError naming the message index unless `messages` is a list of {role, content} with
  known roles."""
  if not isinstance(messages, list) or not messages:
    raise ChatError(f"'messages' must be a non-empty list, got {type(messages).__name__}")
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise ChatError(f"message {i} must be an object with 'role' and 'content', got {json.dumps(m)[:80]}")
    if m["role"] not in KNOWN_ROLES:
      raise ChatError(f"message {i} has unknown role {m['role']!r} (known: {', '.join(KNOWN_ROLES)})")
    if not isinstance(m["content"], str):
      raise ChatError(f"message {i} ({m['role']}): content must be a string, got {type(m['content']).__name__}")


def _generation_tracker():
  """A jinja2 extension for the `{% generation %}` tag: records the character span its body renders
  to while `spans` is set (to (rendered blocks so far, list of spans))."""
  from jinja2 import nodes  # pylint: disable=import-outside-toplevel
  from jinja2.ext import Extension  # pylint: disable=import-outside-toplevel

  class GenerationTracker(Extension):
    tags = {"generation"}

    def __init__(self, environment):
      super().__init__(environment)
      self.spans = None

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
      return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller):
      text = caller()
      if self.spans is not None:
        blocks, spans = self.spans
        start = len("".join(blocks))
        spans.append((start, start + len(text)))
      return text

  return GenerationTracker


class ChatTemplate:
  """A chat template (jinja2 source) with its tokenizer; see the module docstring."""

  def __init__(self, template: str, tokenizer, special_tokens: dict[str, str] | None = None, name: str = ""):
    import jinja2  # pylint: disable=import-outside-toplevel
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # pylint: disable=import-outside-toplevel
    self.source, self.tokenizer, self.name = template, tokenizer, name
    self.special_tokens = dict(special_tokens or {})

    def raise_exception(message):
      raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
      return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    tracker = _generation_tracker()
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[tracker, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
      self._template = env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
      raise ChatError(f"{name or 'chat template'}: jinja syntax error at line {e.lineno}: {e.message}") from None
    self._tracker = env.extensions[tracker.identifier]
    self.has_generation_blocks = bool(_GENERATION_TAG.search(template))

  @classmethod
  def from_dir(cls, path: str, tokenizer=None) -> "ChatTemplate":
    """The template of a checkpoint/tokenizer directory: tokenizer_config.json's `chat_template`
    (a string, or a list of {name, template}: the one named "default"), else chat_template.jinja."""
    cfg_path = os.path.join(path, "tokenizer_config.json")
    cfg = {}
    if os.path.isfile(cfg_path):
      with open(cfg_path) as f:
        cfg = json.load(f)
    template = cfg.get("chat_template")
    if isinstance(template, list):
      named = {t.get("name"): t.get("template") for t in template}
      template = named.get("default")
    jinja_path = os.path.join(path, "chat_template.jinja")
    if template is None and os.path.isfile(jinja_path):
      with open(jinja_path) as f:
        template = f.read()
    if not template:
      raise ChatError(f"{path}: no chat template (neither tokenizer_config.json 'chat_template' nor "
                      "chat_template.jinja)")
    tok = tokenizer if tokenizer is not None else HFTokenizer.from_file(path)
    special = {k: _token_str(cfg[k]) for k in _SPECIAL_KEYS if cfg.get(k) is not None}
    return cls(template, tok, special, name=cfg_path if "chat_template" in cfg else jinja_path)

  # -------------------------------------------------------------------------------------------
  # Rendering.

  def render(self, messages, add_generation_prompt: bool = False, **kwargs) -> str:
    """The template's text for `messages` (transformers' `apply_chat_template(tokenize=False)`)."""
    text, _ = self._render(messages, add_generation_prompt, track=False, **kwargs)
    return text

  def _render(self, messages, add_generation_prompt, track, **kwargs):
    import jinja2  # pylint: disable=import-outside-toplevel
    context = {**self.special_tokens, **kwargs}
    spans: list[tuple[int, int]] = []
    try:
      if not track:
        return self._template.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **context), spans
      blocks = []
      with self._tracking(blocks, spans):
        gen = self._template.generate(messages=messages, tools=None, documents=None,
                                      add_generation_prompt=add_generation_prompt, **context)
        for block in gen:
          blocks.append(block)
      return "".join(blocks), spans
    except jinja2.exceptions.TemplateError as e:
      raise ChatError(f"chat template failed: {e}") from None
    except Exception as e:  # a template's own errors (KeyError, TypeError, ...) are the row's problem
      raise ChatError(f"chat template failed: {type(e).__name__}: {e}") from None

  @contextmanager
  def _tracking(self, blocks, spans):
    self._tracker.spans = (blocks, spans)
    try:
      yield
    finally:
      self._tracker.spans = None

  def assistant_spans(self, messages) -> tuple[str, list[tuple[int, int]]]:
    """(full text, character spans [start, end) of the assistant replies); see the module docstring."""
    check_messages(messages)
    if not any(m["role"] == "assistant" for m in messages):
      raise ChatError("no assistant message (nothing to train on)")
    if self.has_generation_blocks:
      return self._render(messages, False, track=True)
    full = self.render(messages)
    spans = []
    for i, m in enumerate(messages):
      if m["role"] != "assistant":
        continue
      head = self.render(messages[:i], add_generation_prompt=True) if i else self.render([], True)
      upto = self.render(messages[: i + 1])
      if not (upto.startswith(head) and full.startswith(upto)):
        bad = "the conversation up to it" if not full.startswith(upto) else "the generation prompt before it"
        raise ChatError(f"message {i} (assistant): the template is not prefix-stable ({bad} does not render as "
                        "a prefix of the whole conversation), so its reply cannot be located; add "
                        "{% generation %} blocks to the template")
      if len(upto) > len(head):
        spans.append((len(head), len(upto)))
    return full, spans

  # -------------------------------------------------------------------------------------------
  # Tokens.

  def _encode_with_offsets(self, text: str):
    tok = getattr(self.tokenizer, "_tok", None)
    if tok is None:
      raise ChatError(f"tokenizer {self.tokenizer.name} has no character offsets (a tokenizer.json is needed)")
    enc = tok.encode(text, add_special_tokens=False)
    return np.asarray(enc.ids, np.int32), enc.offsets

  def tokenize(self, messages, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of the rendered conversation (a prompt when `add_generation_prompt`)."""
    if messages:
      check_messages(messages)
    return self.tokenizer.encode(self.render(messages, add_generation_prompt))

  def tokenize_with_mask(self, messages) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [T], mask uint8 [T]): mask is 1 on tokens that overlap an assistant span."""
    text, spans = self.assistant_spans(messages)
    ids, offsets = self._encode_with_offsets(text)
    off = np.asarray(offsets, np.int64).reshape(-1, 2)
    mask = np.zeros(len(ids), bool)
    for a, b in spans:
      mask |= (off[:, 0] < b) & (off[:, 1] > a) & (off[:, 1] > off[:, 0])
    mask = mask.astype(np.uint8)
    if not mask.any():
      raise ChatError("the assistant replies cover no token (empty replies?)")
    return ids, mask


def eos_token_ids(path: str) -> list[int]:
  """The ids that end a reply: generation_config.json's `eos_token_id` (int or list), else
  config.json's; [] if neither has one."""
  for name in ("generation_config.json", "config.json"):
    p = os.path.join(path, name)
    if os.path.isfile(p):
      with open(p) as f:
        v = json.load(f).get("eos_token_id")
      if v is not None:
        return [int(x) for x in (v if isinstance(v, (list, tuple)) else [v])]
  return []


def read_jsonl_conversations(path: str) -> Sequence[tuple[int, object]]:
  """(1-based line number, parsed row or the ChatError for that line) for each non-blank line."""
  rows = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        rows.append((n, ChatError(f"not valid JSON ({e.msg} at column {e.colno})")))
        continue
      if not isinstance(row, dict) or "messages" not in row:
        rows.append((n, ChatError("row has no 'messages' field")))
        continue
      rows.append((n, row["messages"]))
  return rows
