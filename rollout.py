"""Rollout: sample G completions per clip and score them under the reference and masked inputs.

One OPPO step needs, for every sampled completion o_i of a clip x (docs/method.md, sections 4-5):
  - the completion itself (one batched `generate` over all B x G rows, KV cache on);
  - ref_t = log pi_ref(o_t | x, o_<t) when beta > 0, Eq. (7): `reference_logprobs`;
  - mv_t = log pi_old(o_t | x\\v, o_<t) on tokens routed to vision, Eq. (10): `masked_logprobs`;
  - ma_t = log pi_old(o_t | x\\a, o_<t) likewise, audio masked.
Those two are form (a) of Eq. (10), constants; in form (b), `--masked_grad`, the update scores
x\\v and x\\a (`masked_inputs`) itself, with gradient (variants/masked_grad.py).
The policy's own log-probs are recomputed with gradient in the update (one update per rollout,
so old_t = logp_t.detach() and no separate old pass is needed; docs/performance.md).
Every pass scores through thinker/scoring.py. Sampling runs in eval mode whatever the caller's
mode: in train mode with activation checkpointing, transformers turns the KV cache off, and
every decode step would see only its own token. Two more savings are the rollout's own:
  - the masked passes score only the rows whose completions claim that modality's evidence
    (Eq. 10 reads them nowhere else), after the reward has routed the tokens;
  - under FSDP2 the parameters stay unsharded for the whole rollout (parallel.unsharded),
    instead of all-gathering every layer at every decode step.
"""

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers.modeling_outputs import BaseModelOutputWithPooling

from runtime import parallel
from thinker import batching, encoders, microbatch, scoring

STOP = "</answer>"
MEDIA_TOKENS = (
    "<|IMAGE|>",
    "<|VIDEO|>",
    "<|AUDIO|>",
    "<|vision_bos|>",
    "<|vision_eos|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
)


@dataclass
class Rollout:
    records: list  # N = B * G ground-truth records, row i belongs to clip i // G
    media: dict  # the B-clip processed batch (masked into x\\v and x\\a by `masked_logprobs`)
    completion_ids: torch.Tensor  # (N, C) generated ids, right-padded
    completion_mask: torch.Tensor  # (N, C) 1 up to and including the stop token
    texts: list  # N decoded completions (skip_special_tokens=True)
    G: int
    # (3, B, P) the prompts' rotary positions, shared by every pass
    positions: torch.Tensor | None = None
    video: BaseModelOutputWithPooling | None = None  # the B clips' vision-tower output (no grad)
    audio: tuple | None = None  # the B clips' audio-tower output, one (tokens_k, D) per audio
    ref_logp: torch.Tensor | None = None  # (N, C)
    timings: dict | None = None  # seconds per phase: generate, ref


# ---------------------------------------------------------------- the rollout
@contextmanager
def sampling_mode(model):
    """Eval mode for the block, then the mode the model had: a checkpointed model in train mode
    samples without a KV cache (transformers drops it), and dropout would act."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def generate(model, processor, inputs, temperature=1.0, top_p=1.0, max_new_tokens=64, greedy=False):
    """One batched generate over all rows, in eval mode; returns (ids (N, C), mask (N, C),
    texts). The model's mode is restored after."""
    tok = processor.tokenizer
    stop_ids = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    # a sampled media placeholder would be taken for a video/audio slot by every later forward
    media_ids = [tok.convert_tokens_to_ids(t) for t in MEDIA_TOKENS]
    # ranks must step together
    synced = dist.is_initialized() and dist.get_world_size() > 1
    # generate builds its own positions, once
    inputs = {k: v for k, v in inputs.items() if k != "prompt_positions"}
    features = inputs.pop("audio_features", None)
    with sampling_mode(model), scoring.lm_head_rows(model, 1):
        with scoring.audio_features(model, features):
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=not greedy,
                temperature=None if greedy else temperature,
                top_p=None if greedy else top_p,
                top_k=None if greedy else 0,
                stop_strings=[STOP],
                tokenizer=tok,
                eos_token_id=stop_ids,
                pad_token_id=tok.pad_token_id,
                suppress_tokens=media_ids,
                synced_gpus=synced,
            )
    ids = out[:, inputs["input_ids"].shape[1] :]  # (N, C)
    # A row ends with its first <|im_end|> (kept: the policy chose to stop) or where generate
    # began padding it, after "</answer>" or an <|endoftext|> (not kept: nothing was chosen there).
    eos = (ids == stop_ids[0]).long()  # (N, C)
    pad = (ids == tok.pad_token_id).long()  # (N, C)
    after = (eos.cumsum(1) - eos + pad.cumsum(1)) > 0  # (N, C)
    mask = (~after).long()  # (N, C)
    ids = ids.masked_fill(mask == 0, tok.pad_token_id)
    texts = tok.batch_decode(ids, skip_special_tokens=True)
    return ids, mask, texts


