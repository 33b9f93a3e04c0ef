"""The project's own options that are not in the paper, each off by default: Eq. (10) in form
(b), the masked branch trained (masked_grad.py, `--masked_grad`), and completions sampled under
masked inputs with their claims penalised (masked_rollout.py, `--masked_rollouts`)."""
