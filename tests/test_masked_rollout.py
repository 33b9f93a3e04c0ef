"""masked_rollout.py: the claim reward against a loop, samples drawn from the masked input, the
switch off running nothing, and one OPPO step with masked rollouts on the tiny thinker."""

from unittest.mock import Mock

import pytest
import torch
import torch.distributed as dist

import data
import rollout
import train
from matching.matcher import Sim
from metrics import perception
from runtime import config
from thinker import batching, encoders, model
from variants import masked_rollout

TAU = 0.5


# ---------------------------------------------------------------- the reward, by hand
def naive_reward(text, S_visual, S_acoustic, modality, w_fmt=0.1):
    """-#claims of the masked modality / max(1, #claims) + w_fmt * format, clause by clause."""
    counts = {"visual": 0, "acoustic": 0}
    for k in range(len(S_visual)):
        best_v = max(S_visual[k], default=float("-inf"))
        best_a = max(S_acoustic[k], default=float("-inf"))
        if best_v > TAU and best_v > best_a:
            counts["visual"] += 1
        if best_a > TAU and best_a > best_v:
            counts["acoustic"] += 1
    claimed = counts["visual"] + counts["acoustic"]
    sense = {"video": "visual", "audio": "acoustic"}[modality]
    share = counts[sense] / claimed if claimed else 0.0
    well_formed = text.strip().startswith("<think>") and text.strip().endswith("</answer>")
    return -share + w_fmt * well_formed


def hand_made():
    """(texts, visual matrices, acoustic matrices): both claims, none, a tie, an unparseable
    text, a modality without cues, then random matrices."""
    texts = [
        "<think>a frown, a loud voice, a low voice</think><answer>angry</answer>",
        "<think>the person talks</think><answer>neutral</answer>",
        "<think>a face and a voice</think><answer>happy</answer>",
        "<think>no closing tag <answer>sad",
        "<think>a smile, a grin</think><answer>happy</answer>",
    ]
    Sv = [[[0.9, 0.2], [0.3, 0.1], [0.6, 0.1]], [[0.4, 0.2]], [[0.8, 0.1]], [], [[0.7], [0.2]]]
    Sa = [[[0.1], [0.8], [0.7]], [[0.3]], [[0.8]], [], [[], []]]
    gen = torch.Generator().manual_seed(0)
    for K in (1, 4, 7):
        texts.append("<think>" + ", ".join(["x"] * K) + "</think> <answer>sad</answer>")
        Sv.append(torch.rand(K, 3, generator=gen).tolist())
        Sa.append(torch.rand(K, 2, generator=gen).tolist())
    return texts, Sv, Sa


def as_sim(S_visual, S_acoustic):
    K = len(S_visual)
    Jv = len(S_visual[0]) if K else 2
    Ja = len(S_acoustic[0]) if K else 1
    S = {
        "visual": torch.tensor(S_visual, dtype=torch.float32).view(K, Jv),
        "acoustic": torch.tensor(S_acoustic, dtype=torch.float32).view(K, Ja),
        "emotion": torch.zeros(K, 0),
    }
    return Sim([(0, 1)] * K, S)


@pytest.mark.parametrize("modality", ["video", "audio"])
def test_claim_rewards_match_the_loop(modality):
    texts, Sv, Sa = hand_made()
    sims = [as_sim(v, a) for v, a in zip(Sv, Sa)]
    rewards, share, fmt = masked_rollout.claim_rewards(texts, sims, modality, TAU, 0.1)
    want = [naive_reward(t, v, a, modality) for t, v, a in zip(texts, Sv, Sa)]
    assert torch.allclose(rewards, torch.tensor(want), atol=1e-6)
    # the first text claims one visual and two acoustic cues; the next three claim none
    first = {"video": 1 / 3, "audio": 2 / 3}[modality]
    assert share[:4].tolist() == pytest.approx([first, 0.0, 0.0, 0.0])
    assert fmt[:5].tolist() == [1.0, 1.0, 1.0, 0.0, 1.0]


