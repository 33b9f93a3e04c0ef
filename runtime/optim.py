"""The optimizer of both stages: AdamW with a linear warm-up, and a step that never applies a
non-finite gradient (the recipe of docs/method.md, section 6)."""

import math

import torch

from runtime import parallel


def optimizer(policy, lr, weight_decay, warmup):
    """AdamW, and a schedule that warms the learning rate up linearly over `warmup` steps."""
    optim = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, warmup)

    def warmup_factor(step):
        return min(1.0, (step + 1) / warmup)

    return optim, torch.optim.lr_scheduler.LambdaLR(optim, warmup_factor)


def optimizer_step(policy, optim, sched, loss, grad_clip):
    """Clip the gradient norm and step, unless the loss or the norm is not finite: then the
    step's gradient is dropped and the weights stay. Returns (grad norm, finite)."""
    parallel.reshard_after_step(policy)
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), grad_clip)
    # a DTensor under FSDP2
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    grad_norm = float(grad_norm)
    # the same verdict on every rank
    global_loss = parallel.global_sum(loss)[0]
    finite = math.isfinite(grad_norm) and math.isfinite(global_loss)
    if finite:
        optim.step()
    optim.zero_grad(set_to_none=True)
    sched.step()
    return grad_norm, finite
