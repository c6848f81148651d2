"""Tests for longcat_jax.data: tokenizers, token store, prep, packing iterator."""

import json
import os

import numpy as np
import pytest

from longcat_jax.data import store as store_lib
from longcat_jax.data import (ByteTokenizer, TokenStore, default_corpus_files,
                              iterator_restore_args, iterator_save_args,
                              load_tokenizer, make_train_iterator, pack_rows,
                              prepare, prepare_default_corpus)
from longcat_jax.data import prep as prep_lib


def _random_docs(rng, n, vocab=50, max_len=40):
  return [rng.integers(3, vocab, size=rng.integers(1, max_len)).astype(np.int32)
          for _ in range(n)]


def _write_store(path, docs, vocab=50):
  with TokenStore.create(str(path), vocab, tokenizer="test") as w:
    for i, d in enumerate(docs):
      w.add(d, source=f"doc{i}.txt")
  return str(path)


@pytest.fixture
def small_chunks(monkeypatch):
  """Tiny zarr chunks and flushes, so small tests exercise chunked appends."""
  monkeypatch.setattr(store_lib, "TOKEN_CHUNK", 16)
  monkeypatch.setattr(store_lib, "OFFSET_CHUNK", 4)
  monkeypatch.setattr(store_lib, "_FLUSH_CHUNKS", 2)


@pytest.fixture
def corpus(tmp_path, small_chunks):
  """A store of 30 random docs (one longer than seq_len=16) and its docs."""
  rng = np.random.default_rng(0)
  docs = _random_docs(rng, 30) + [np.arange(3, 43, dtype=np.int32)]
  return _write_store(tmp_path / "store", docs), docs


# ---------------------------------------------------------------- tokenizers

def test_byte_tokenizer_round_trip():
  tok = load_tokenizer(None)
  assert isinstance(tok, ByteTokenizer) and load_tokenizer("byte").name == "byte"
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 259)
  text = "héllo, wörld ✓\n\tdef f(): pass"
  ids = tok.encode(text)
  assert isinstance(ids, list) and min(ids) >= 3 and max(ids) < 259
  assert tok.encode("A") == [3 + 65]
  assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == text
  assert tok.decode([3 + 0xFF]) == "\ufffd"  # invalid UTF-8 is replaced


