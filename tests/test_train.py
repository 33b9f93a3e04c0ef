"""train.py: SFT and OPPO steps, 2-process FSDP2, the export, non-finite losses.

The runs `ref` and `fsdp` come from train_runs.py (shared with test_resume.py); `nan_run` is
an in-process SFT with a NaN injected into one step; fsdp_train_worker.py computes the
gradients of batches where a rank lacks video or audio.
"""

import math
import re

import pytest
import torch
from train_runs import (
    OPPO_STEPS,
    ROOT,
    SFT_STEPS,
    changed,
    dcp_state,
    finish,
    logits,
    read_log,
    run_args,
    run_inprocess,
    start,
    state,
    steps,
    torchrun,
)

import train
from runtime import checkpoint
from thinker import model

pytest_plugins = ["train_runs"]
# DCP read and written in one process
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


# ---------------------------------------------------------------- 1. SFT and OPPO steps, logs
def test_sft_lowers_the_loss_and_changes_the_parameters(ref, tiny_dir):
    lines = read_log(ref / "sft" / "log.jsonl")
    # --eval_every: validation through eval.py
    evals = [ln for ln in lines if "eval" in ln]
    assert [ln["step"] for ln in evals] == [SFT_STEPS]
    assert {"war", "uar", "U", "F"} <= evals[0]["eval"].keys()
    lines = steps(lines)
    assert [ln["step"] for ln in lines] == list(range(1, SFT_STEPS + 1))
    for ln in lines:
        assert {
            "loss",
            "tokens",
            "grad_norm",
            "lr",
            "skipped",
            "time/step",
            "tokens_per_s",
            "flops_per_s",
        } <= ln.keys()
        assert ln["skipped"] is False and math.isfinite(ln["loss"])
        assert ln["lr"] == pytest.approx(1e-2)
    loss = [ln["loss"] for ln in lines]
    assert sum(loss[-2:]) / 2 < loss[0] - 0.5, loss
    init, sft = state(tiny_dir), state(ref / "sft" / "final")
    diff = changed(init, sft)
    assert len(diff) > 0.9 * len(init), f"only {len(diff)} of {len(init)} tensors moved"
    assert all(k in diff for k in ("lm_head.weight", "model.language_model.embed_tokens.weight"))


def test_oppo_steps_log_every_metric_and_change_the_parameters(ref):
    lines = steps(read_log(ref / "oppo" / "log.jsonl"))
    assert [ln["step"] for ln in lines] == list(range(1, OPPO_STEPS + 1))
    want = {
        "loss",
        "pg_loss",
        "op_loss",
        "kl",
        "kl_visual",
        "kl_acoustic",
        "entropy",
        "ratio_mean",
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "advantages/mean",
        "rewards/total",
        "rewards/acc",
        "rewards/fmt",
        "rewards/op",
        "rewards/op_visual",
        "rewards/op_acoustic",
        "rewards/op_emotion",
        "completion_length",
        "grad_norm",
        "lr",
        "skipped",
        "time/rollout",
        "time/reward",
        "time/masked",
        "time/update",
        "time/rollout_generate",
        "masked_rows",
        "time/step",
        "tokens_per_s",
        "flops_per_s",
        "sample",
    }
    for ln in lines:
        assert want <= ln.keys(), want - ln.keys()
        assert ln["skipped"] is False and isinstance(ln["sample"], str)
        assert all(math.isfinite(v) for v in ln.values() if isinstance(v, float))
        # one update per rollout: the ratio is exactly 1, whatever the micro-batching
        assert ln["ratio_mean"] == pytest.approx(1.0)
        # the perception loss ran
        assert ln["op_loss"] != 0 and ln["flops_per_s"] > 0
        assert ln["loss"] == pytest.approx(ln["pg_loss"] + ln["op_loss"], rel=1e-4, abs=1e-6)
    diff = changed(state(ref / "sft" / "final"), state(ref / "oppo" / "final"))
    assert len(diff) > 0.5 * len(state(ref / "sft" / "final")), diff
    assert (ref / "test_report.json").exists()


def test_each_log_line_has_the_lr_its_step_used_and_an_int_step(
    tiny_dir, synth_dir, matcher, tmp_path
):
    """A 2-step warm-up: step 1 runs at half the learning rate, step 2 at all of it."""
    kw = dict(stages="sft", sft_steps=2, warmup=2, eval_every=0, eval_limit=1)
    run_inprocess(matcher, **run_args(tiny_dir, synth_dir, tmp_path, **kw))
    lines = read_log(tmp_path / "sft" / "log.jsonl")
    assert [ln["step"] for ln in lines] == [1, 2]
    assert all(isinstance(ln["step"], int) for ln in lines)
    assert [ln["lr"] for ln in lines] == pytest.approx([5e-3, 1e-2])


# ---------------------------------------------------------------- 2. two processes, FSDP2
def test_no_test_binds_a_fixed_port():
    """A fixed --master_port collides with any other run on the machine: a free one each time
    (train_runs.free_port)."""
    fixed = re.compile(r"master_port=\d")
    tests = sorted((ROOT / "tests").glob("*.py"))
    assert [path.name for path in tests if fixed.search(path.read_text())] == []


def test_two_fsdp_processes_give_the_one_process_sft_losses(ref, fsdp):
    one = steps(read_log(ref / "sft" / "log.jsonl"))
    two = steps(read_log(fsdp / "sft" / "log.jsonl"))
    assert [ln["step"] for ln in two] == list(range(1, SFT_STEPS + 1))
    for key in ("loss", "grad_norm", "tokens"):
        torch.testing.assert_close(
            torch.tensor([ln[key] for ln in two]),
            torch.tensor([ln[key] for ln in one]),
            rtol=1e-4,
            atol=1e-4,
            msg=key,
        )
    # the weights too (Adam at lr 1e-2: a wrong gradient moves a tensor by ~1e-2 a step)
    one, two = state(ref / "sft" / "final"), state(fsdp / "sft" / "final")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-3, msg=k)


