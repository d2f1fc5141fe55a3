"""GPT-2 (124M shape) full fine-tuning on Shakespeare. No real GPT-2 weights ship in any
package, so it starts from a random init of the real shape unless you pass a checkpoint:

    mobiletune train recipes/gpt2_full.py --set model=/path/to/gpt2-hf-dir
"""

from mobiletune.train.recipe import OptimConfig, Recipe

recipe = Recipe(
    name="gpt2-full",
    model="preset:gpt2",
    data=("shakespeare:macbeth", "shakespeare:othello", "shakespeare:lear"),
    val_data=("shakespeare:hamlet",),
    seq_len=128,
    micro_batch=4,
    accumulation=2,
    steps=200,
    lora=None,                # full fine-tuning: every parameter trains
    optim=OptimConfig(lr=3e-4, warmup_steps=20, weight_decay=0.1),
    eval_every=50,
    checkpoint_every=50,
)
