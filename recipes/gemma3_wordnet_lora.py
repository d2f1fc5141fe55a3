"""Gemma 3 270M LoRA on an instruction-style set from WordNet ("Define X" -> gloss), through
Gemma's chat template, with the prompt masked out of the loss (train on the answer only).

    mobiletune train recipes/gemma3_wordnet_lora.py [--set steps=200]
"""

from mobiletune.train.recipe import LoraConfig, OptimConfig, Recipe

recipe = Recipe(
    name="gemma3-wordnet-lora",
    model="gemma3-270m",
    data=("wordnet:define",),
    val_fraction=0.05,
    seq_len=64,
    micro_batch=8,
    accumulation=1,
    steps=200,
    mask_prompt=True,
    truncate="truncate",      # a few glosses are long: keep the first seq_len tokens, logged
    lora=LoraConfig(r=8, alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")),
    optim=OptimConfig(lr=5e-4, warmup_steps=10),
    eval_every=50,
    eval_batches=8,
    checkpoint_every=50,
)
