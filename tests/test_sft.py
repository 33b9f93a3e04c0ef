"""train.sft_step in micro-batches (--sft_micro_batch): the loss and the gradient of one forward
over the whole batch, since every micro-batch's loss is divided by the batch's token count."""

import pytest
import torch

import data
import train
from runtime import config
from thinker import batching, model


@pytest.fixture(scope="module")
def sft(group, tiny_dir, synth_dir):
    """The tiny thinker and four clips: both media, no video, no audio, both media."""
    policy, processor = model.load_policy(tiny_dir)
    recs = data.load_manifest(synth_dir / "train.jsonl")
    both = [r for r in recs if r.get("video") and r.get("audio")]
    no_video = next(r for r in recs if not r.get("video"))
    no_audio = next(r for r in recs if not r.get("audio"))
    batch = [both[0], no_video, no_audio, both[1]]
    return policy.train(), processor, batch, batching.encode(processor, batch, frames=4)


def gradient(sft, micro_batch):
    """(loss, every parameter's gradient) of one sft_step with --sft_micro_batch micro_batch."""
    policy, processor, batch, media = sft
    policy.zero_grad(set_to_none=True)
    metrics = train.sft_step(
        config.Args(sft_micro_batch=micro_batch), policy, processor, batch, media
    )
    grads = {name: p.grad.clone() for name, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad(set_to_none=True)
    return metrics["loss"], grads


@pytest.mark.parametrize("micro_batch", [1, 3])
def test_micro_batched_sft_gives_the_gradient_of_one_forward(sft, micro_batch):
    whole_loss, whole = gradient(sft, 0)
    loss, grads = gradient(sft, micro_batch)
    assert loss == pytest.approx(whole_loss, rel=1e-6)
    # every tower and layer was reached, in both
    assert grads.keys() == whole.keys() and len(whole) > 10
    torch.testing.assert_close(grads, whole, rtol=1e-4, atol=1e-7)


def test_the_profiles_micro_batch_sft_only_on_real_models():
    """The CPU run keeps one forward over its batch (its numbers stay as they were); the real
    profile takes one clip a forward, with activation checkpointing, like the update."""
    assert config.CPU["sft_micro_batch"] == 0 and config.REAL["sft_micro_batch"] == 1
    assert not config.CPU["activation_checkpointing"] and config.REAL["activation_checkpointing"]
