"""Run plumbing: the flags (config.py) and their profiles (profiles.py), processes and FSDP2
(parallel.py), the optimizer (optim.py), checkpoints and the export (checkpoint.py), the output
directory's lock and recorded arguments (rundir.py), what a run checks before its first step
(preflight.py), what it logs (logs.py) and its model FLOPs (flops.py)."""
