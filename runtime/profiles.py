"""The cpu and real profiles: the values of train.py's flags left unset (runtime/config.py).

`cpu` runs the tiny thinker on the synthetic world in one process (docs/method.md, section 10);
`real` runs a 3B/7B Qwen2.5-Omni thinker on 8 GPUs with the recipe of docs/method.md, section 6,
and the memory settings the 7B run fits with (docs/performance.md).
"""

CPU = dict(
    frames=4,
    sft_steps=900,
    sft_batch=16,
    sft_lr=1e-3,
    sft_micro_batch=0,
    steps=120,
    batch=4,
    lr=1e-4,
    warmup=30,
    max_new_tokens=96,
    micro_batch=4,
    beta=0.0,
    gamma=0.02,
    eta=0.03,
    cache_inputs=True,
    activation_checkpointing=False,
)
REAL = dict(
    frames=8,
    sft_epochs=3,
    sft_batch=64,
    sft_lr=1e-5,
    sft_micro_batch=1,
    steps=500,
    batch=64,
    lr=1e-6,
    warmup=10,
    max_new_tokens=512,
    micro_batch=1,
    beta=0.04,
    gamma=0.02,
    eta=0.03,
    cache_inputs=False,
    activation_checkpointing=True,
)
