"""Qwen 2.5 0.5B LoRA. No Qwen weights ship in any package: pass your own checkpoint with
`--set model=/path/to/Qwen2.5-0.5B` (an HF directory or GGUF); by default it is a random
init of the real shape with the real Qwen tokenizer, for smoke runs.
"""

from mobiletune.train.recipe import LoraConfig, OptimConfig, Recipe

recipe = Recipe(
    name="qwen25-lora",
    model="preset:qwen2.5-0.5b",
    data=("botchan",),
    seq_len=128,
    micro_batch=4,
    steps=100,
    lora=LoraConfig(r=8, alpha=16),
    optim=OptimConfig(lr=2e-4, warmup_steps=10),
    eval_every=50,
    checkpoint_every=50,
)
