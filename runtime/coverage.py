"""What a run's data gives each stage, checked before the first step: the label space the labels
are read in, and the records that lack a reasoning or cues.

- `label_space`: --labels, else the labels.json a converter wrote beside --data (and --labels
  is set to it, so args.json records it), else the built-in six-label space; printed.
- `refusal`: SFT trains on the reference reasoning, so a train manifest where no record has one
  would train an empty think block (which the format reward scores 0); OPPO's Omni-Perception
  Reward and Loss act on cues, so with the perception reward or loss on and no record with a cue
  they stay 0 and OPPO is GRPO. Either refuses the run, with the count and --allow_label_only;
  a manifest where only some records lack them is printed, not refused.
"""

import data
from corpora import labels
from data import DataError, coverage
from runtime import rundir


def label_space(args):
    """The run's LabelSpace (data.label_space); SystemExit naming --labels when its file is not
    one."""
    try:
        space = data.label_space(args.labels, args.data)
    except DataError as err:
        rundir.refuse(f"--labels: {err}")
    if space is labels.BUILTIN:
        print("train.py: label space: built-in (six synthetic labels; no --labels)")
        return space
    where = "" if args.labels else ", beside --data"
    args.labels = space.source
    classes = len(space.classes) or "open"
    print(f"train.py: label space: {space.name} ({classes} classes) from {space.source}{where}")
    return space


def refusal(args, train):
    """Why the run's stages cannot train on the train manifest `train`, or None; prints how many
    of its records lack a reasoning or cues."""
    counts = coverage(train)
    n = counts["records"]
    print(
        f"train.py: --data {args.data}: {counts['no_reasoning']} of {n} records without "
        f"reasoning, {counts['no_cues']} without cues"
    )
    stages = args.stages.split(",")
    perception = args.perception_reward or args.perception_loss
    if args.allow_label_only:
        return None
    if "sft" in stages and counts["no_reasoning"] == n:
        return (
            f"--data {args.data}: none of its {n} records has a reasoning, so SFT would train "
            "an empty think block (the format reward scores it 0). Train on a corpus with "
            "reasoning (EMER, MERR, MER-Caption+; docs/method.md, section 8), or accept it with "
            "--allow_label_only"
        )
    if "oppo" in stages and perception and counts["no_cues"] == n:
        return (
            f"--data {args.data}: none of its {n} records has cues (or a reasoning to decompose "
            "them from), so the Omni-Perception Reward and Loss stay 0 and OPPO is GRPO. Give "
            "cues (docs/method.md, section 8), train GRPO with --perception_reward False "
            "--perception_loss False, or accept it with --allow_label_only"
        )
    return None