def test_hf_tokenizer_from_file(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="<unk>"))
  tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  trainer = tokenizers.trainers.WordLevelTrainer(
      special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
  tk.train_from_iterator(["the cat sat on the mat", "a dog sat"], trainer)
  path = tmp_path / "tokenizer.json"
  tk.save(str(path))

  tok = load_tokenizer(str(path))
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tok.vocab_size == tk.get_vocab_size()
  ids = tok.encode("the cat sat")
  assert len(ids) == 3 and all(i > 3 for i in ids)
  assert tok.decode(ids) == "the cat sat"
  assert load_tokenizer(str(tmp_path)).encode("a dog") == tok.encode("a dog")
  assert load_tokenizer(str(path), bos_id=3).bos_id == 3

  (tmp_path / "doc.txt").write_text("the dog sat on the cat")
  s = prepare([str(tmp_path / "doc.txt")], str(tmp_path / "hf_store"),
              tok, progress=False)
  assert s.vocab_size == tok.vocab_size and s.meta["tokenizer"] == str(path)
  d = s.read_doc(0)
  assert d[0] == 1 and d[-1] == 2
  assert tok.decode(d[1:-1]) == "the dog sat on the cat"


# --------------------------------------------------------------------- store

def test_store_round_trip(tmp_path, small_chunks):
  rng = np.random.default_rng(1)
  docs = _random_docs(rng, 12) + [np.zeros(0, np.int32)] + _random_docs(rng, 3)
  s = TokenStore.open(_write_store(tmp_path / "s", docs))
  assert s.num_docs == len(docs)
  assert s.num_tokens == sum(len(d) for d in docs)
  for i, d in enumerate(docs):
    np.testing.assert_array_equal(s.read_doc(i), d)
  flat = np.concatenate(docs)
  np.testing.assert_array_equal(s.read_range(7, 61), flat[7:61])
  meta = json.loads((tmp_path / "s" / "meta.json").read_text())
  assert meta["vocab_size"] == 50 and meta["num_docs"] == len(docs)
  assert meta["sources"][:2] == ["doc0.txt", "doc1.txt"]
  zarr = json.loads((tmp_path / "s" / "tokens" / "zarr.json").read_text())
  assert [c["name"] for c in zarr["codecs"]] == ["bytes", "zstd"]
  assert zarr["chunk_grid"]["configuration"]["chunk_shape"] == [16]
  with pytest.raises(FileExistsError):
    TokenStore.create(str(tmp_path / "s"), 50)
  with pytest.raises(IndexError):
    s.read_doc(len(docs))


def test_interrupted_write_leaves_nothing(tmp_path):
  with pytest.raises(RuntimeError):
    with TokenStore.create(str(tmp_path / "s"), 10) as w:
      w.add([1, 2, 3])
      raise RuntimeError("killed")
  assert os.listdir(tmp_path) == []
  w = TokenStore.create(str(tmp_path / "s2"), 10)
  w.add([1, 2])  # never closed: like a crash mid-prep
  assert not os.path.exists(tmp_path / "s2") and not TokenStore.exists(
      str(tmp_path / "s2"))
  with pytest.raises(FileNotFoundError):
    TokenStore.open(str(tmp_path / "s2"))


def test_out_of_vocab_raises_with_file_and_position(tmp_path):
  with pytest.raises(ValueError, match=r"bad\.txt.*id 99 at document 1, "
                                       r"token offset 2 "):
    with TokenStore.create(str(tmp_path / "s"), 50) as w:
      w.add([1, 2, 3], source="ok.txt")
      w.add([1, 2, 99, 4], source="bad.txt")
  with pytest.raises(ValueError, match="id -1 at document 0, token offset 0"):
    TokenStore.create(str(tmp_path / "s"), 50).add([-1])
  # Read side: a store whose meta claims a smaller vocab fails per row.
  path = _write_store(tmp_path / "s3", [np.array([5, 6, 7]),
                                        np.array([8, 40, 9])])
  meta = json.loads((tmp_path / "s3" / "meta.json").read_text())
  meta["vocab_size"] = 30
  (tmp_path / "s3" / "meta.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError, match=r"s3/tokens.*id 40 at document 1, "
                                       r"token offset 1 "):
    pack_rows(TokenStore.open(path), np.array([0]), seq_len=8)


# ---------------------------------------------------------------------- prep

def test_prep_cli(tmp_path, capsys):
  (tmp_path / "in").mkdir()
  texts = {"a.txt": "hello", "b.txt": "wörld\n", "c.md": "skip"}
  for name, t in texts.items():
    (tmp_path / "in" / name).write_text(t, encoding="utf-8")
  prep_lib.main(["--input", str(tmp_path / "in" / "*.txt"),
                 "--output", str(tmp_path / "out"), "--tokenizer", "byte"])
  assert "2 docs" in capsys.readouterr().out
  s = TokenStore.open(str(tmp_path / "out"))
  tok = ByteTokenizer()
  assert s.read_doc(0).tolist() == [1] + tok.encode("hello") + [2]
  assert tok.decode(s.read_doc(1)) == "wörld\n"
  with pytest.raises(FileNotFoundError, match="nomatch"):
    prep_lib.main(["--input", str(tmp_path / "nomatch*"),
                   "--output", str(tmp_path / "o2")])


def test_default_corpus(tmp_path):
  files = default_corpus_files()
  assert len(files) > 100 and files == sorted(files)
  assert all(f.endswith(".py") and os.path.isfile(f) for f in files[:20])
  assert not any("site-packages" in f for f in files)
  assert default_corpus_files(max_files=3) == files[:3]
  path = prepare_default_corpus(str(tmp_path), max_files=3)
  mtime = os.path.getmtime(os.path.join(path, "meta.json"))
  assert prepare_default_corpus(str(tmp_path), max_files=3) == path
  assert os.path.getmtime(os.path.join(path, "meta.json")) == mtime
  s = TokenStore.open(path)
  assert s.num_docs == 3 and s.meta["sources"] == files[:3]


# ------------------------------------------------------------------ pipeline

def test_packing_invariants(corpus):
  path, docs = corpus
  s, S = TokenStore.open(path), 16
  num_rows = -(-s.num_tokens // S)
  b = pack_rows(s, np.arange(num_rows), S)
  assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
      "input_ids": ((num_rows, S), "int32"), "targets": ((num_rows, S), "int32"),
      "segment_ids": ((num_rows, S), "int32"),
      "positions": ((num_rows, S), "int32"),
      "loss_mask": ((num_rows, S), "float32")}
  seg, pos, ids = b["segment_ids"], b["positions"], b["input_ids"]
  valid = seg > 0
  # Rows in order are the flat stream; padding only at the end of the last row.
  np.testing.assert_array_equal(ids[valid], np.concatenate(docs))
  assert valid[:-1].all() and not valid[-1].all()
  assert (ids[~valid] == 0).all() and (pos[~valid] == 0).all()
  assert (seg[:, 0] == 1).all()
  step = np.diff(seg, axis=1)
  assert ((step == 0) | (step == 1) | ((step < 0) & ~valid[:, 1:])).all()
  new_seg = np.c_[np.ones(num_rows, bool), step != 0] & valid
  assert (pos[new_seg] == 0).all()  # positions restart per segment
  cont = ~new_seg & valid
  assert (pos[cont] == np.c_[pos[:, :1], pos[:, :-1]][cont] + 1).all()
  same_next = np.c_[(step == 0) & valid[:, 1:], np.zeros(num_rows, bool)]
  np.testing.assert_array_equal(b["loss_mask"], same_next.astype(np.float32))
  shifted = np.c_[ids[:, 1:], np.zeros(num_rows, np.int32)]
  np.testing.assert_array_equal(b["targets"], np.where(same_next, shifted, 0))
  # Segments are exactly the pieces of documents cut at row boundaries, and
  # positions count from the start of the piece (doc 30 is longer than a row).
  lens = [len(d) for d in docs]
  doc_of = np.repeat(np.arange(len(docs)), lens)
  flat = np.arange(s.num_tokens)
  starts = np.r_[True, doc_of[1:] != doc_of[:-1]] | (flat % S == 0)
  np.testing.assert_array_equal(new_seg[valid], starts)
  piece_start = np.maximum(np.cumsum([0] + lens)[doc_of], flat // S * S)
  np.testing.assert_array_equal(pos[valid], flat - piece_start)
  assert max(lens) > S


def test_epoch_covers_all_rows_and_reshuffles(corpus):
  path, _ = corpus
  s, S = TokenStore.open(path), 16
  num_rows = -(-s.num_tokens // S)
  all_rows = pack_rows(s, np.arange(num_rows), S)["input_ids"]
  it = make_train_iterator(path, S, num_rows, seed=3, shard_index=0,
                           shard_count=1)
  e1, e2 = next(it)["input_ids"], next(it)["input_ids"]
  key = lambda a: sorted(map(bytes, a))
  assert key(e1) == key(all_rows) == key(e2)
  assert not (e1 == e2).all()  # a different order in epoch 2


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_seed_determinism(corpus):
  path, _ = corpus
  mk = lambda seed: make_train_iterator(path, 16, 4, seed, 0, 1)
  _assert_same(_take(mk(7), 5), _take(mk(7), 5))
  a, b = _take(mk(7), 3), _take(mk(8), 3)
  assert any((x["input_ids"] != y["input_ids"]).any() for x, y in zip(a, b))


def test_shards_disjoint_and_cover_global_batch(corpus):
  path, _ = corpus
  full = _take(make_train_iterator(path, 16, 4, 5, 0, 1), 6)
  s0 = _take(make_train_iterator(path, 16, 4, 5, 0, 2), 6)
  s1 = _take(make_train_iterator(path, 16, 4, 5, 1, 2), 6)
  for f, a, b in zip(full, s0, s1):
    assert a["input_ids"].shape == (2, 16)
    for k in f:
      np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), f[k])
    assert not set(map(bytes, a["input_ids"])) & set(map(bytes, b["input_ids"]))
  with pytest.raises(ValueError, match="multiple of shard_count"):
    make_train_iterator(path, 16, 5, 0, 0, 2)


def test_state_save_restore(corpus):
  path, _ = corpus
  n, m = 7, 9  # 31 rows / batch 4: crosses epoch boundaries
  it = make_train_iterator(path, 16, 4, 11, 0, 1)
  _take(it, n)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, m)
  fresh = make_train_iterator(path, 16, 4, 11, 0, 1)
  next(fresh)  # a used iterator is rewound/advanced by set_state
  fresh.set_state(state)
  _assert_same(_take(fresh, m), expected)
  other = make_train_iterator(path, 16, 4, 12, 0, 1)
  with pytest.raises(ValueError, match="seed"):
    other.set_state(state)


def test_state_through_orbax_checkpoint_manager(corpus, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  import grain
  path, _ = corpus
  it = make_train_iterator(path, 16, 4, 2, 0, 1)
  _take(it, 5)
  params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
  mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"))
  mngr.save(5, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params),
      data=iterator_save_args(it),
      grain_data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  expected = _take(it, 4)

  mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"))
  assert mngr.latest_step() == 5
  fresh = make_train_iterator(path, 16, 4, 2, 0, 1)
  fresh2 = make_train_iterator(path, 16, 4, 2, 0, 1)
  restored = mngr.restore(5, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(params),
      data=iterator_restore_args(),
      grain_data=grain.checkpoint.CheckpointRestore(fresh2)))
  np.testing.assert_array_equal(restored["params"]["w"], params["w"])
  fresh.set_state(restored["data"])
  _assert_same(_take(fresh, 4), expected)
  _assert_same(_take(fresh2, 4), expected)  # grain's handler restores in place
  mngr.close()
