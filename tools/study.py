"""The CPU study: does OPPO raise utilization and faithfulness over GRPO, paired seed by seed?

    python -m tools.study               # SFT once, then GRPO, OPPO, OPPO+MG x 5 seeds, the tables
    python -m tools.study --variants GRPO,GRPO+OPR,GRPO+OPL,OPPO   # the ablation of OPPO's parts
    python -m tools.study --steps 2 --seeds 0 --sft_steps 4 --out runs/study_toy   # a toy run

One SFT cold start on the synthetic train split, then from that one checkpoint one RL run per
variant and seed with identical budgets, each evaluated by eval.py on the synthetic test split
with full, video-masked and audio-masked inputs, greedy and by K sampled completions (the
faithfulness of docs/method.md, section 7). Runs of the same seed index share the SFT
checkpoint, the data order and the sampling seed, so each variant is compared with GRPO seed by
seed (tools/study_table.py). Writes <out>/study.json (every run's headline metrics), <out>/table.md
(mean ± std over seeds, and the paired differences to GRPO with 95% intervals) and
<out>/study.png. Every run is a train.py subprocess, so each is exactly what a user can rerun.
"""

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from metrics import report
from tools import study_table

TRAIN = Path(__file__).resolve().parents[1] / "train.py"
# each RL variant: the train.py switches that make it
VARIANTS = {
    "GRPO": {"perception_reward": False, "perception_loss": False},
    "GRPO+OPR": {"perception_reward": True, "perception_loss": False},
    "GRPO+OPL": {"perception_reward": False, "perception_loss": True},
    "OPPO": {"perception_reward": True, "perception_loss": True},
    "OPPO+MG": {"perception_reward": True, "perception_loss": True, "masked_grad": True},
    "OPPO+MR": {"perception_reward": True, "perception_loss": True, "masked_rollouts": 4},
    "OPPO-rho1": {"perception_reward": True, "perception_loss": True, "rho": 1.0},
}
# the variants a study runs unless --variants says otherwise
DEFAULT_VARIANTS = ("GRPO", "OPPO", "OPPO+MG")


@dataclass
class Args:
    out: str = field(default="runs/study", metadata={"help": "output directory"})
    seeds: str = field(default="0,1,2,3,4", metadata={"help": "comma-separated RL seeds"})
    steps: int | None = field(
        default=None, metadata={"help": "RL steps per run (train.py's CPU default if unset)"}
    )
    sft_steps: int | None = field(
        default=None, metadata={"help": "SFT steps (train.py's CPU default if unset)"}
    )
    variants: str = field(
        default=",".join(DEFAULT_VARIANTS),
        metadata={"help": "comma-separated subset of " + ", ".join(VARIANTS)},
    )
    eval_limit: int = field(default=200, metadata={"help": "test clips evaluated per run"})
    train_args: str = field(
        default="", metadata={"help": "extra train.py arguments for every run, e.g. '--gamma 0.1'"}
    )
    jobs: int = field(default=2, metadata={"help": "RL runs at once, one thread each"})


def run(cmd, log, threads):
    """Run one train.py stage; its output goes to `log`, and a failure names that log."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log, "w") as f:
        finished = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if finished.returncode:
        raise SystemExit(f"study: `{' '.join(cmd)}` failed; see {log}")


def rl_command(common, variant, seed, init, run_dir, steps):
    """The train.py command of one RL run: `variant`'s switches from the SFT checkpoint `init`."""
    cmd = common + ["--stages", "oppo", "--init", str(init), "--out", str(run_dir), "--seed", seed]
    for switch, on in VARIANTS[variant].items():
        cmd += [f"--{switch}", str(on)]
    if steps is not None:
        cmd += ["--steps", str(steps)]
    return cmd


def main(argv=None):
    parser = HfArgumentParser(Args, description=__doc__.split("\n")[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    variants = args.variants.split(",")
    unknown = [variant for variant in variants if variant not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    out = Path(args.out)
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    common = [sys.executable, str(TRAIN), "--eval_limit", str(args.eval_limit)]
    common += args.train_args.split()

    sft = common + ["--stages", "sft", "--out", str(out / "sft"), "--resume"]
    if args.sft_steps is not None:
        sft += ["--sft_steps", str(args.sft_steps)]
    # resumable: a finished SFT stage is reused
    run(sft, out / "sft.log", threads=1)
    init = out / "sft" / "sft" / "final"

    seeds = args.seeds.split(",")
    runs = []
    for variant in variants:
        for seed in seeds:
            run_dir = out / f"{variant}_s{seed}"
            runs.append(
                (
                    variant,
                    seed,
                    run_dir,
                    rl_command(common, variant, seed, init, run_dir, args.steps),
                )
            )
    # a run that has its test report is done: only the others run (again)
    todo = [
        (cmd, run_dir) for *_, run_dir, cmd in runs if not (run_dir / "test_report.json").exists()
    ]
    cmds = [cmd for cmd, _ in todo]
    logs = [out / f"{run_dir.name}.log" for _, run_dir in todo]
    # each run is its own process on one thread; the pool's threads only wait for them
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(run, cmds, logs, [1] * len(todo)))

    sft_report = json.loads((out / "sft" / "test_report.json").read_text())
    study = {"SFT": headline(sft_report), "arms": {}}
    for variant, seed, run_dir, _ in runs:
        test_report = json.loads((run_dir / "test_report.json").read_text())
        study["arms"].setdefault(variant, {})[seed] = headline(test_report)
    study["settings"] = {"seeds": seeds, "steps": args.steps, "train_args": args.train_args}
    table = study_table.markdown(study, time.time() - t0)
    (out / "study.json").write_text(json.dumps(study, indent=1))
    (out / "table.md").write_text(table)
    study_table.plot(study, out / "study.png")
    print(table)


def headline(test_report):
    """A run's headline metrics (metrics/report.py's summary), and the absence faithfulness of
    each scenario held out of the training split, as "<metric>@<scenario>"."""
    metrics = report.summary(test_report)
    for scenario, keys in study_table.HELD_OUT.items():
        scores = test_report.get("per_scenario", {}).get(scenario, {}).get("metrics", {})
        for key in keys:
            metrics[f"{key}@{scenario}"] = scores.get(key)
    return metrics


if __name__ == "__main__":
    main()
