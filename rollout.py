"""Rollout: sample G completions per clip and score them under full and masked inputs.

One OPPO step needs, for every sampled completion o_i of a clip x (SPEC sections 4-5):
  - the completion itself (one batched `generate` over all B x G rows, KV cache on);
  - ref_t  = log pi_ref(o_t | x, o_<t)        when beta > 0        (Eq. 7)
  - mv_t   = log pi_old(o_t | x\\v, o_<t)     on tokens routed to vision (Eq. 10): `masked_logprobs`
  - ma_t   = log pi_old(o_t | x\\a, o_<t)     likewise, audio masked.
The policy's own log-probs are recomputed with gradient in the update (one update per rollout,
so old_t = logp_t.detach() and no separate old pass is needed; PERF.md).

Where the time goes with omni inputs is the long media prompt, so:
  - each tower runs once per clip per pass, and its output is shared by the clip's G rows: video
    through the thinker's `mm_encoder_outputs`; audio, for which the thinker has no such entry,
    through a hook that writes the clip's features into the audio positions of the token
    embeddings (`audio_features`), as the thinker's own forward would;
  - the 3-D rotary positions are built once per clip (`positions`) and continued over the
    completion, not rebuilt per row in every forward by the thinker's Python loop;
  - the LM head sees only completion positions (`lm_head_rows`), never the prompt;
  - the masked passes score only the rows whose completions claim that modality's evidence
    (Eq. 10 reads them nowhere else), after the reward has routed the tokens;
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
    positions: torch.Tensor | None = (
        None  # (3, B, P) the prompts' rotary positions, shared by every pass
    )
    video: BaseModelOutputWithPooling | None = None  # the B clips' vision-tower output (no grad)
    audio: tuple | None = None  # the B clips' audio-tower output, one (tokens_k, D) per audio
    ref_logp: torch.Tensor | None = None  # (N, C)
    timings: dict | None = None  # seconds per phase: generate, ref


# ---------------------------------------------------------------- inputs for the N = B x G rows
def encode_video(model, batch):
    """Vision tower once over the batch's clips; None when no clip has video."""
    if "pixel_values_videos" not in batch:
        return None
    return model.get_video_features(
        batch["pixel_values_videos"], batch["video_grid_thw"], return_dict=True
    )


def encode_audio(model, batch):
    """Audio tower once over the batch's clips: one (tokens_k, D) tensor per audio; None without audio."""
    if "input_features" not in batch:
        return None
    feats = model.get_audio_features(
        batch["input_features"], batch["feature_attention_mask"], return_dict=True
    )
    n = (batch["input_ids"] == model.config.audio_token_id).sum(1)  # (B,) audio tokens of each clip
    return feats.last_hidden_state.split(n[n > 0].tolist())


def positions(model, batch):
    """The 3-D rotary positions of the B prompts, (3, B, P). The thinker rebuilds them in every
    forward with a Python loop over rows (`get_rope_index`); a clip's G rows and its masked copies
    share its layout, so they are built once per clip here and the completion continues them."""
    lengths = batch["feature_attention_mask"].sum(-1) if "feature_attention_mask" in batch else None
    return model.model.get_rope_index(
        batch["input_ids"],
        None,
        batch.get("video_grid_thw"),
        batch["attention_mask"],
        False,
        lengths,
        batch.get("video_second_per_grid"),
    )[0]


def expand(batch, G, video=None, audio=None, pos=None):
    """Forward kwargs for B clips x G rows: text rows repeated, media features and positions shared.

    Each clip holds at most one video and one audio, in record order, so repeating every
    per-clip item G times in place keeps rows and media aligned. Without `audio` the mel features
    are repeated and the thinker encodes them once per row (the plain path, which the tests
    check the shared one against).
    """
    rep = lambda t: t.repeat_interleave(G, dim=0)
    out = {
        "input_ids": rep(batch["input_ids"]),
        "attention_mask": rep(batch["attention_mask"]),
        "use_audio_in_video": False,
    }
    if pos is not None:
        out["prompt_positions"] = pos.repeat_interleave(G, dim=1)  # (3, N, P), see `logprobs`
    if "input_features" in batch:
        out["feature_attention_mask"] = rep(
            batch["feature_attention_mask"]
        )  # audio lengths: rope positions
        if audio is None:
            out["input_features"] = rep(batch["input_features"])
        else:
            out["audio_features"] = tuple(
                a for a in audio for _ in range(G)
            )  # see `audio_features`
    if video is not None:
        per_clip = video.pooler_output  # tuple of (tokens_k, D), one per video
        out["mm_encoder_outputs"] = {
            "video": BaseModelOutputWithPooling(
                pooler_output=tuple(v for v in per_clip for _ in range(G))
            )
        }
        out["video_grid_thw"] = rep(batch["video_grid_thw"])
        out["video_second_per_grid"] = rep(batch["video_second_per_grid"])
    return out


MEDIUM = {
    "video_grid_thw": "video",
    "video_second_per_grid": "video",
    "mm_encoder_outputs": "video",
    "input_features": "audio",
    "feature_attention_mask": "audio",
    "audio_features": "audio",
}


def select(model, inputs, idx):
    """Rows idx (a LongTensor) of the expanded inputs. Media entries exist only for the rows *that
    have* that medium, so a row's entry is its rank among those rows."""
    ids, out, entry = inputs["input_ids"], {}, {}
    for medium, token in (
        ("video", model.config.video_token_id),
        ("audio", model.config.audio_token_id),
    ):
        has = (ids == token).any(1)  # (N,)
        entry[medium] = (
            (has.cumsum(0) - 1)[idx][has[idx]]
        ).tolist()  # the media entries of rows idx
    for k, v in inputs.items():
        if k == "prompt_positions":
            out[k] = v[:, idx]
        elif k not in MEDIUM:
            out[k] = v[idx] if torch.is_tensor(v) else v
        elif entry[MEDIUM[k]]:  # else none of these rows has the medium
            j = entry[MEDIUM[k]]
            out[k] = (
                {
                    "video": BaseModelOutputWithPooling(
                        pooler_output=tuple(v["video"].pooler_output[i] for i in j)
                    )
                }
                if k == "mm_encoder_outputs"
                else tuple(v[i] for i in j)
                if k == "audio_features"
                else v[j]
            )
    return out


