"""SmolLM2-135M server-assisted side-tuning on Shakespeare, with the side network as a copy
of the top layers: the phone runs layers 0-7 of the frozen model forward and sends their
output h_8 (fp32); the server trains a LoRA adapter (r 8 on q, k, v, o and lr 1e-3, as the
on-device LoRA recipe) on its own copy of layers 8-29. Everything else — data, held-out
play, batch, steps — is the ladder recipe's (``smollm2_shakespeare_side.py``), which leaves
every layer as it is and trails on-device LoRA by ~12 % in held-out perplexity; this one
reaches it (README, "Measured").

    mobiletune export recipes/smollm2_shakespeare_side_cut.py --side --out cut.bundle
    mobiletune side serve recipes/smollm2_shakespeare_side_cut.py --out server --token-file token
    mobiletune device side-train cut.bundle --data plays.txt --server http://127.0.0.1:8470 \
        --token-file token --out run
    mobiletune ppl --model smollm2-135m --side run --text shakespeare:hamlet --seq-len 512 \
        --max-windows 4
"""

import dataclasses
from pathlib import Path

from mobiletune.runtime.side.config import SideConfig
from mobiletune.train.recipe import OptimConfig, load_recipe

ladder = load_recipe(Path(__file__).with_name("smollm2_shakespeare_side.py"))

recipe = dataclasses.replace(
    ladder,
    name="smollm2-shakespeare-side-cut",
    side=SideConfig(cut=8, rank=8, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                    window=4),
    optim=OptimConfig(lr=1e-3, warmup_steps=10, schedule="cosine", weight_decay=0.0),
)
