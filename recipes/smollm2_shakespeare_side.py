"""SmolLM2-135M server-assisted side-tuning on Shakespeare (the LoRA recipe's data): the
phone runs the frozen model forward and streams int8 activations; a server trains a side
network one eighth as wide. Train on eight plays, evaluate on Hamlet (held out).

    mobiletune export recipes/smollm2_shakespeare_side.py --side --out side.bundle
    mobiletune side serve recipes/smollm2_shakespeare_side.py --out server --token-file token
    mobiletune device side-train side.bundle --data plays.txt --server http://127.0.0.1:8470 \
        --token-file token --out run
    mobiletune ppl --model smollm2-135m --side run --text shakespeare:hamlet --seq-len 512 \
        --max-windows 4
"""

from mobiletune.runtime.side.config import SideConfig
from mobiletune.train.recipe import OptimConfig, Recipe

PLAYS = ["macbeth", "othello", "lear", "romeo_and_juliet", "julius_caesar", "tempest",
         "twelfth_night", "midsummer_nights_dream"]

recipe = Recipe(
    name="smollm2-shakespeare-side",
    model="smollm2-135m",
    data=tuple(f"shakespeare:{p}" for p in PLAYS),
    val_data=("shakespeare:hamlet",),
    seq_len=128,
    bos_each_example=True,   # every window starts with BOS where the tokenizer has one (Gemma)
    micro_batch=4,
    steps=120,
    lora=None,
    side=SideConfig(reduction=8, precision="int8", width="full", window=4),
    optim=OptimConfig(lr=3e-3, warmup_steps=10, schedule="cosine", weight_decay=0.0),
    checkpoint_every=20,
)
