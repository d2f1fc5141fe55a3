"""SmolLM2-135M LoRA on Shakespeare: train on eight plays, validate on Hamlet (held out).

    mobiletune train recipes/smollm2_shakespeare_lora.py [--set steps=300]
    mobiletune ppl --model smollm2-135m --adapter out/smollm2-shakespeare-lora/adapter \
        --text shakespeare:hamlet --seq-len 512 --max-windows 4
"""

from mobiletune.train.recipe import LoraConfig, OptimConfig, Recipe

PLAYS = ["macbeth", "othello", "lear", "romeo_and_juliet", "julius_caesar", "tempest",
         "twelfth_night", "midsummer_nights_dream"]

recipe = Recipe(
    name="smollm2-shakespeare-lora",
    model="smollm2-135m",
    data=tuple(f"shakespeare:{p}" for p in PLAYS),
    val_data=("shakespeare:hamlet",),
    seq_len=128,
    bos_each_example=True,   # every window starts with BOS where the tokenizer has one (Gemma)
    micro_batch=4,
    accumulation=1,
    steps=300,
    lora=LoraConfig(r=8, alpha=16, dropout=0.05, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")),
    optim=OptimConfig(lr=1e-3, warmup_steps=20, schedule="cosine", weight_decay=0.0),
    eval_every=50,
    eval_batches=8,
    checkpoint_every=50,
)
