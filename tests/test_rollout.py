"""rollout.py: sampling, scoring passes, determinism, and the 2-process FSDP2 rollout."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_runs import free_port

import data
import rollout
from thinker import batching, encoders, model, scoring
from thinker.media import load_media

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tiny_dir, synth_dir):
    policy, processor = model.load_policy(tiny_dir)
    recs = data.load_manifest(synth_dir / "train.jsonl")
    # clips with both modalities around one without audio: masking audio must not matter for it,
    # and micro-batches must take each row's own audio, not the batch's first ones
    both = [r for r in recs if r.get("video") and r.get("audio")]
    no_audio = next(r for r in recs if r.get("video") and not r.get("audio"))
    batch = [both[0], no_audio, both[1]]
    media = batching.encode(processor, batch, [load_media(r, 4) for r in batch])
    return policy, processor, batch, media


def shared(policy, media, G):
    """The rollout's inputs: each tower and the rotary positions once per clip, shared by its G
    rows."""
    with torch.no_grad():
        return scoring.expand(
            media,
            G,
            encoders.encode_video(policy, media),
            encoders.encode_audio(policy, media),
            scoring.positions(policy, media),
        )


def test_logprobs_equal_a_plain_forward(setup):
    """Shared video and audio features and rotary positions + LM head on completion positions
    only == the naive full forward, where the thinker encodes each row's video and audio and
    builds its positions."""
    policy, processor, _, media = setup
    G, C = 2, 7
    # no media tokens
    first = len(processor.tokenizer.all_special_ids) + 10
    ids = torch.randint(first, len(processor.tokenizer), (3 * G, C))
    inputs = shared(policy, media, G)
    # 2 clips with audio
    assert "input_features" not in inputs and len(inputs["audio_features"]) == 2 * G
    with torch.no_grad():
        # (N, C), rows split inside clips
        got = scoring.logprobs(policy, inputs, ids, micro_batch=3)
        plain = {k: v for k, v in media.items() if k not in ("pixel_values_videos",)}
        # text and audio rows repeated, video re-encoded per row below
        plain = scoring.expand(plain, G)
        per_clip = media["pixel_values_videos"].chunk(3)
        plain["pixel_values_videos"] = torch.cat([per_clip[i // G] for i in range(3 * G)])
        plain["video_grid_thw"] = media["video_grid_thw"].repeat_interleave(G, 0)
        plain["video_second_per_grid"] = media["video_second_per_grid"].repeat_interleave(G, 0)
        P = plain["input_ids"].shape[1]
        plain["input_ids"] = torch.cat([plain["input_ids"], ids], 1)
        plain["attention_mask"] = torch.cat([plain["attention_mask"], torch.ones_like(ids)], 1)
        logits = policy(**plain).logits
        log_softmax = torch.log_softmax(logits[:, P - 1 : -1].float(), -1)
        want = log_softmax.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_generate_with_shared_audio_equals_per_row_audio(setup):
    policy, processor, _, media = setup
    runs = []
    for inputs in (
        shared(policy, media, 3),
        scoring.expand(media, 3, encoders.encode_video(policy, media)),
    ):
        torch.manual_seed(5)
        runs.append(rollout.generate(policy, processor, inputs, max_new_tokens=10))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][2] == runs[1][2]


def test_select_takes_each_rows_own_media(setup):
    policy, processor, _, media = setup
    # clip 0, clip 1 (no audio) twice, clip 2
    G, idx = 3, torch.tensor([1, 3, 4, 8])
    inputs = shared(policy, media, G)
    first = len(processor.tokenizer.all_special_ids) + 10
    ids = torch.randint(first, len(processor.tokenizer), (3 * G, 5))
    with torch.no_grad():
        whole = scoring.logprobs(policy, inputs, ids)
        some = scoring.logprobs(policy, scoring.select(policy, inputs, idx), ids[idx])
    torch.testing.assert_close(some, whole[idx], atol=1e-6, rtol=1e-6)


def test_logprobs_equal_generate_scores(setup):
    """At temperature 1 the log-probs of the sampled tokens are generate's own."""
    policy, processor, _, media = setup
    # audio encoded in the forward
    inputs = scoring.expand(media, 2, encoders.encode_video(policy, media))
    torch.manual_seed(0)
    with torch.no_grad():
        out = policy.generate(
            **inputs,
            max_new_tokens=6,
            min_new_tokens=6,
            do_sample=True,
            top_k=0,
            temperature=1.0,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
        ids = out.sequences[:, inputs["input_ids"].shape[1] :]
        log_softmax = torch.stack(out.logits, 1).float().log_softmax(-1)
        scores = log_softmax.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        got = scoring.logprobs(policy, inputs, ids)
    torch.testing.assert_close(got, scores, atol=1e-4, rtol=1e-4)


def test_rollout_is_seeded_and_masks_only_what_matters(setup):
    policy, processor, batch, media = setup
    G, every = 4, torch.ones(12, dtype=torch.bool)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(rollout.rollout(policy, processor, batch, media, G, max_new_tokens=12))
    a, b = runs
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    assert len(a.texts) == 3 * G and all(isinstance(t, str) for t in a.texts)
    mv, ma = rollout.masked_logprobs(policy, a, every, every, seed=3)
    # seeded masks
    mv_again = rollout.masked_logprobs(policy, b, every, every, seed=3)[0]
    torch.testing.assert_close(mv_again, mv)
    full = scoring.logprobs(policy, shared(policy, media, G), a.completion_ids)
    m, one = a.completion_mask.bool(), slice(G, 2 * G)
    # clip 0 has audio and video: both masks change its log-probs; clip 1 has no audio
    assert (mv[:G] - full[:G])[m[:G]].abs().max() > 1e-4
    assert (ma[:G] - full[:G])[m[:G]].abs().max() > 1e-4
    torch.testing.assert_close(ma[one], full[one])
    assert (mv[one] - full[one])[m[one]].abs().max() > 1e-4
    # only the rows with evidence are scored, each as in the whole pass; the others are 0
    need_v, need_a = torch.arange(12) % 5 == 0, torch.zeros(12, dtype=torch.bool)
    some_v, some_a = rollout.masked_logprobs(policy, a, need_v, need_a, seed=3, micro_batch=2)
    torch.testing.assert_close(some_v[need_v], mv[need_v], atol=1e-6, rtol=1e-6)
    assert not some_v[~need_v].any() and not some_a.any()


def test_completion_mask_stops_after_the_answer(setup, tiny_dir):
    """A policy taught one answer stops at "</answer>"; the mask ends there and texts decode."""
    _, processor, batch, media = setup
    policy = model.load_policy(tiny_dir)[0]
    tok = processor.tokenizer
    target = tok(
        ["<think>In the video, a smile.</think><answer>happy</answer> trailing words"] * 3,
        add_special_tokens=False,
        return_tensors="pt",
    )["input_ids"]
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    # memorise the target (and what follows it, which must be cut off)
    for _ in range(60):
        video = encoders.encode_video(policy, media)
        audio = encoders.encode_audio(policy, media)
        inputs = scoring.expand(media, 1, video, audio)
        # with gradient through both towers
        loss = -scoring.logprobs(policy, inputs, target).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    ids, mask, texts = rollout.generate(
        policy, processor, shared(policy, media, 1), max_new_tokens=40, greedy=True
    )
    assert all(t.endswith("</answer>") for t in texts), texts
    assert torch.all(ids[mask == 0] == tok.pad_token_id)
    assert tok.decode(ids[0][mask[0].bool()]) == texts[0]


def test_fsdp_rollout_matches_single_process(tiny_dir, synth_dir, tmp_path):
    """2 CPU ranks (gloo, FSDP2) give the single process's completions and log-probs; ranks that
    stop at different lengths do not hang (synced_gpus)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    worker = Path(__file__).with_name("fsdp_rollout_worker.py")
    single = tmp_path / "single.pt"
    subprocess.run(
        [sys.executable, str(worker), str(tiny_dir), str(synth_dir), str(single)],
        check=True,
        env=env,
        timeout=300,
    )
    multi = tmp_path / "multi.pt"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            str(worker),
            str(tiny_dir),
            str(synth_dir),
            str(multi),
        ],
        check=True,
        env=env,
        timeout=300,
    )
    a, b = torch.load(single), torch.load(multi)
    assert torch.equal(a["ids"], b["ids"])
    for k in ("mv", "ma", "ref"):
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)
    for run in (a, b):  # rank 0's rows: none under x\v, every other one under x\a
        assert not run["some"][0].any()
        torch.testing.assert_close(
            run["some"][1], a["ma"] * (torch.arange(6) % 2 == 0)[:, None], atol=1e-5, rtol=1e-5
        )
    assert b["lengths_differ"]  # the ragged case ran
