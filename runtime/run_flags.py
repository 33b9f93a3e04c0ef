"""train.py's flags for what a run reads and writes beside the method, and its config file.

config.Args inherits these: the label space (--labels), what a stage accepts of data without
reasoning or cues (--allow_label_only), SFT's length in epochs (--sft_epochs), TensorBoard and
the sampled-completions log (--tensorboard, --log_samples), what is evaluated (--eval_every,
--eval_limit: by default the final test covers every test clip; --eval_samples), and --config:
a JSON object of flags, such as a stage's `<out>/<stage>/args.json` (every flag of the run as the
stage started), read as defaults that the command line overrides.

    python train.py --config runs/oppo/oppo/args.json --out runs/again --seed 1
"""

import argparse
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from transformers import HfArgumentParser


@dataclass
class RunFlags:
    labels: str = field(
        default="",
        metadata={
            "help": "label space file (corpora/labels.py: classes, synonyms) of the accuracy "
            "reward, the SFT targets and every metric; empty: labels.json beside --data when "
            "there is one (the converters write it), else the built-in six-label space",
            "metavar": "FILE",
        },
    )
    allow_label_only: bool = field(
        default=False,
        metadata={
            "help": "train a stage on records that give it nothing to act on: SFT with no "
            "reasoning in any record (an empty think block), OPPO's perception reward or loss "
            "with no cues in any record (R_op and L_op stay 0); refused without it"
        },
    )
    sft_epochs: float = field(
        default=None,
        metadata={
            "help": "SFT length in passes over --data: ceil(epochs x records / sft_batch) steps "
            "(real profile: 3); --sft_steps sets the steps instead (cpu profile: 900)"
        },
    )
    tensorboard: bool = field(
        default=False,
        metadata={"help": "also write every logged number to <out>/<stage>/tensorboard"},
    )
    log_samples: int = field(
        default=4,
        metadata={
            "help": "sampled completions of each OPPO step written to <out>/oppo/samples.jsonl "
            "(clip id, completion, every reward part); 0: none"
        },
    )
    eval_every: int = field(
        default=0,
        metadata={"help": "steps between validation evaluations (0: only at the end)"},
    )
    eval_limit: int = field(
        default=0, metadata={"help": "validation/test clips evaluated, the first N (0: all)"}
    )
    eval_samples: int = field(
        default=4,
        metadata={
            "help": "K, completions the evaluation samples per clip and input (at --temperature) "
            "beside the greedy one, for faithfulness (docs/method.md, section 7); 0: greedy only"
        },
    )
    config: str = field(
        default="",
        metadata={
            "help": "JSON file of flags (a stage's args.json) read as defaults; the command "
            "line overrides them",
            "metavar": "FILE",
        },
    )


def sft_steps(args, records):
    """The SFT step count: --sft_steps when set, else ceil(--sft_epochs x records / sft_batch)
    (at least 1)."""
    if args.sft_steps is not None:
        return args.sft_steps
    return max(1, math.ceil(args.sft_epochs * records / args.sft_batch))


def read_config(path, names):
    """{flag: value} of a config file; SystemExit naming the file and any unknown flag."""
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"train.py: --config {path}: cannot be read as JSON ({err})") from None
    if not isinstance(values, dict):
        raise SystemExit(f"train.py: --config {path}: expected a JSON object of flags")
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise SystemExit(f"train.py: --config {path}: unknown flags {', '.join(unknown)}")
    values.pop("config", None)
    return values


def parse_args(args_class, argv=None):
    """The flags of `args_class` from the command line, over the defaults of --config."""
    parser = HfArgumentParser(args_class)
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--config", default="")
    known, _ = early.parse_known_args(argv)
    if known.config:
        names = [f.name for f in fields(args_class)]
        parser.set_defaults(**read_config(known.config, names))
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return args
