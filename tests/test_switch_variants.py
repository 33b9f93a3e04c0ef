"""The faithfulness switches in the tools: tools/study.py's variants (GRPO's and OPPO's commands
as they always were, the two switches as train.py parses them, the default list, an unknown
variant named) and tools/bench.py's switch configurations."""

from dataclasses import replace
from pathlib import Path

import pytest
from transformers import HfArgumentParser

from runtime import config
from tools import bench, study

COMMON = ["python", "train.py", "--eval_limit", "200"]


def command(variant, steps=None):
    run_dir = Path("runs/study") / f"{variant}_s1"
    return study.rl_command(COMMON, variant, "1", Path("sft/final"), run_dir, steps)


def test_grpo_and_oppo_commands_are_unchanged():
    head = COMMON + ["--stages", "oppo", "--init", "sft/final", "--out"]
    assert command("GRPO") == head + [
        "runs/study/GRPO_s1",
        "--seed",
        "1",
        "--perception_reward",
        "False",
        "--perception_loss",
        "False",
    ]
    assert command("OPPO", steps=60) == head + [
        "runs/study/OPPO_s1",
        "--seed",
        "1",
        "--perception_reward",
        "True",
        "--perception_loss",
        "True",
        "--steps",
        "60",
    ]


def test_switch_variants_parse_as_train_py_flags():
    parser = HfArgumentParser(config.Args)
    parsed = {}
    for variant in study.VARIANTS:
        (parsed[variant],) = parser.parse_args_into_dataclasses(args=command(variant)[2:])
    assert parsed["OPPO+MG"].masked_grad and not parsed["OPPO"].masked_grad
    assert parsed["OPPO+MR"].masked_rollouts == 4 and parsed["OPPO"].masked_rollouts == 0
    assert parsed["OPPO+MR"].perception_loss and parsed["OPPO+MR"].perception_reward
    assert parsed["OPPO-rho1"].rho == 1.0 and parsed["OPPO"].rho == config.Args().rho
    assert study.Args().variants.split(",") == ["GRPO", "OPPO", "OPPO+MG"]
    assert {"GRPO+OPR", "GRPO+OPL"} <= set(study.VARIANTS)


def test_an_unknown_variant_is_named(tmp_path, capsys):
    # before any run: were one started, train.py would stop at once on the bad flag
    argv = ["--out", str(tmp_path), "--variants", "GRPO,OPPO+XX", "--train_args=--bad_flag"]
    with pytest.raises(SystemExit):
        study.main(argv)
    assert "OPPO+XX" in capsys.readouterr().err


def test_bench_switch_configs_are_train_flags():
    args = config.Args()
    switched = {}
    for name, over in bench.SWITCH_CONFIGS.items():
        # every_token is the harness's own switch (tools/harness.timed_step)
        fields = {key: value for key, value in over.items() if key != "every_token"}
        switched[name] = replace(args, **fields)
    assert switched["oppo_masked_grad"].masked_grad and switched["oppo"] == args
    assert switched["oppo_masked_rollouts"].masked_rollouts == 4
    assert not switched["grpo"].perception_loss and not switched["grpo"].perception_reward
    assert "switches" in bench.Args().only.split(",")
