"""GPT-2 (124M shape) LoRA r8 on Shakespeare — the phone-side benchmark workload (b4×s128).
A random init of the real shape unless you pass a checkpoint (no GPT-2 weights ship in
any package); export it sharded for the phone:

    mobiletune export recipes/gpt2_lora.py --out out/gpt2-lora.bundle --sharded
"""

from mobiletune.train.recipe import LoraConfig, OptimConfig, Recipe

recipe = Recipe(
    name="gpt2-lora",
    model="preset:gpt2",
    data=("shakespeare:macbeth", "shakespeare:othello", "shakespeare:lear"),
    val_data=("shakespeare:hamlet",),
    seq_len=128,
    micro_batch=4,
    steps=100,
    lora=LoraConfig(r=8, alpha=16),          # PEFT's default for GPT-2: c_attn
    optim=OptimConfig(lr=2e-4, warmup_steps=10),
    eval_every=50,
    checkpoint_every=50,
)
