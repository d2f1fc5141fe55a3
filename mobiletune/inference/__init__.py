"""Using a model on the desktop (JAX): perplexity and generation."""
