"""SmolLM2-135M server-assisted side-tuning on Shakespeare, with the side network as a copy
of the top layers: the phone runs layers 0-7 of the frozen model forward and sends their
output h_8 (fp32); the server trains a LoRA adapter (r 8 on q, k, v, o and lr 1e-3, as the
on-device LoRA recipe) on its own copy of layers 8-29. The ladder recipe
(``smollm2_shakespeare_side.py``) leaves every layer as it is and trails on-device LoRA by
~12 % in held-out perplexity; this one reaches it (README, "Measured").

    mobiletune export recipes/smollm2_shakespeare_side_cut.py --side --out cut.bundle
    mobiletune side serve recipes/smollm2_shakespeare_side_cut.py --out server --token-file token
    mobiletune device side-train cut.bundle --data plays.txt --server http://127.0.0.1:8470 \
        --token-file token --out run
    mobiletune ppl --model smollm2-135m --side run --text shakespeare:hamlet --seq-len 512 \
        --max-windows 4
"""

from mobiletune.runtime.side.config import SideConfig
from mobiletune.train.recipe import OptimConfig, Recipe

PLAYS = ["macbeth", "othello", "lear", "romeo_and_juliet", "julius_caesar", "tempest",
         "twelfth_night", "midsummer_nights_dream"]

recipe = Recipe(
    name="smollm2-shakespeare-side-cut",
    model="smollm2-135m",
    data=tuple(f"shakespeare:{p}" for p in PLAYS),
    val_data=("shakespeare:hamlet",),
    seq_len=128,
    bos_each_example=True,   # every window starts with BOS where the tokenizer has one (Gemma)
    micro_batch=4,
    steps=120,
    lora=None,
    side=SideConfig(cut=8, rank=8, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                    window=4),
    optim=OptimConfig(lr=1e-3, warmup_steps=10, schedule="cosine", weight_decay=0.0),
    checkpoint_every=20,
)
