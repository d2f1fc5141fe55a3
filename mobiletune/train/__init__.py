"""Fine-tuning on the desktop (JAX): recipes, optimizers, the loss, the pure step functions,
the trainer loop and its checkpoints."""
