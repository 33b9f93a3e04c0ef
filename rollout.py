"""Rollout: sample G completions per clip and score them under full and masked inputs.

One OPPO step needs, for every sampled completion o_i of a clip x (SPEC sections 4-5):
  - the completion itself (one batched `generate` over all B x G rows, KV cache on);
  - ref_t  = log pi_ref(o_t | x, o_<t)        when beta > 0        (Eq. 7)
  - mv_t   = log pi_old(o_t | x\\v, o_<t)     when the Omni-Perception Loss is on (Eq. 10)
  - ma_t   = log pi_old(o_t | x\\a, o_<t)     likewise, audio masked.
The policy's own log-probs are recomputed with gradient in the update (one update per rollout,
so old_t = logp_t.detach() and no separate old pass is needed; PERF.md).

Where the time goes with omni inputs is the long media prompt, so:
  - the vision tower runs once per clip per pass, and its output is shared by the clip's G rows
    (`mm_encoder_outputs`, which the Hugging Face thinker accepts). The audio tower has no such
    entry point in the thinker, so its features are repeated G times and re-encoded per row:
    bench.py measures what that costs;
  - the LM head sees only completion positions (`lm_head_rows`), never the prompt;
  - under FSDP2 the parameters stay unsharded for the whole rollout (`unsharded`), instead of
    all-gathering every layer at every decode step.
"""
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers.modeling_outputs import BaseModelOutputWithPooling

import data

STOP = "</answer>"
MEDIA_TOKENS = ("<|IMAGE|>", "<|VIDEO|>", "<|AUDIO|>", "<|vision_bos|>", "<|vision_eos|>", "<|audio_bos|>", "<|audio_eos|>")


@dataclass
class Rollout:
    records: list            # N = B * G ground-truth records, row i belongs to clip i // G
    inputs: dict             # prompt tensors for the N rows (input_ids (N, P), attention_mask, ...)
    media: dict              # the B-clip processed batch (to re-encode media with gradient)
    completion_ids: torch.Tensor   # (N, C) generated ids, right-padded
    completion_mask: torch.Tensor  # (N, C) 1 up to and including the stop token
    texts: list              # N decoded completions (skip_special_tokens=True)
    G: int
    ref_logp: torch.Tensor | None = None  # (N, C)
    mv_logp: torch.Tensor | None = None   # (N, C) video masked
    ma_logp: torch.Tensor | None = None   # (N, C) audio masked
    timings: dict | None = None           # seconds per phase: generate, masked, ref


# ---------------------------------------------------------------- inputs for the N = B x G rows
def encode_video(model, batch):
    """Vision tower once over the batch's clips; None when no clip has video."""
    if "pixel_values_videos" not in batch:
        return None
    return model.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"], return_dict=True)


def expand(batch, G, video=None):
    """Forward kwargs for B clips x G rows: text and audio rows repeated, video features shared.

    Each clip holds at most one video and one audio, in record order, so repeating every
    per-clip item G times in place keeps rows and media aligned.
    """
    rep = lambda t: t.repeat_interleave(G, dim=0)
    out = {"input_ids": rep(batch["input_ids"]), "attention_mask": rep(batch["attention_mask"]),
           "use_audio_in_video": False}
    if "input_features" in batch:
        out["input_features"] = rep(batch["input_features"])
        out["feature_attention_mask"] = rep(batch["feature_attention_mask"])
    if video is not None:
        per_clip = video.pooler_output  # tuple of (tokens_k, D), one per video
        out["mm_encoder_outputs"] = {"video": BaseModelOutputWithPooling(
            pooler_output=tuple(v for v in per_clip for _ in range(G)))}
        out["video_grid_thw"] = rep(batch["video_grid_thw"])
        out["video_second_per_grid"] = rep(batch["video_second_per_grid"])
    return out


# ---------------------------------------------------------------- scoring: log pi(o_t | x, o_<t)
@contextmanager
def lm_head_rows(model, n):
    """Make the LM head see only the last n positions: logits for completion tokens only.

    A 4.5k-token omni prompt times a 152k vocabulary is 2.7 GB of fp32 logits per sequence
    (PERF.md); the thinker's forward has no `logits_to_keep`, so a pre-hook slices the hidden
    states before the projection. n = 1 during generate (only the next token is sampled).
    """
    handle = model.lm_head.register_forward_pre_hook(lambda m, args: (args[0][:, -n:],))
    try:
        yield
    finally:
        handle.remove()