@torch.no_grad()
def rollout(
    policy,
    processor,
    records,
    media,
    G,
    ref=None,
    temperature=1.0,
    top_p=1.0,
    max_new_tokens=64,
    micro_batch=None,
):
    """Sample G completions for each of the B clips in `media`; score them under pi_ref.

    `media` is batching.encode(processor, records) for the B clips; `ref` the frozen reference
    policy (None when beta = 0: no reference forward at all); micro_batch: clips per reference
    forward (None: all B). The masked passes come later (`masked_logprobs`): they need the
    reward's routing of tokens to modalities.
    """
    start = time.perf_counter()
    with parallel.unsharded(policy), sampling_mode(policy):
        video = encoders.encode_video(policy, media)
        audio = encoders.encode_audio(policy, media)
        inputs = scoring.expand(media, G, video, audio)
        ids, mask, texts = generate(policy, processor, inputs, temperature, top_p, max_new_tokens)
    # each clip's record for each of its G rows
    row_records = []
    for record in records:
        row_records.extend([record] * G)
    roll = Rollout(
        records=row_records,
        media=media,
        completion_ids=ids,
        completion_mask=mask,
        texts=texts,
        G=G,
        positions=scoring.positions(policy, media),
        video=video,
        audio=audio,
    )
    generated = time.perf_counter()
    if ref is not None:
        roll.ref_logp = reference_logprobs(ref, roll, micro_batch)
    roll.timings = {"generate": generated - start, "ref": time.perf_counter() - generated}
    return roll


# Eq. (7)
@torch.no_grad()
def reference_logprobs(ref, roll, micro_batch=None):
    """log pi_ref(o_t | x, o_<t), (N, C): the reference's towers once over the batch, then its
    forward `micro_batch` clips at a time (None: all B)."""
    G = roll.G
    out = []
    with parallel.unsharded(ref):
        video = encoders.encode_video(ref, roll.media)
        audio = encoders.encode_audio(ref, roll.media)
        for c0, c1 in microbatch.ranges(len(roll.media["input_ids"]), micro_batch):
            clips = microbatch.clips(ref, roll.media, c0, c1, roll.positions, video, audio)
            inputs = scoring.expand(clips.batch, G, clips.video, clips.audio, clips.positions)
            out.append(scoring.logprobs(ref, inputs, roll.completion_ids[c0 * G : c1 * G]))
    return torch.cat(out)  # (N, C)


def masked_inputs(media, rho=0.9, seed=0):
    """x\\v and x\\a of a processed batch: rho of its video (audio) features zeroed, drawn with
    `seed` (batching.mask_modality), as every masked pass of a step draws them."""
    no_video = batching.mask_modality(media, "video", rho=rho, seed=seed)
    no_audio = batching.mask_modality(media, "audio", rho=rho, seed=seed)
    return no_video, no_audio


# Eq. (10)
@torch.no_grad()
def masked_logprobs(policy, roll, need_v, need_a, rho=0.9, seed=0, micro_batch=None):
    """pi_old(o_t | x\\v, o_<t) and pi_old(o_t | x\\a, o_<t), (N, C) each.

    Only the rows flagged in need_v / need_a (N,) are scored, with the pre-update policy,
    `micro_batch` clips at a time (None: all B); the other rows are 0, and Eq. (10) never reads
    them (their evidence masks are 0).
    """
    no_video, no_audio = masked_inputs(roll.media, rho, seed)
    with parallel.unsharded(policy):
        logp_no_video = masked_rows_logprobs(policy, roll, no_video, "video", need_v, micro_batch)
        logp_no_audio = masked_rows_logprobs(policy, roll, no_audio, "audio", need_a, micro_batch)
    return logp_no_video, logp_no_audio


def masked_rows_logprobs(policy, roll, masked, modality, need, micro_batch):
    """log pi_old(o_t | x\\m, o_<t) on the rows flagged in need (N,), 0 on the others, (N, C).

    `masked` is the batch with modality m's features masked: that tower runs again on it, once,
    when any row needs it. x\\m keeps the layout of x, so the positions are the rollout's, and so
    are the other modality's features.
    """
    G = roll.G
    completion_ids = roll.completion_ids  # (N, C)
    logp = torch.zeros(completion_ids.shape, device=completion_ids.device)  # (N, C)
    if not need.any():
        return logp
    video = roll.video
    audio = roll.audio
    if modality == "video":
        video = encoders.encode_video(policy, masked)
    else:
        audio = encoders.encode_audio(policy, masked)
    for c0, c1 in microbatch.ranges(len(masked["input_ids"]), micro_batch):
        # the rows of these clips to score, counted from the first row of clip c0
        rows = need[c0 * G : c1 * G].nonzero().squeeze(1)
        if not len(rows):
            continue
        clips = microbatch.clips(policy, masked, c0, c1, roll.positions, video, audio)
        inputs = scoring.expand(clips.batch, G, clips.video, clips.audio, clips.positions)
        inputs = scoring.select(policy, inputs, rows)
        # the same rows, counted from row 0
        idx = c0 * G + rows
        logp[idx] = scoring.logprobs(policy, inputs, completion_ids[idx])
    return logp
