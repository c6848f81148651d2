"""Training data for longcat_jax: tokenizers, a tensorstore token store, a prep
command and a packed, sharded, checkpointable batch iterator.

  python -m longcat_jax.data.prep --input "corpus/*.txt" --output /data/store
  it = make_train_iterator("/data/store", seq_len=512, global_batch_size=8,
                           seed=0)
  batch = next(it)   # dict of numpy [8 // process_count, 512]; see pipeline

With no corpus at hand, ``prepare_default_corpus(dir)`` tokenizes the Python
standard library and returns the store path.

Saving the iterator with orbax (0.12.8) next to the train state::

  mngr = ocp.CheckpointManager(ckpt_dir)
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(train_state),
      data=ocp.args.JsonSave(it.get_state())))          # == iterator_save_args(it)
  ...
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=ocp.args.JsonRestore()))                     # == iterator_restore_args()
  it.set_state(restored["data"])

The state is identical on every host, so JsonSave (written by the primary
host only) is correct in multi-host runs. ``grain.checkpoint.CheckpointSave(it)``
/ ``CheckpointRestore(it)`` also work (``TrainIterator`` is a grain
``DatasetIterator``; they write one JSON file per process and restore in place).

``prep`` and ``pipeline`` (grain, jax) are imported on first attribute use, so
importing ``longcat_jax.data`` stays light.
"""

from longcat_jax.data.store import TokenStore, TokenStoreWriter
from longcat_jax.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

# name -> submodule, imported on first use (keeps `python -m ...prep` clean).
_LAZY = {"default_corpus_files": "prep", "prepare": "prep",
         "prepare_default_corpus": "prep", "make_train_iterator": "pipeline",
         "pack_rows": "pipeline", "TrainIterator": "pipeline",
         "iterator_save_args": "pipeline", "iterator_restore_args": "pipeline"}

__all__ = ["TokenStore", "TokenStoreWriter", "ByteTokenizer", "HFTokenizer",
           "load_tokenizer", *_LAZY]


def __getattr__(name):
  if name in _LAZY:
    import importlib  # pylint: disable=import-outside-toplevel
    module = importlib.import_module(f"longcat_jax.data.{_LAZY[name]}")
    return getattr(module, name)
  raise AttributeError(f"module 'longcat_jax.data' has no attribute {name!r}")
