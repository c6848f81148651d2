"""Chat data: the checkpoint's template rendered as transformers does, the assistant-only loss mask,
bad rows reported by line, and packed chat rows keeping whole conversations apart."""

import json
import os

import numpy as np
import pytest
from chat_fixture import CHAT_TEMPLATE, CONVERSATIONS, write_chat_jsonl, write_tokenizer

from longcat_jax.data import TokenStore, prep
from longcat_jax.data.chat import ChatError, ChatTemplate
from longcat_jax.data.pipeline import make_train_iterator

# The same template with {% generation %} blocks around the assistant replies (the spans
# transformers' return_assistant_tokens_mask reads).
GEN_TEMPLATE = CHAT_TEMPLATE.replace(
    "{{ m['content'] | trim }}{{ eos_token }}\n",
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim }}{{ eos_token }}\n"
    "{% endgeneration %}{% else %}{{ m['content'] | trim }}{{ eos_token }}\n{% endif %}\n")


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
  plain, gen = str(tmp_path_factory.mktemp("tok")), str(tmp_path_factory.mktemp("tok_gen"))
  write_tokenizer(plain)
  write_tokenizer(gen, GEN_TEMPLATE)
  return plain, gen


def test_template_tokens_and_mask_equal_transformers(tok_dirs):
  from transformers import AutoTokenizer
  plain, gen = tok_dirs
  ours, ours_gen = ChatTemplate.from_dir(plain), ChatTemplate.from_dir(gen)
  hf, hf_gen = AutoTokenizer.from_pretrained(plain), AutoTokenizer.from_pretrained(gen)
  assert not ours.has_generation_blocks and ours_gen.has_generation_blocks
  for conv in CONVERSATIONS:
    text = ours.render(conv)
    assert text == hf.apply_chat_template(conv, tokenize=False)
    assert ours_gen.render(conv) == text   # the markers render to nothing
    prompt = conv[:1]
    assert ours.tokenize(prompt, add_generation_prompt=True) == hf.apply_chat_template(
        prompt, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    ids, mask = ours.tokenize_with_mask(conv)                 # prefix rendering
    ids_gen, mask_gen = ours_gen.tokenize_with_mask(conv)     # {% generation %} spans
    out = hf_gen.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    np.testing.assert_array_equal(ids, out["input_ids"])
    np.testing.assert_array_equal(ids_gen, out["input_ids"])
    np.testing.assert_array_equal(mask, out["assistant_masks"])
    np.testing.assert_array_equal(mask_gen, out["assistant_masks"])
    # The mask covers exactly the replies and their end-of-turn tokens.
    replies = "".join(m["content"].strip() + "<|end|>\n" for m in conv if m["role"] == "assistant")
    assert hf.decode(ids[mask == 1]) == replies


def test_template_errors_name_the_message(tok_dirs):
  t = ChatTemplate.from_dir(tok_dirs[0])
  with pytest.raises(ChatError, match="message 1 has unknown role 'robot'"):
    t.tokenize_with_mask([{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}])
  with pytest.raises(ChatError, match="no assistant message"):
    t.tokenize_with_mask([{"role": "user", "content": "hi"}])
  # A role the template itself refuses (raise_exception) is a template failure.
  with pytest.raises(ChatError, match="chat template failed: unsupported role tool"):
    t.tokenize_with_mask([{"role": "tool", "content": "{}"}, {"role": "assistant", "content": "ok"}])
  # A template that is not prefix-stable cannot locate replies without {% generation %}.
  unstable = ChatTemplate("{% for m in messages %}{{ m['content'] }}|{% endfor %}{{ messages | length }}",
                          t.tokenizer)
  with pytest.raises(ChatError, match="message 1 .assistant.: the template is not prefix-stable"):
    unstable.tokenize_with_mask(CONVERSATIONS[0])


def test_prep_chat_reports_bad_rows_and_packs_whole_conversations(tok_dirs, tmp_path, capsys):
  jsonl = str(tmp_path / "chat.jsonl")
  long_reply = " ".join(["word"] * 200)
  write_chat_jsonl(jsonl, extra_lines=[
      "{not json",                                                                   # line 5
      json.dumps({"messages": [{"role": "user", "content": "no reply"}]}),           # line 6
      json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}),
      json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": long_reply}]}),
      json.dumps({"messages": [{"role": "tool", "content": "{}"}, {"role": "assistant", "content": "ok"}]}),
  ])
  out = str(tmp_path / "store")
  argv = ["--chat", jsonl, "--tokenizer", tok_dirs[0], "--output", out, "--seq-len", "96"]
  assert prep.main(argv + ["--strict"]) == 1
  err = capsys.readouterr().err
  assert not os.path.exists(out) and "nothing written" in err
  assert prep.main(argv) == 0
  err = capsys.readouterr().err
  for line, what in ((5, "not valid JSON"), (6, "no assistant message"), (7, "unknown role 'robot'"),
                     (8, "tokens, more than seq_len=96"), (9, "chat template failed")):
    assert f"chat.jsonl:{line}: " in err and what in err, (line, what, err)
  assert "9 rows, 4 written, 5 bad" in err
  store = TokenStore.open(out)
  assert store.has_loss_mask and store.num_docs == 4
  t = ChatTemplate.from_dir(tok_dirs[0])
  for i, conv in enumerate(CONVERSATIONS):
    ids, mask = t.tokenize_with_mask(conv)
    np.testing.assert_array_equal(store.read_doc(i), ids)
    a, b = store.offsets[i], store.offsets[i + 1]
    np.testing.assert_array_equal(store.read_mask_range_async(a, b).result(), mask)

  # Packed rows: whole conversations, one segment each, loss only where the NEXT token is an
  # assistant token of the same conversation.
  S = 96
  it = make_train_iterator(out, seq_len=S, global_batch_size=4, seed=0, shard_index=0, shard_count=1,
                           num_threads=0, prefetch=0)
  assert it.get_state()["packing"] == "documents"
  seen = 0
  for _ in range(2):
    batch = next(it)
    for r in range(4):
      seg, ids, lm, tgt = (batch[k][r] for k in ("segment_ids", "input_ids", "loss_mask", "targets"))
      for s in range(1, seg.max() + 1):
        where = np.flatnonzero(seg == s)
        doc_ids = ids[where]
        doc = next(i for i in range(4) if np.array_equal(store.read_doc(i), doc_ids))  # a whole conversation
        _, mask = t.tokenize_with_mask(CONVERSATIONS[doc])
        want = np.r_[mask[1:], 0].astype(np.float32)
        np.testing.assert_array_equal(lm[where], want)
        np.testing.assert_array_equal(batch["positions"][r][where], np.arange(len(where)))
        np.testing.assert_array_equal(tgt[where][want > 0], doc_ids[1:][want[:-1] > 0])
        seen += 1
      assert (lm[seg == 0] == 0).all()
  assert seen >= 8