def selective_log_softmax(logits, ids, chunk=8):
    """log softmax(logits)[ids] without materialising the whole log-softmax; rows in chunks."""
    out = []
    for lg, ix in zip(logits.split(chunk), ids.split(chunk)):  # (n, C, V), (n, C)
        out.append(lg.float().gather(-1, ix.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(lg.float(), -1))
    return torch.cat(out)  # (N, C)


def logprobs(model, inputs, completion_ids, micro_batch=None):
    """log pi(o_t | x, o_<t) for every completion token, (N, C).

    `inputs` are the N prompt rows (left-padded, from `expand`); the completion is appended
    right-padded, so the logits of completion token t sit at position P - 1 + t. Gradient flows
    when the caller enables it; masked and reference passes call this under torch.no_grad().
    """
    N, C = completion_ids.shape
    mb = micro_batch or N
    out = []
    for s in range(0, N, mb):
        rows = _rows(model, inputs, s, s + mb)
        ids = torch.cat([rows["input_ids"], completion_ids[s:s + mb]], 1)  # (n, P + C)
        att = torch.cat([rows["attention_mask"], torch.ones_like(completion_ids[s:s + mb])], 1)
        with lm_head_rows(model, C + 1):
            logits = model(**{**rows, "input_ids": ids, "attention_mask": att}).logits[:, :-1]  # (n, C, V)
        out.append(selective_log_softmax(logits, completion_ids[s:s + mb]))
    return torch.cat(out)  # (N, C)


def _rows(model, inputs, s, e):
    """Rows s:e of the expanded inputs. Media tensors hold one entry per row *that has* that
    medium, so they are sliced by the media of the rows before s and before e."""
    ids = inputs["input_ids"]
    has = {"video": (ids == model.config.video_token_id).any(1), "audio": (ids == model.config.audio_token_id).any(1)}
    span = {m: slice(int(h[:s].sum()), int(h[:e].sum())) for m, h in has.items()}
    medium = {"video_grid_thw": "video", "video_second_per_grid": "video", "input_features": "audio",
              "feature_attention_mask": "audio", "mm_encoder_outputs": "video"}
    rows = {}
    for k, v in inputs.items():
        if k in medium and span[medium[k]].start == span[medium[k]].stop:
            continue  # none of these rows has the medium
        if k == "mm_encoder_outputs":
            rows[k] = {"video": BaseModelOutputWithPooling(pooler_output=v["video"].pooler_output[span["video"]])}
        elif k in medium:
            rows[k] = v[span[medium[k]]]
        else:
            rows[k] = v[s:e] if torch.is_tensor(v) else v
    return rows


# ---------------------------------------------------------------- FSDP2: unshard for the rollout
@contextmanager
def unsharded(model):
    """Keep every FSDP2 unit's parameters gathered for the whole block (no-op without FSDP).

    Generation runs one forward per token; with per-unit resharding each decode step would
    all-gather every layer again (PERF.md).
    """
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for u in units:
        u.set_reshard_after_forward(False, recurse=False)
        u.unshard()
    try:
        yield
    finally:
        for u in units:
            u.reshard()
            u.set_reshard_after_forward(True, recurse=False)


# ---------------------------------------------------------------- the rollout
@torch.no_grad()
def generate(model, processor, inputs, temperature=1.0, top_p=1.0, max_new_tokens=64, greedy=False):
    """One batched generate over all rows; returns (ids (N, C), mask (N, C), texts)."""
    tok = processor.tokenizer
    stop_ids = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    # a sampled media placeholder would be taken for a video/audio slot by every later forward
    media_ids = [tok.convert_tokens_to_ids(t) for t in MEDIA_TOKENS]
    synced = dist.is_initialized() and dist.get_world_size() > 1  # ranks must step together
    with lm_head_rows(model, 1):
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=not greedy,
                             temperature=temperature if not greedy else None, top_p=top_p if not greedy else None,
                             top_k=0 if not greedy else None, stop_strings=[STOP], tokenizer=tok,
                             eos_token_id=stop_ids, pad_token_id=tok.pad_token_id, suppress_tokens=media_ids,
                             synced_gpus=synced)
    ids = out[:, inputs["input_ids"].shape[1]:]  # (N, C)
    # A row ends with its first <|im_end|> (kept: the policy chose to stop) or where generate
    # began padding it, after "</answer>" or an <|endoftext|> (not kept: nothing was chosen there).
    eos, pad = ids == stop_ids[0], ids == tok.pad_token_id  # (N, C)
    after = (eos.long().cumsum(1) - eos.long() + pad.long().cumsum(1)) > 0  # (N, C)
    mask = (~after).long()
    ids = ids.masked_fill(mask == 0, tok.pad_token_id)
    texts = tok.batch_decode(ids, skip_special_tokens=True)
    return ids, mask, texts


@torch.no_grad()
def rollout(policy, processor, records, media, G, ref=None, need_masked=False, rho=0.9, seed=0,
            temperature=1.0, top_p=1.0, max_new_tokens=64, micro_batch=None):
    """Sample G completions for each of the B clips in `media` and score them (see module doc).

    `media` is data.encode(processor, records) for the B clips; `ref` the frozen reference policy
    (None when beta = 0: no reference forward at all).
    """
    t0 = time.perf_counter()
    with unsharded(policy):
        video = encode_video(policy, media)
        inputs = expand(media, G, video)
        ids, mask, texts = generate(policy, processor, inputs, temperature, top_p, max_new_tokens)
        roll = Rollout(records=[r for r in records for _ in range(G)], inputs=inputs, media=media,
                       completion_ids=ids, completion_mask=mask, texts=texts, G=G)
        t1 = time.perf_counter()
        if need_masked:  # Eq. (10): pi_old under x\v and x\a, same layout and positions as x
            no_v = data.mask_modality(media, "video", rho=rho, seed=seed)
            no_a = data.mask_modality(media, "audio", rho=rho, seed=seed)
            roll.mv_logp = logprobs(policy, expand(no_v, G, encode_video(policy, no_v)), ids, micro_batch)
            roll.ma_logp = logprobs(policy, expand(no_a, G, video), ids, micro_batch)  # video unchanged
    t2 = time.perf_counter()
    if ref is not None:  # Eq. (7)
        with unsharded(ref):
            roll.ref_logp = logprobs(ref, expand(media, G, encode_video(ref, media)), ids, micro_batch)
    roll.timings = {"generate": t1 - t0, "masked": t2 - t1, "ref": time.perf_counter() - t2}
    return roll
