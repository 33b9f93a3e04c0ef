"""batching.py: prompts and batches for the tiny thinker, and modality masking
(docs/method.md, sections 5 and 8)."""

import re

import pytest
import torch

from synthetic import tiny
from thinker import batching, media, model


@pytest.fixture(scope="module")
def policy(manifest_world, tmp_path_factory):
    corpus = batching.corpus(manifest_world[1])
    path = tiny.build_tiny(tmp_path_factory.mktemp("tiny"), corpus=corpus)
    return model.load_policy(path)


def pick(records, *wanted):
    """The first record of each wanted (video state, audio state)."""
    chosen = []
    for states in wanted:
        for r in records:
            if (r["render"]["video"], r["render"]["audio"]) == states:
                chosen.append(r)
                break
        else:
            raise LookupError(f"no record renders {states}")
    return chosen


# ---------------------------------------------------------------- prompts and batches
def test_target_text_has_the_think_answer_format(manifest_world):
    r = manifest_world[1][0]
    text = batching.target_text(r)
    # the format that R_fmt rewards, Eq. (1)
    assert re.fullmatch(r"\s*<think>.+?</think>\s*<answer>.+?</answer>\s*", text, re.S)
    assert text == f"<think>{r['reasoning']}</think><answer>{r['label']}</answer>"
    two = batching.target_text({"label": ["happy", "surprise"], "reasoning": "x"})
    assert two == "<think>x</think><answer>happy, surprise</answer>"


def test_encode_batches_any_mix_exactly_as_the_processor_does(manifest_world, policy):
    _, recs = manifest_world
    _, processor = policy
    chosen = pick(recs, ("face", "voice"), (None, "voice"), ("face", None)) + [
        dict(recs[0], subtitle="")
    ]
    decoded = [media.load_media(r, frames=4) for r in chosen]
    batch = batching.encode(processor, chosen, decoded)
    texts = [
        processor.apply_chat_template(
            batching.messages(r, v is not None, a is not None),
            add_generation_prompt=True,
            tokenize=False,
        )
        for r, (v, a) in zip(chosen, decoded)
    ]
    # empty subtitle: no subtitle line
    assert "Subtitle" not in texts[-1] and batching.INSTRUCTION in texts[-1]
    ref = processor(
        text=texts,
        videos=[v for v, _ in decoded if v is not None],
        audio=[a.numpy() for _, a in decoded if a is not None],
        use_audio_in_video=False,
        padding=True,
        videos_kwargs={"fps": 2.0, "size": {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}},
        return_tensors="pt",
    )
    assert set(batch) == set(ref)
    for key in ref:
        assert torch.equal(batch[key], ref[key]), key
    # 3 videos x (4/2) x (56/14)^2 patches
    assert batch["pixel_values_videos"].shape[0] == 3 * 2 * 4 * 4
    assert batch["input_features"].shape[0] == 3 and batch["video_grid_thw"].shape[0] == 3
    lengths = batch["attention_mask"].sum(1)
    L = batch["input_ids"].shape[1]
    # LEFT padding
    for row, ids, n in zip(batch["attention_mask"], batch["input_ids"], lengths):
        assert row[: L - n].sum() == 0 and row[L - n :].all()
        assert (ids[: L - n] == processor.tokenizer.pad_token_id).all()
    # Records with no video at all, or no audio at all: those keys are absent.
    assert "pixel_values_videos" not in batching.encode(processor, chosen[1:2], decoded[1:2])
    assert "input_features" not in batching.encode(processor, chosen[2:3], decoded[2:3])


def test_targets_get_labels_only_on_the_target_tokens(manifest_world, policy):
    _, recs = manifest_world
    _, processor = policy
    tok = processor.tokenizer
    chosen = recs[:3]
    targets = [batching.target_text(r) for r in chosen]
    prompts = batching.encode(processor, chosen, frames=4)
    batch = batching.encode(processor, chosen, targets=targets, frames=4)
    for i, target in enumerate(targets):
        labelled = batch["labels"][i][batch["labels"][i] != -100]
        assert tok.decode(labelled) == target + tok.eos_token
        assert torch.equal(batch["input_ids"][i][-len(labelled) :], labelled)
        n = int(prompts["attention_mask"][i].sum())  # the prompt sits right before the target
        start = batch["input_ids"].shape[1] - len(labelled)
        assert torch.equal(batch["input_ids"][i][start - n : start], prompts["input_ids"][i][-n:])
    assert (
        batch["attention_mask"].sum()
        == prompts["attention_mask"].sum() + (batch["labels"] != -100).sum()
    )


