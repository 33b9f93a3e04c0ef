"""tools/study.py end to end at a toy size: SFT, the default RL variants, the table and the plot;
and the paired intervals of tools/study_table.py by hand."""

import json
import math

import pytest

from tools import study, study_table


def test_paired_differences_and_their_interval_by_hand():
    """Seed by seed differences to GRPO: mean, and mean ± t(0.975, n - 1) s / sqrt(n), with
    t(0.975, 4) = 2.776445; a seed without a value on either side is left out."""
    grpo = {str(s): {"F_visual": x} for s, x in enumerate([0.5, 0.6, 0.7, 0.4, 0.5])}
    oppo = {str(s): {"F_visual": x} for s, x in enumerate([0.6, 0.6, 0.9, 0.5, 0.8])}
    diffs = [0.1, 0.0, 0.2, 0.1, 0.3]
    mean = sum(diffs) / 5
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 4)
    half = 2.776445 * sd / math.sqrt(5)
    got = study_table.paired(oppo, grpo, "F_visual")
    assert got == pytest.approx((mean, mean - half, mean + half, 5), abs=1e-6)
    oppo["4"]["F_visual"] = None
    assert study_table.paired(oppo, grpo, "F_visual")[3] == 4
    assert study_table.paired({"0": {"F_visual": 1.0}}, grpo, "F_visual") == (None, None, None, 1)
    assert study_table.spread([0.2, None, 0.4]) == pytest.approx((0.3, math.sqrt(0.02), 2))


def test_study_pipeline_toy(tiny_dir, synth_dir, tmp_path):
    data = " ".join(
        f"--{k} {synth_dir / (s + '.jsonl')}"
        for k, s in (("data", "train"), ("val_data", "val"), ("test_data", "test"))
    )
    out = tmp_path / "study"
    study.main(
        [
            "--out",
            str(out),
            "--seeds",
            "0",
            "--steps",
            "1",
            "--sft_steps",
            "2",
            "--eval_limit",
            "3",
            "--train_args",
            f"--model {tiny_dir} --profile cpu {data} --batch 2 --G 2 --max_new_tokens 8 "
            "--sft_batch 2 --save_every 100",
        ]
    )
    result = json.loads((out / "study.json").read_text())
    assert list(result["arms"]) == list(study.DEFAULT_VARIANTS)
    for arm, runs in result["arms"].items():
        assert list(runs) == ["0"]
        assert set(study_table.COLUMNS) <= set(runs["0"])
        assert all(v is None or 0 <= v <= 1 for v in runs["0"].values())
    assert set(study_table.COLUMNS) <= set(result["SFT"])
    table = (out / "table.md").read_text()
    # SFT and each arm; the header of the paired table and each arm but GRPO; the header of
    # the held-out table, SFT and each arm
    arms = len(result["arms"])
    assert table.count("\n| ") == (1 + arms) + (1 + arms - 1) + (2 + arms)
    assert "F_absent_visual@no_face" in result["arms"]["OPPO"]["0"]
    assert "| OPPO |" in table and "Paired difference to GRPO" in table
    assert (out / "study.png").stat().st_size > 1000
    # the variants really differ in their switches: GRPO logs no perception loss, OPPO does
    grpo = json.loads((out / "GRPO_s0" / "oppo" / "log.jsonl").read_text().splitlines()[0])
    full = json.loads((out / "OPPO_s0" / "oppo" / "log.jsonl").read_text().splitlines()[0])
    assert "kl_visual" not in grpo and "kl_visual" in full
