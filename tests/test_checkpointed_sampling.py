"""Sampling with activation checkpointing on and the policy in train mode, as run_stage leaves it.

In train mode a checkpointed decoder layer drops the KV cache (transformers: "Caching is
incompatible with gradient checkpointing"), so each decode step would see its own token alone.
rollout.sampling_mode samples in eval mode and restores the mode: greedy completions through
`rollout.rollout` and the masked rollouts must equal those of a plain policy in eval mode.
"""

import functools

import pytest
import torch

import data
import rollout
from matching.matcher import Sim
from runtime import config, parallel
from thinker import batching, model
from variants import masked_rollout

TOKENS = 12


class OneClaim:
    """A matcher whose every completion holds one clause, a visual claim."""

    def similarities(self, texts, cue_lists):
        S = {"visual": torch.ones(1, 1), "acoustic": torch.zeros(1, 1)}
        S["emotion"] = torch.zeros(1, 0)
        return [Sim([(0, 1)], S) for _ in texts]


@pytest.fixture(scope="module")
def clips(group, tiny_dir, synth_dir):
    processor = model.load_policy(tiny_dir)[1]
    recs = data.load_manifest(synth_dir / "train.jsonl")
    batch = [r for r in recs if r.get("video") and r.get("audio")][:2]
    return processor, batch, batching.encode(processor, batch, frames=4)


def policies(tiny_dir):
    """(plain policy in eval mode, checkpointed policy in train mode), the same weights."""
    plain = model.load_policy(tiny_dir)[0].eval()
    checkpointed = model.load_policy(tiny_dir)[0]
    parallel.shard(checkpointed, "cpu", checkpointing=True)
    checkpointed.train()
    assert checkpointed.is_activation_checkpointing
    return plain, checkpointed


@pytest.fixture
def greedy(monkeypatch):
    """rollout.generate made greedy for every caller: the samples depend on the logits alone."""
    monkeypatch.setattr(rollout, "generate", functools.partial(rollout.generate, greedy=True))


def test_greedy_rollouts_with_checkpointing_in_train_mode_equal_plain(clips, tiny_dir, greedy):
    processor, batch, media = clips
    rolls = []
    for policy in policies(tiny_dir):
        was_training = policy.training
        rolls.append(rollout.rollout(policy, processor, batch, media, 2, max_new_tokens=TOKENS))
        # the mode is given back: run_stage's backward after the rollout trains
        assert policy.training == was_training
    plain, checkpointed = rolls
    assert torch.equal(checkpointed.completion_ids, plain.completion_ids)
    assert checkpointed.texts == plain.texts
    # without a cache the tiny thinker stops after 2 tokens: these completions are longer
    assert plain.completion_mask.sum(1).min() > 2


def test_masked_rollouts_with_checkpointing_in_train_mode_equal_plain(
    clips, tiny_dir, synth_dir, greedy, monkeypatch
):
    processor, batch, media = clips
    args = config.Args(
        profile="cpu", data=str(synth_dir / "train.jsonl"), masked_rollouts=2, max_new_tokens=TOKENS
    )
    config.apply_profile(args, torch.device("cpu"))
    samples = {}
    for policy in policies(tiny_dir):
        rolls = []

        def recorded(*call, **kwargs):
            rolls.append(real(*call, **kwargs))
            return rolls[-1]

        real = rollout.rollout
        monkeypatch.setattr(rollout, "rollout", recorded)
        was_training = policy.training
        masked_rollout.run(args, policy, processor, OneClaim(), batch, media, step=1)
        monkeypatch.setattr(rollout, "rollout", real)
        assert policy.training == was_training
        samples[was_training] = [roll.completion_ids for roll in rolls]
    # one rollout under x\v, one under x\a
    assert len(samples[True]) == len(samples[False]) == 2
    for checkpointed, plain in zip(samples[True], samples[False]):
        assert torch.equal(checkpointed, plain)
