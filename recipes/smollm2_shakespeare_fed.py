"""SmolLM2-135M LoRA, federated over Shakespeare's speaking roles (LEAF-style: each client
is one role of the shipped plays; held out: each role's last speeches, and their union).

    mobiletune fed run recipes/smollm2_shakespeare_fed.py --clients 8 --rounds 5 --out runs/fed
    mobiletune fed run recipes/smollm2_shakespeare_fed.py --clients 8 --rounds 5 --out runs/prox \
        --set method=fedprox --set mu=0.01
    mobiletune fed run recipes/smollm2_shakespeare_fed.py --out runs/flex --set method=flexlora \
        --set ranks=4,8,8,16
"""

from mobiletune.fed.recipe import FedConfig
from mobiletune.train.recipe import LoraConfig, OptimConfig, Recipe

recipe = Recipe(
    name="smollm2-shakespeare-fed",
    model="smollm2-135m",
    data=("unused: each client's partition",),
    val_fraction=0.0,
    seq_len=64,
    micro_batch=2,
    accumulation=2,
    steps=1000,
    lora=LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=("q_proj", "v_proj")),
    optim=OptimConfig(lr=1e-3, warmup_steps=5, schedule="cosine", total_steps=1000),
)

fed = FedConfig(
    method="fedavg",
    clients=8,
    rounds=5,
    local_steps=5,
    partition="shakespeare-roles",
    sharded=True,
    variants=(1, 2),
    eval_max_examples=48,
    mc_items=40,
)
