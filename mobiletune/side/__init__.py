"""The server of server-assisted side-tuning (JAX; a desktop or a GPU box): it receives the
phone's quantized hidden states over HTTP (``server``), trains the side network on them in
strict sequence order (``trainer``, ``steps``) and serves the trained side weights."""
