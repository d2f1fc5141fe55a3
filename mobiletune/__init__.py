"""mobiletune: author a fine-tuning recipe in JAX, export it to a LiteRT training bundle,
fine-tune on the phone with numpy + ai-edge-litert."""

__version__ = "0.1.0"
