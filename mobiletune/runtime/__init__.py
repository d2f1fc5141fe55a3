"""The phone side: imports only the standard library, numpy, ai_edge_litert, tokenizers and
jinja2 (the ``runtime`` extra). A test checks that importing it pulls in no JAX, Flax,
Optax, TensorFlow, torch or transformers."""
