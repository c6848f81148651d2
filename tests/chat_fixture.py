"""A small released-style chat checkpoint for the fine-tune / export / chat tests, built in the test:
a random `transformers.LongcatFlashForCausalLM` (save_pretrained), a byte-level BPE tokenizer
trained with `tokenizers` on a few sentences, a chat template in tokenizer_config.json, a
generation_config.json, and a small chat JSONL."""

from __future__ import annotations

import json
import os

from hf_reference import make_reference

# ChatML-like, with the features transformers' rendering environment has to get right:
# trim_blocks / lstrip_blocks (the indented block tags leave no whitespace), raise_exception,
# bos_token / eos_token variables and add_generation_prompt.
CHAT_TEMPLATE = """{{ bos_token }}
{% for m in messages %}
  {% if m['role'] not in ['system', 'user', 'assistant'] %}
    {{ raise_exception('unsupported role ' + m['role']) }}
  {% endif %}
<|{{ m['role'] }}|>
{{ m['content'] | trim }}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}"""

SPECIALS = ["<pad>", "<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

SENTENCES = [
    "The cat sat on the mat and looked at the moon.",
    "Mixture of experts models route each token to a few experts.",
    "What is the capital of France? The capital of France is Paris.",
    "Please write a short poem about the sea, the wind and the sky.",
    "def add(a, b):\n    return a + b\n",
    "Zero experts cost nothing: their slots fold into one scale.",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "system", "content": "You are a helpful poet."},
     {"role": "user", "content": "Write about the sea."},
     {"role": "assistant", "content": "The sea, the wind and the sky."},
     {"role": "user", "content": "And the moon?"},
     {"role": "assistant", "content": "The moon looked at the cat."}],
    [{"role": "user", "content": "def add(a, b):"},
     {"role": "assistant", "content": "    return a + b"}],
    [{"role": "user", "content": "Do experts cost much?"},
     {"role": "assistant", "content": "Zero experts cost nothing."}],
]

VOCAB = 320  # model vocab (the tokenizer has fewer ids)


def train_tokenizer(vocab_size: int = 300):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  corpus = SENTENCES + [m["content"] for c in CONVERSATIONS for m in c]
  tok.train_from_iterator(corpus * 4, trainer=trainer)
  return tok


def write_tokenizer(path: str, template: str = CHAT_TEMPLATE) -> None:
  os.makedirs(path, exist_ok=True)
  train_tokenizer().save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|end|>",
               "pad_token": "<pad>", "chat_template": template, "model_max_length": 4096}, f, indent=1)


def make_chat_checkpoint(path: str, seed: int = 0, **overrides):
  """Writes the checkpoint directory; returns the float32 transformers model."""
  from tokenizers import Tokenizer
  write_tokenizer(path)
  tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
  ids = {s: tok.token_to_id(s) for s in SPECIALS}
  kw = dict(vocab_size=VOCAB, pad_token_id=ids["<pad>"], bos_token_id=ids["<s>"], eos_token_id=ids["<|end|>"],
            max_position_embeddings=512)
  kw.update(overrides)
  ref = make_reference(seed=seed, bias_scale=0.05, **kw)
  ref.save_pretrained(path)
  with open(os.path.join(path, "generation_config.json"), "w") as f:
    json.dump({"bos_token_id": ids["<s>"], "eos_token_id": [ids["<|end|>"]], "pad_token_id": ids["<pad>"]}, f)
  return ref


def write_chat_jsonl(path: str, conversations=None, extra_lines=()) -> None:
  with open(path, "w") as f:
    for c in conversations or CONVERSATIONS:
      f.write(json.dumps({"messages": c}) + "\n")
    for line in extra_lines:
      f.write(line + "\n")