def test_target_ids_are_the_tokens_a_target_adds(manifest_world, policy):
    _, recs = manifest_world
    tok = policy[1].tokenizer
    targets = [batching.target_text(r) for r in recs[:3]]
    batch = batching.encode(policy[1], recs[:3], targets=targets, frames=4)
    ids = batching.target_ids(tok, targets)
    for i, row in enumerate(ids):
        assert row == batch["labels"][i][batch["labels"][i] != -100].tolist()


def test_the_prompt_cache_is_used_and_gives_the_same_batch(manifest_world, policy):
    _, recs = manifest_world
    _, processor = policy
    cache = {}
    first = batching.encode(processor, recs[:4], cache=cache, frames=4)
    assert set(cache) == {r["id"] for r in recs[:4]}
    # A cached record is never loaded again: these media paths do not exist.
    gone = [dict(r, cache="/nonexistent.safetensors", video="/nonexistent.mp4") for r in recs[:4]]
    again = batching.encode(processor, gone, cache=cache, frames=4)
    assert set(first) == set(again) and all(torch.equal(first[k], again[k]) for k in first)


# ---------------------------------------------------- masking (docs/method.md, section 5)
@pytest.fixture(scope="module")
def batch(manifest_world, policy):
    _, recs = manifest_world
    chosen = pick(recs, ("face", "voice"), (None, "voice"), ("face", None), ("face", "voice"))
    return batching.encode(policy[1], chosen, frames=4)


def test_video_mask_zeroes_rho_of_each_clips_patches_and_nothing_else(batch):
    for rho in (0.9, 0.5, 1.0):
        masked = batching.mask_modality(batch, "video", rho=rho, seed=1)
        for key in batch:
            if key != "pixel_values_videos":
                assert masked[key] is batch[key]  # tokens, positions and audio untouched
        before, after = batch["pixel_values_videos"], masked["pixel_values_videos"]
        changed = (before != after).any(1)  # (patches,)
        assert torch.equal(after[changed], torch.zeros_like(after[changed]))
        assert torch.equal(after[~changed], before[~changed])
        start = 0
        for n in batch["video_grid_thw"].prod(-1).tolist():
            assert int(changed[start : start + n].sum()) == round(rho * n)
            start += n
    assert torch.equal(
        batching.mask_modality(batch, "video", seed=3)["pixel_values_videos"],
        batching.mask_modality(batch, "video", seed=3)["pixel_values_videos"],
    )
    assert not torch.equal(
        batching.mask_modality(batch, "video", rho=0.5, seed=3)["pixel_values_videos"],
        batching.mask_modality(batch, "video", rho=0.5, seed=4)["pixel_values_videos"],
    )
    assert (batching.mask_modality(batch, "video", rho=1.0)["pixel_values_videos"] == 0).all()


def test_audio_mask_zeroes_rho_of_each_clips_valid_frames_and_nothing_else(batch):
    masked = batching.mask_modality(batch, "audio", rho=0.9, seed=0)
    for key in batch:
        if key != "input_features":
            assert masked[key] is batch[key]
    before, after = batch["input_features"], masked["input_features"]  # (Ba, mels, T)
    for i, valid in enumerate(batch["feature_attention_mask"].bool()):
        changed = (before[i] != after[i]).any(0)  # (T,)
        assert not changed[~valid].any() and int(changed.sum()) == round(0.9 * int(valid.sum()))
        assert (after[i][:, changed] == 0).all() and torch.equal(
            after[i][:, ~changed], before[i][:, ~changed]
        )
    blank = batching.mask_modality(batch, "audio", rho=1.0)["input_features"]
    assert (blank.permute(0, 2, 1)[batch["feature_attention_mask"].bool()] == 0).all()
    with pytest.raises(ValueError, match="modality"):
        batching.mask_modality(batch, "text")


def test_the_thinker_runs_on_full_and_masked_batches(batch, policy):
    thinker, processor = policy
    with torch.no_grad():
        full = thinker(**batch, use_audio_in_video=False).logits[:, -1]  # (B, V)
        no_v = thinker(
            **batching.mask_modality(batch, "video", rho=1.0), use_audio_in_video=False
        ).logits[:, -1]
        no_a = thinker(
            **batching.mask_modality(batch, "audio", rho=1.0), use_audio_in_video=False
        ).logits[:, -1]
        out = thinker.generate(**batch, use_audio_in_video=False, max_new_tokens=3, do_sample=False)
    assert torch.isfinite(full).all() and out.shape == (4, batch["input_ids"].shape[1] + 3)
    has_video = [0, 2, 3]  # the chosen clips: face+voice, voice only, face only, face+voice
    has_audio = [0, 1, 3]
    assert not torch.allclose(full[has_video], no_v[has_video]) and torch.allclose(full[1], no_v[1])
    assert not torch.allclose(full[has_audio], no_a[has_audio]) and torch.allclose(full[2], no_a[2])