def test_fsdp_gradients_when_a_rank_lacks_a_medium(tiny_dir, synth_dir, tmp_path):
    """A rank whose clips have no video (or no audio) must still run that tower, or the ranks'
    FSDP2 collectives pair up wrongly (a hang): the gradients must equal the 1-process ones."""
    two, one = tmp_path / "two.pt", tmp_path / "one.pt"
    worker = ROOT / "tests" / "fsdp_train_worker.py"
    procs = [torchrun(worker, tiny_dir, synth_dir, two), start(worker, tiny_dir, synth_dir, one)]
    for proc in procs:
        finish(proc, timeout=200)
    two, one = torch.load(two), torch.load(one)
    assert set(one) == {"rank0_no_video", "rank0_no_audio", "no_video_and_no_audio"}
    for case in one:
        assert two[case]["loss"] == pytest.approx(one[case]["loss"], rel=1e-5)
        g1, g2 = one[case]["grads"], two[case]["grads"]
        assert [k for k in g1 if g1[k] is not None] == [k for k in g2 if g2[k] is not None], case
        for k in g1:
            if g1[k] is not None:
                torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-6, msg=f"{case}: {k}")
    assert math.isfinite(two["oppo"]["loss"]) and math.isfinite(two["oppo"]["grad_norm"])


def test_two_fsdp_processes_run_oppo(fsdp):
    lines = steps(read_log(fsdp / "oppo" / "log.jsonl"))
    assert [ln["step"] for ln in lines] == list(range(1, OPPO_STEPS + 1))
    for ln in lines:
        assert not ln["skipped"] and ln["ratio_mean"] == pytest.approx(1.0)
        # the loss is the global one (each rank's share times the ranks), the parts the mean of
        # the ranks'
        assert ln["loss"] == pytest.approx(ln["pg_loss"] + ln["op_loss"], rel=0.1)
        # B x G = 4 rows over both ranks
        assert ln["tokens"] == pytest.approx(4 * ln["completion_length"])
    assert changed(state(fsdp / "sft" / "final"), state(fsdp / "oppo" / "final"))


# ---------------------------------------------------------------- 3. the export
def test_export_equals_the_sharded_checkpoint(ref, fsdp, batch):
    """The final DCP checkpoint holds the trained weights (every rank's shard, for FSDP); the
    Hugging Face export must load through load_policy to exactly those, with the same logits."""
    for out in (ref, fsdp):
        final = out / "sft" / "final"
        assert checkpoint.latest(out / "sft" / "ckpt").name == f"step_{SFT_STEPS:07d}"
        trained, exported = dcp_state(out / "sft" / "ckpt", final), state(final)
        assert not changed(trained, exported)
        policy = model.load_policy(final)[0]
        policy.load_state_dict(trained)
        assert torch.equal(logits(policy, batch), logits(final, batch))


# ---------------------------------------------------------------- 4. non-finite losses
@pytest.fixture(scope="module")
def nan_run(tiny_dir, synth_dir, matcher, batch, tmp_path_factory):
    """SFT 3 steps, the log-probs of step 2 made NaN; records the weights around it and the logits
    of the in-memory model at export."""
    out, seen = tmp_path_factory.mktemp("nan"), {"calls": 0, "weights": []}
    logprobs, sft_step, export = train.scoring.logprobs, train.sft_step, train.checkpoint.export

    def nan_logprobs(*args, **kwargs):
        seen["calls"] += 1
        logp = logprobs(*args, **kwargs)
        if seen["calls"] == 2:
            return logp * float("nan")
        return logp

    def recording_sft_step(args, policy, *a):
        seen["weights"].append({k: v.detach().clone() for k, v in policy.state_dict().items()})
        return sft_step(args, policy, *a)

    def recording_export(policy, processor, out_dir):
        seen["weights"].append({k: v.detach().clone() for k, v in policy.state_dict().items()})
        seen["logits"] = logits(policy, batch)
        return export(policy, processor, out_dir)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train.scoring, "logprobs", nan_logprobs)
        mp.setattr(train, "sft_step", recording_sft_step)
        mp.setattr(train.checkpoint, "export", recording_export)
        run_inprocess(
            matcher,
            **run_args(
                tiny_dir, synth_dir, out, stages="sft", sft_steps=3, save_every=100, eval_limit=1
            ),
        )
    return out, seen


def test_a_nan_loss_skips_the_step(nan_run):
    out, seen = nan_run
    # strict JSON even with a NaN loss
    lines = read_log(out / "sft" / "log.jsonl")
    assert [ln["skipped"] for ln in lines] == [False, True, False]
    assert lines[1]["loss"] == "nan" and lines[1]["grad_norm"] == "nan"
    assert math.isfinite(lines[2]["loss"])
    # the weights before steps 2 and 3, and at the export
    before, after, final = seen["weights"][1], seen["weights"][2], seen["weights"][3]
    # the NaN step wrote nothing
    assert not changed(before, after)
    assert changed(after, final) and all(torch.isfinite(v).all() for v in final.values())


def test_export_reloads_with_the_in_memory_logits(nan_run, batch, tiny_dir):
    out, seen = nan_run
    final = out / "sft" / "final"
    assert not changed(seen["weights"][3], state(final))
    assert torch.equal(logits(final, batch), seen["logits"])
    # trained: not the initial model
    assert not torch.equal(logits(tiny_dir, batch), seen["logits"])
