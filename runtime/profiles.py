"""The two profiles of train.py's defaults (runtime/config.py fills a run's unset flags from one).

`CPU`: the tiny thinker on the synthetic world (docs/method.md, section 10), about 7.5 minutes
on 2 CPU cores. `REAL`: a 3B/7B Qwen2.5-Omni thinker with the recipe of docs/method.md, section 6.
"""

CPU = dict(
    frames=4,
    sft_steps=900,
    sft_batch=16,
    sft_lr=1e-3,
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
)
REAL = dict(
    frames=8,
    sft_epochs=3,
    sft_batch=64,
    sft_lr=1e-5,
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
)
