"""tools/study.py end to end at a toy size: SFT, the default RL variants, the table and the plot."""

import json

from tools import study


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
    rows = json.loads((out / "study.json").read_text())
    assert list(rows) == ["SFT", *study.DEFAULT_VARIANTS]
    for name, row in rows.items():
        assert set(row) == set(study.COLUMNS) and all(
            0 <= m <= 1 and s == 0 for m, s in row.values()
        )
    table = (out / "table.md").read_text()
    assert table.count("\n| ") == len(rows) and "OPPO" in table  # one line per run after the header
    assert (out / "study.png").stat().st_size > 1000
    # the variants really differ in their switches: GRPO logs no perception loss, OPPO does
    grpo = json.loads((out / "GRPO_s0" / "oppo" / "log.jsonl").read_text().splitlines()[0])
    full = json.loads((out / "OPPO_s0" / "oppo" / "log.jsonl").read_text().splitlines()[0])
    assert "kl_visual" not in grpo and "kl_visual" in full