def test_bad_switches_name_the_flag():
    args = config.Args(masked_rollouts=1)
    with pytest.raises(ValueError, match="--masked_rollouts 1"):
        masked_rollout.modalities(args)
    for bad in ("video,text", "", "audio,audio"):
        args = config.Args(masked_rollouts=2, masked_rollout_modalities=bad)
        with pytest.raises(ValueError, match="--masked_rollout_modalities"):
            masked_rollout.modalities(args)
    args = config.Args(masked_rollouts=2, masked_rollout_modalities="audio")
    assert masked_rollout.modalities(args) == ["audio"]
    with pytest.raises(ValueError, match="--data"):
        masked_rollout.manifest_inventory("")


# ---------------------------------------------------------------- one OPPO step, tiny thinker
class StubMatcher:
    """Row i of every call has one clause: a visual claim (i % 3 == 0), an acoustic one (1) or
    none (2); the cue lists it was given are kept."""

    def __init__(self):
        self.cue_lists = []

    def similarities(self, texts, cue_lists):
        self.cue_lists.extend(cue_lists)
        sims = []
        for i in range(len(texts)):
            v, a = [(0.9, 0.1), (0.1, 0.9), (0.1, 0.1)][i % 3]
            sims.append(as_sim([[v]], [[a]]))
        return sims


@pytest.fixture(scope="module")
def world(tiny_dir, synth_dir):
    # train.oppo_step sums its counts over ranks: a group of one rank, without a port
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    policy, processor = model.load_policy(tiny_dir)
    manifest = data.load_manifest(synth_dir / "train.jsonl")
    recs = [r for r in manifest if r.get("video") and r.get("audio")][:2]
    media = batching.encode(processor, recs, frames=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield policy, processor, recs, media, synth_dir / "train.jsonl"
    torch.set_num_threads(threads)
    if own_group:
        dist.destroy_process_group()


def step_args(manifest, **over):
    kw = dict(
        profile="cpu",
        data=str(manifest),
        batch=2,
        G=2,
        max_new_tokens=8,
        micro_batch=2,
        perception_reward=False,
        perception_loss=False,
    )
    args = config.Args(**{**kw, **over})
    config.apply_profile(args, torch.device("cpu"))
    return args


def run_step(world, matcher, step=3, **over):
    """One oppo_step from seed 0: (its metrics, the gradient, flattened); gradients cleared."""
    policy, processor, recs, media, manifest = world
    args = step_args(manifest, **over)
    torch.manual_seed(0)
    policy.zero_grad(set_to_none=True)
    metrics = train.oppo_step(args, policy, None, processor, matcher, recs, media, step)
    grads = [p.grad.flatten() for p in policy.parameters() if p.grad is not None]
    policy.zero_grad(set_to_none=True)
    return metrics, torch.cat(grads)


def spy(monkeypatch, module, name):
    """Record the arguments of every call of module.name, which still runs."""
    calls = []
    real = getattr(module, name)

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, recording)
    return calls


def test_samples_come_from_the_masked_inputs(world, monkeypatch):
    """Off: one generate. On: one more per masked modality, fed x\\m as evaluation masks it
    (rho = 1, seed + step), its tower outputs those of x\\m; rewards read the training set's
    whole cue inventory."""
    policy, _, _, media, manifest = world
    rollouts = spy(monkeypatch, rollout, "rollout")
    generates = spy(monkeypatch, rollout, "generate")
    run_step(world, StubMatcher())
    assert len(generates) == 1 and len(rollouts) == 1
    generates.clear()
    rollouts.clear()
    matcher = StubMatcher()
    run_step(world, matcher, step=3, masked_rollouts=2)
    assert len(generates) == 3 and len(rollouts) == 3
    for (args, _), (generate_args, _), modality in zip(
        rollouts[1:], generates[1:], ("video", "audio")
    ):
        masked = args[3]
        want = batching.mask_modality(media, modality, rho=1.0, seed=0 + 3)
        assert all(torch.equal(masked[k], want[k]) for k in want)
        # the masked modality is all zero, the other one untouched
        pixels, features = masked["pixel_values_videos"], masked["input_features"]
        if modality == "video":
            assert not pixels.any() and torch.equal(features, media["input_features"])
        else:
            assert pixels.equal(media["pixel_values_videos"]) and not features.any()
        inputs = generate_args[2]
        with torch.no_grad():
            video = encoders.encode_video(policy, want).pooler_output
            audio = encoders.encode_audio(policy, want)
        sampled_video = inputs["mm_encoder_outputs"]["video"].pooler_output
        assert all(torch.equal(sampled_video[2 * b], video[b]) for b in range(2))
        assert all(torch.equal(inputs["audio_features"][2 * b], audio[b]) for b in range(2))
    inventory = perception.cue_inventory(
        [r.get("cues") or {} for r in data.load_manifest(manifest)]
    )
    assert len(matcher.cue_lists) == 2 * 4 and all(c == inventory for c in matcher.cue_lists)
    # one masked modality: one more generate
    generates.clear()
    run_step(world, StubMatcher(), masked_rollouts=2, masked_rollout_modalities="audio")
    assert len(generates) == 2