@contextmanager
def audio_features(model, feats):
    """Write precomputed audio-tower outputs into the <|AUDIO|> positions of the token embeddings.

    This is what the thinker's forward does with `input_features`, minus the tower: a clip's audio
    is encoded once and shared by its G rows. `feats` holds one (tokens_k, D) tensor per row with
    audio, in row order (None: a no-op). Decode steps of generate carry no audio token.
    """
    if feats is None:
        yield
        return
    src = torch.cat(feats)  # (audio tokens of all rows, D)

    def hook(module, args, out):
        where = args[0] == model.config.audio_token_id  # (n, S)
        if not where.any():
            return out
        if int(where.sum()) != len(src):
            raise ValueError(f"{int(where.sum())} audio positions but {len(src)} audio features")
        return out.masked_scatter(where.unsqueeze(-1), src.to(out.dtype))

    handle = model.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


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
        out.append(
            lg.float().gather(-1, ix.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(lg.float(), -1)
        )
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
        rows = select(model, inputs, torch.arange(s, min(s + mb, N)))
        ids = torch.cat([rows["input_ids"], completion_ids[s : s + mb]], 1)  # (n, P + C)
        att = torch.cat([rows["attention_mask"], torch.ones_like(completion_ids[s : s + mb])], 1)
        if (
            pos := rows.pop("prompt_positions", None)
        ) is not None:  # text after the prompt: max + 1, + 2, ...
            after = pos.amax((0, 2))[:, None] + 1 + torch.arange(C, device=pos.device)  # (n, C)
            rows["position_ids"] = torch.cat([pos, after.expand(3, -1, -1)], 2)  # (3, n, P + C)
        with lm_head_rows(model, C + 1), audio_features(model, rows.pop("audio_features", None)):
            logits = model(**{**rows, "input_ids": ids, "attention_mask": att}).logits[
                :, :-1
            ]  # (n, C, V)
        out.append(selective_log_softmax(logits, completion_ids[s : s + mb]))
    return torch.cat(out)  # (N, C)


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
    inputs = {
        k: v for k, v in inputs.items() if k != "prompt_positions"
    }  # generate builds its own, once
    with lm_head_rows(model, 1), audio_features(model, inputs.pop("audio_features", None)):
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=not greedy,
            temperature=temperature if not greedy else None,
            top_p=top_p if not greedy else None,
            top_k=0 if not greedy else None,
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
    eos, pad = ids == stop_ids[0], ids == tok.pad_token_id  # (N, C)
    after = (eos.long().cumsum(1) - eos.long() + pad.long().cumsum(1)) > 0  # (N, C)
    mask = (~after).long()
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

    `media` is data.encode(processor, records) for the B clips; `ref` the frozen reference policy
    (None when beta = 0: no reference forward at all). The masked passes come later
    (`masked_logprobs`): they need the reward's routing of tokens to modalities.
    """
    t0 = time.perf_counter()
    with unsharded(policy):
        video, audio = encode_video(policy, media), encode_audio(policy, media)
        ids, mask, texts = generate(
            policy, processor, expand(media, G, video, audio), temperature, top_p, max_new_tokens
        )
    pos = positions(policy, media)
    roll = Rollout(
        records=[r for r in records for _ in range(G)],
        media=media,
        completion_ids=ids,
        completion_mask=mask,
        texts=texts,
        G=G,
        positions=pos,
        video=video,
        audio=audio,
    )
    t1 = time.perf_counter()
    if ref is not None:  # Eq. (7)
        with unsharded(ref):
            roll.ref_logp = logprobs(
                ref,
                expand(
                    media, G, encode_video(ref, media), encode_audio(ref, media), roll.positions
                ),
                ids,
                micro_batch,
            )
    roll.timings = {"generate": t1 - t0, "ref": time.perf_counter() - t1}
    return roll


@torch.no_grad()
def masked_logprobs(policy, roll, need_v, need_a, rho=0.9, seed=0, micro_batch=None):
    """pi_old(o_t | x\\v, o_<t) and pi_old(o_t | x\\a, o_<t), Eq. (10), (N, C) each.

    Only the rows flagged in need_v / need_a (N,) are scored, with the pre-update policy; the
    others are 0, and Eq. (10) never reads them (their evidence masks are 0). x\\m keeps the
    layout and positions of x; the other modality's features are the rollout's own.
    """
    no_v, no_a = (data.mask_modality(roll.media, m, rho=rho, seed=seed) for m in ("video", "audio"))
    G, pos, out = roll.G, roll.positions, []  # x\\m keeps the layout of x: its positions too
    with unsharded(policy):
        for need, inputs in (
            (need_v, lambda: expand(no_v, G, encode_video(policy, no_v), roll.audio, pos)),
            (need_a, lambda: expand(no_a, G, roll.video, encode_audio(policy, no_a), pos)),
        ):
            logp = torch.zeros(
                roll.completion_ids.shape, device=roll.completion_ids.device
            )  # (N, C)
            idx = need.nonzero().squeeze(1)
            if len(idx):
                logp[idx] = logprobs(
                    policy, select(policy, inputs(), idx), roll.completion_ids[idx], micro_batch
                )
            out.append(logp)
    return tuple(out)
