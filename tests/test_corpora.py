"""The corpus converters (corpora/*.py) on small corpora in their published layouts
(tests/corpus_layouts.py): each manifest passes data.py --check and trains with train.py on the
tiny thinker; MAFW's 11 classes train and evaluate without folding; label-only data refuses the
stages that need reasoning or cues, naming the count and the flag that accepts it."""

import json

import pytest
from corpus_layouts import DFEW_ROWS, MAFW_ROWS, dfew, emer, mafw, mer2023, merr
from train_runs import read_log, run_args, run_inprocess, steps

import data
import eval as E
from corpora import dfew as dfew_converter
from corpora import emer as emer_converter
from corpora import mafw as mafw_converter
from corpora import mer as mer_converter
from runtime import config
from runtime.run_flags import parse_args

pytest_plugins = ["train_runs"]
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{corpus: output folder} of every converter run on its layout."""
    root = tmp_path_factory.mktemp("corpora")
    for name, write in [("MAFW", mafw), ("DFEW", dfew), ("MER", mer2023), ("EMER", emer)]:
        write(root / name)
    merr(root / "MERR")
    out = {name: root / "out" / name for name in ("mafw", "dfew", "mer", "emer", "merr")}
    mafw_converter.main(["--root", str(root / "MAFW"), "--out", str(out["mafw"]), "--captions"])
    dfew_converter.main(["--root", str(root / "DFEW"), "--out", str(out["dfew"])])
    mer_converter.main(["--root", str(root / "MER"), "--out", str(out["mer"])])
    emer_args = ["--annotations", str(root / "EMER" / "gt-eng.csv")]
    emer_args += ["--clips", str(root / "EMER" / "train"), "--holdout", "0.5"]
    emer_converter.main([*emer_args, "--out", str(out["emer"])])
    merr_args = ["--annotations", str(root / "MERR" / "MERR_fine_grained.json")]
    merr_args += ["--clips", str(root / "MERR" / "video"), "--out", str(out["merr"])]
    emer_converter.main(merr_args)
    return out


def records(folder, split):
    return [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]


def test_each_manifest_passes_the_check_with_the_fields_its_corpus_gives(converted):
    for name, folder in converted.items():
        for split in ("train", "test"):
            if (folder / f"{split}.jsonl").exists():
                # SystemExit(1) when any line or clip fails
                data.main(["--check", str(folder / f"{split}.jsonl")])
    mafw_train = records(converted["mafw"], "train")
    assert [r["label"] for r in mafw_train] == [label for _, label in MAFW_ROWS["train"]]
    assert all("frowns" in r["reasoning"] for r in mafw_train)
    dfew_test = records(converted["dfew"], "test")
    # DFEW's 7 is fear, 2 sad; ids keep their five digits
    assert [(r["id"], r["label"]) for r in dfew_test] == [("00004", "fear"), ("00005", "sad")]
    assert len(records(converted["dfew"], "train")) == len(DFEW_ROWS["train"])
    mer_test = records(converted["mer"], "test")
    assert mer_test[0]["subtitle"] == "I said 3 things." and mer_test[0]["valence"] == -3.0
    merr_train = records(converted["merr"], "train")
    # MERR's clue fields become cues; fear and worried stay two classes
    assert merr_train[0]["cues"]["visual"] == ["Brow Lowerer", "Lip Corner Depressor"]
    assert merr_train[0]["cues"]["acoustic"][0] == "The voice trembles"
    assert {r["label"] for r in merr_train} == {"fear", "worried", "doubt", "happy"}
    names = {k: json.loads((f / "labels.json").read_text())["name"] for k, f in converted.items()}
    assert names["mafw"] == "MAFW (11 classes)" and names["merr"] == "MERR (9 classes)"
    assert names["emer"] == "MER (6 classes)" and names["dfew"] == "DFEW (7 classes)"


def test_clips_missing_on_disk_are_left_out_and_named(tmp_path, capsys):
    dfew(tmp_path / "DFEW")
    (tmp_path / "DFEW" / "Clip" / "original" / "00002.mp4").unlink()
    dfew_converter.main(["--root", str(tmp_path / "DFEW"), "--out", str(tmp_path / "out")])
    assert len(records(tmp_path / "out", "train")) == len(DFEW_ROWS["train"]) - 1
    assert "1 clips not found, left out:" in capsys.readouterr().out


def corpus_run(tiny_dir, folder, out, **over):
    kw = run_args(tiny_dir, folder, out, sft_steps=2, steps=1, eval_every=0, eval_limit=0)
    kw.update(data=f"{folder}/train.jsonl", test_data=f"{folder}/test.jsonl", val_data="")
    return {**kw, **over}


def test_an_11_class_run_trains_and_evaluates_without_folding(
    converted, tiny_dir, matcher, tmp_path, capsys
):
    out = tmp_path / "mafw_run"
    kw = corpus_run(tiny_dir, converted["mafw"], out, tensorboard=True, log_samples=2)
    run_inprocess(matcher, **kw)
    report = json.loads((out / "test_report.json").read_text())
    assert report["settings"]["labels"] == "MAFW (11 classes)"
    # both classes of the test split are scored apart (the built-in space folds them into one)
    assert set(report["recall"]) == {"fear", "anxiety"}
    saved = json.loads((out / "oppo" / "args.json").read_text())
    assert saved["labels"] == str(converted["mafw"] / "labels.json")
    # every OPPO step logs its first two completions with their reward parts
    samples = read_log(out / "oppo" / "samples.jsonl")
    assert [s["step"] for s in samples] == [1, 1]
    assert {"id", "completion", "reward", "acc", "fmt", "op"} <= samples[0].keys()
    assert samples[0]["id"] in {r["id"] for r in records(converted["mafw"], "train")}
    assert "samples" not in steps(read_log(out / "oppo" / "log.jsonl"))[0]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(out / "oppo" / "tensorboard"))
    board.Reload()
    assert [e.step for e in board.Scalars("rewards/acc")] == [1]
    # eval.py on the export reads the run's settings; a flag given wins
    capsys.readouterr()
    E.main(
        [
            "--model",
            str(out / "oppo" / "final"),
            "--data",
            kw["test_data"],
            "--out",
            str(out / "e.json"),
        ]
    )
    settings = json.loads((out / "e.json").read_text())["settings"]
    assert (settings["frames"], settings["max_new_tokens"]) == (4, kw["max_new_tokens"])
    assert settings["labels"] == "MAFW (11 classes)" and "args.json" in capsys.readouterr().out
    E.main(
        [
            "--model",
            str(out / "oppo" / "final"),
            "--data",
            kw["test_data"],
            "--out",
            str(out / "e.json"),
            "--max_new_tokens",
            "3",
        ]
    )
    assert json.loads((out / "e.json").read_text())["settings"]["max_new_tokens"] == 3
    # the stage's args.json is a config file: every flag back, the command line over it
    again = parse_args(config.Args, ["--config", str(out / "oppo" / "args.json"), "--seed", "5"])
    assert again.seed == 5 and again.labels == saved["labels"] and again.G == saved["G"]


def test_label_only_data_refuses_the_stages_that_need_more(converted, tiny_dir, matcher, tmp_path):
    folder = converted["dfew"]
    for stages, lacking in (("oppo", "has cues"), ("sft", "has a reasoning")):
        with pytest.raises(SystemExit) as refused:
            run_inprocess(matcher, **corpus_run(tiny_dir, folder, tmp_path / stages, stages=stages))
        message = str(refused.value)
        assert f"none of its {len(DFEW_ROWS['train'])} records {lacking}" in message
        assert "--allow_label_only" in message
    # plain GRPO needs no cues; SFT accepts empty think blocks when told
    grpo = dict(stages="oppo", perception_reward=False, perception_loss=False)
    run_inprocess(matcher, **corpus_run(tiny_dir, folder, tmp_path / "grpo", **grpo))
    assert len(steps(read_log(tmp_path / "grpo" / "oppo" / "log.jsonl"))) == 1
    kw = corpus_run(
        tiny_dir, converted["mer"], tmp_path / "mer", stages="sft", allow_label_only=True
    )
    run_inprocess(matcher, **kw)
    assert len(steps(read_log(tmp_path / "mer" / "sft" / "log.jsonl"))) == 2


def test_reasoning_corpora_train_sft_then_oppo(converted, tiny_dir, matcher, tmp_path):
    for name in ("emer", "merr"):
        folder = converted[name]
        if not (folder / "test.jsonl").exists():
            # MERR has no test split without --holdout: its train clips stand in
            (folder / "test.jsonl").write_text((folder / "train.jsonl").read_text())
        run_inprocess(matcher, **corpus_run(tiny_dir, folder, tmp_path / name))
        lines = steps(read_log(tmp_path / name / "oppo" / "log.jsonl"))
        assert len(lines) == 1 and lines[0]["masked_rows"] >= 0
        assert (tmp_path / name / "test_report.json").exists()


def test_sft_epochs_set_the_steps_from_the_train_manifest_size(
    converted, tiny_dir, matcher, tmp_path
):
    # 4 MAFW train records, 4 clips a step: 1.5 epochs is ceil(1.5 x 4 / 4) = 2 steps
    kw = corpus_run(tiny_dir, converted["mafw"], tmp_path, stages="sft", sft_steps=None)
    run_inprocess(matcher, **{**kw, "sft_epochs": 1.5, "sft_batch": 4})
    assert [ln["step"] for ln in steps(read_log(tmp_path / "sft" / "log.jsonl"))] == [1, 2]
    saved = json.loads((tmp_path / "sft" / "args.json").read_text())
    assert (saved["sft_steps"], saved["sft_epochs"]) == (2, 1.5)
