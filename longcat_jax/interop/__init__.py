from longcat_jax.interop.hf import CheckpointError, load_pretrained, read_mtp_tensors, save_pretrained
