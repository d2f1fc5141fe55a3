"""Checkpoints in, checkpoints out: Hugging Face directories (safetensors, sharded or not)
and GGUF files, all into the flat HF-named parameter dict of ``mobiletune.models``."""