def test_the_loaded_training_records_are_not_read_again(world, monkeypatch):
    """run_stage passes the cues of the records it loaded before the first step: the masked
    rollouts route against them, and no rank reads and probes the manifest again."""
    policy, processor, recs, media, manifest = world
    inventory = masked_rollout.training_inventory(data.load_manifest(manifest))
    masked_rollout.manifest_inventory.cache_clear()
    monkeypatch.setattr(data, "load_manifest", Mock(side_effect=AssertionError("read again")))
    matcher = StubMatcher()
    torch.manual_seed(0)
    args = step_args(manifest, masked_rollouts=2)
    train.oppo_step(args, policy, None, processor, matcher, recs, media, 3, inventory=inventory)
    policy.zero_grad(set_to_none=True)
    assert len(matcher.cue_lists) == 2 * 4 and all(c == inventory for c in matcher.cue_lists)
    assert any(inventory.values())


def test_an_oppo_step_with_masked_rollouts_trains_and_logs(world):
    """The masked rollouts add a gradient to the step's, w_mr times theirs whatever the
    micro-batch, and log their metrics; the parameters move."""
    policy = world[0]
    off, grad_off = run_step(world, StubMatcher())
    on, grad_on = run_step(world, StubMatcher(), masked_rollouts=2)
    twice, grad_twice = run_step(
        world, StubMatcher(), masked_rollouts=2, masked_rollout_weight=2.0, micro_batch=1
    )
    assert not any(key.startswith("masked_rollouts/") for key in off)
    masked = grad_on - grad_off
    assert masked.norm() > 1e-6 * grad_on.norm() and masked.norm() > 0
    assert torch.allclose(grad_twice - grad_off, 2 * masked, rtol=1e-3, atol=1e-6)
    # the stub's claims: rows visual, acoustic, none, visual
    for modality, share in (("video", 0.5), ("audio", 0.25)):
        name = f"masked_rollouts/{modality}"
        assert on[f"{name}_claim_share"] == share and on[f"{name}_rows"] == 4
        assert 0 <= on[f"{name}_format"] <= 1 and on[f"{name}_time"] > 0
        assert on[f"{name}_rows_with_signal"] > 0
        assert isinstance(on[f"{name}_sample"], str)
    # the surrogate's value is 0 at ratio 1 with equal lengths; its FLOPs are not
    assert on["flops"] > off["flops"]
    # the step's optimizer moves the weights
    before = [p.detach().clone() for p in policy.parameters()]
    torch.manual_seed(0)
    args = step_args(world[4], masked_rollouts=2, lr=1e-2)
    train.oppo_step(args, policy, None, world[1], StubMatcher(), world[2], world[3], 3)
    torch.optim.SGD(policy.parameters(), lr=1e-2).step()
    moved = [not torch.equal(p, q) for p, q in zip(policy.parameters(), before)]
    assert any(moved)
    with torch.no_grad():
        for p, q in zip(policy.parameters(), before):
            p.copy_(q)
    policy.zero_grad(set_to_none=True)
