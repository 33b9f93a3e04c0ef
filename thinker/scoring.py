"""log pi(o_t | x, o_<t) for N rows sharing B clips' media: the forward of every scoring pass.

The SFT cold start, the reference pass (Eq. 7), the masked passes (Eq. 10) and the update
(Eq. 6) all score completions through `logprobs`. With omni inputs the time goes into the long
media prompt, so (docs/performance.md):
  - each tower runs once per clip per pass (thinker/encoders.py), and its output is shared by
    the clip's G rows: video
    through the thinker's `mm_encoder_outputs`; audio, for which the thinker has no such entry,
    through a hook that writes the clip's features into the audio positions of the token
    embeddings (`audio_features`), as the thinker's own forward would;
  - the 3-D rotary positions are built once per clip (`positions`) and continued over the
    completion, not rebuilt per row in every forward by the thinker's Python loop;
  - the LM head sees only completion positions (`lm_head_rows`), never the prompt.
Micro-batches are ranges of clips with their G rows (thinker/microbatch.py).
Shapes: B clips, G completions each, N = B * G rows (clip b owns rows b * G to b * G + G - 1),
P prompt positions, C completion positions, V vocabulary, D feature width.
"""

from contextlib import contextmanager

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling


# ---------------------------------------------------------------- rotary positions, once per clip
def positions(model, batch):
    """The 3-D rotary positions of the B prompts, (3, B, P).

    The thinker rebuilds them in every forward with a Python loop over rows (`get_rope_index`);
    a clip's G rows and its masked copies share its layout, so they are built once per clip here
    and the completion continues them.
    """
    lengths = None
    if "feature_attention_mask" in batch:
        lengths = batch["feature_attention_mask"].sum(-1)  # (B_audio,) mel frames
    rope = model.model.get_rope_index(
        batch["input_ids"],
        None,
        batch.get("video_grid_thw"),
        batch["attention_mask"],
        False,
        lengths,
        batch.get("video_second_per_grid"),
    )
    return rope[0]


# ---------------------------------------------------------------- inputs for the N = B x G rows
def repeat_entries(entries, G):
    """Each per-clip entry G times in place: (a, b) -> (a, a, b, b) for G = 2."""
    out = []
    for entry in entries:
        out.extend([entry] * G)
    return tuple(out)


def expand(batch, G, video=None, audio=None, pos=None):
    """Forward kwargs for B clips x G rows: text rows repeated, media features and positions
    shared.

    Each clip holds at most one video and one audio, in record order, so repeating every
    per-clip item G times in place keeps rows and media aligned. Without `audio` the mel features
    are repeated and the thinker encodes them once per row (the plain path, which the tests
    check the shared one against).
    """
    out = {
        "input_ids": batch["input_ids"].repeat_interleave(G, dim=0),  # (N, P)
        "attention_mask": batch["attention_mask"].repeat_interleave(G, dim=0),  # (N, P)
        "use_audio_in_video": False,
    }
    if pos is not None:
        # continued over the completion by `logprobs`
        out["prompt_positions"] = pos.repeat_interleave(G, dim=1)  # (3, N, P)
    if "input_features" in batch:
        # the audio lengths, which the rotary positions read
        out["feature_attention_mask"] = batch["feature_attention_mask"].repeat_interleave(G, dim=0)
        if audio is None:
            out["input_features"] = batch["input_features"].repeat_interleave(G, dim=0)
        else:
            # written into the token embeddings by `audio_features`
            out["audio_features"] = repeat_entries(audio, G)
    if video is not None:
        # one (tokens_k, D) per video
        pooled = repeat_entries(video.pooler_output, G)
        out["mm_encoder_outputs"] = {"video": BaseModelOutputWithPooling(pooler_output=pooled)}
        out["video_grid_thw"] = batch["video_grid_thw"].repeat_interleave(G, dim=0)
        out["video_second_per_grid"] = batch["video_second_per_grid"].repeat_interleave(G, dim=0)
    return out


# the medium of each per-entry key of the expanded inputs
MEDIUM = {
    "video_grid_thw": "video",
    "video_second_per_grid": "video",
    "mm_encoder_outputs": "video",
    "input_features": "audio",
    "feature_attention_mask": "audio",
    "audio_features": "audio",
}


def row_entries(input_ids, token_id, idx):
    """The entries of rows idx in a medium's per-entry inputs, for the rows of idx that have it.

    Entries exist only for the rows whose prompts hold the placeholder `token_id`, in row order,
    so a row's entry is its rank among those rows."""
    has = (input_ids == token_id).any(1)  # (N,)
    entry = has.cumsum(0) - 1  # (N,) the entry of each row that has the medium
    return entry[idx][has[idx]].tolist()


def select(model, inputs, idx):
    """Rows idx (a LongTensor) of the expanded inputs, with their own media entries."""
    ids = inputs["input_ids"]
    entries = {
        "video": row_entries(ids, model.config.video_token_id, idx),
        "audio": row_entries(ids, model.config.audio_token_id, idx),
    }
    out = {}
    for key, value in inputs.items():
        if key == "prompt_positions":
            out[key] = value[:, idx]
        elif key not in MEDIUM:
            out[key] = value[idx] if torch.is_tensor(value) else value
        elif not entries[MEDIUM[key]]:
            # none of these rows has the medium: the key stays out
            continue
        elif key == "mm_encoder_outputs":
            pooled = value["video"].pooler_output
            picked = tuple(pooled[i] for i in entries["video"])
            out[key] = {"video": BaseModelOutputWithPooling(pooler_output=picked)}
        elif key == "audio_features":
            out[key] = tuple(value[i] for i in entries["audio"])
        else:
            out[key] = value[entries[MEDIUM[key]]]
    return out


# ---------------------------------------------------------------- scoring: log pi(o_t | x, o_<t)
@contextmanager
def audio_features(model, features):
    """Write precomputed audio-tower outputs into the <|AUDIO|> positions of the token embeddings.

    This is what the thinker's forward does with `input_features`, minus the tower: a clip's
    audio is encoded once and shared by its G rows. `features` holds one (tokens_k, D) tensor per
    row with audio, in row order (None: a no-op). Decode steps of generate carry no audio token
    and are not searched for one (no GPU sync per token).
    """
    if features is None:
        yield
        return
    source = torch.cat(features)  # (audio tokens of all rows, D)

    def write(module, args, out):
        # a decode step (one position after the cached prompt) holds no audio token, as media
        # tokens are never sampled: no count, which would wait for the GPU at every token
        if args[0].shape[1] == 1:
            return out
        where = args[0] == model.config.audio_token_id  # (n, S)
        count = int(where.sum())
        if count != len(source):
            raise ValueError(f"{count} audio positions but {len(source)} audio features")
        return out.masked_scatter(where.unsqueeze(-1), source.to(out.dtype))

    handle = model.get_input_embeddings().register_forward_hook(write)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def lm_head_rows(model, n):
    """Make the LM head see only the last n positions: logits for completion tokens only.

    A 4.5k-token omni prompt times a 152k vocabulary is 2.7 GB of fp32 logits per sequence
    (docs/performance.md); the thinker's forward has no `logits_to_keep`, so a pre-hook slices
    the hidden states before the projection. n = 1 during generate (only the next token is
    sampled).
    """

    def last_positions(module, args):
        return (args[0][:, -n:],)

    handle = model.lm_head.register_forward_pre_hook(last_positions)
    try:
        yield
    finally:
        handle.remove()


def selective_log_softmax(logits, ids, chunk=8, entropy=False):
    """log softmax(logits)[ids], (N, C), without materialising the whole log-softmax; rows in
    chunks. entropy=True also returns each position's entropy -sum_w p(w) log p(w), (N, C)."""
    out = []
    entropies = []
    for logits_chunk, ids_chunk in zip(logits.split(chunk), ids.split(chunk)):
        logits_chunk = logits_chunk.float()  # (n, C, V)
        picked = logits_chunk.gather(-1, ids_chunk.unsqueeze(-1)).squeeze(-1)  # (n, C)
        log_z = torch.logsumexp(logits_chunk, -1)  # (n, C)
        out.append(picked - log_z)
        if entropy:
            log_p = logits_chunk - log_z.unsqueeze(-1)  # (n, C, V)
            entropies.append(-(log_p.exp() * log_p).sum(-1))  # (n, C)
    if entropy:
        return torch.cat(out), torch.cat(entropies)
    return torch.cat(out)  # (N, C)


def logprobs(model, inputs, completion_ids, micro_batch=None, entropy=False):
    """log pi(o_t | x, o_<t) for every completion token, (N, C).

    `inputs` are the N prompt rows (left-padded, from `expand`); the completion is appended
    right-padded, so the logits of completion token t sit at position P - 1 + t. Gradient flows
    when the caller enables it; masked and reference passes call this under torch.no_grad().
    micro_batch: rows per forward (None: all N in one). entropy=True also returns the entropy of
    each position's next-token distribution, (N, C) (variants/masked_grad.py).
    """
    N, C = completion_ids.shape
    size = micro_batch or N
    out = []
    for start in range(0, N, size):
        rows = select(model, inputs, torch.arange(start, min(start + size, N)))
        completion = completion_ids[start : start + size]  # (n, C)
        ids = torch.cat([rows["input_ids"], completion], 1)  # (n, P + C)
        attention = torch.cat([rows["attention_mask"], torch.ones_like(completion)], 1)
        prompt_positions = rows.pop("prompt_positions", None)  # (3, n, P)
        if prompt_positions is not None:
            # the completion is text after the prompt: max + 1, max + 2, ...
            first = prompt_positions.amax((0, 2))[:, None] + 1  # (n, 1)
            after = first + torch.arange(C, device=prompt_positions.device)  # (n, C)
            after = after.expand(3, -1, -1)  # (3, n, C)
            rows["position_ids"] = torch.cat([prompt_positions, after], 2)  # (3, n, P + C)
        rows["input_ids"] = ids
        rows["attention_mask"] = attention
        features = rows.pop("audio_features", None)
        with lm_head_rows(model, C + 1), audio_features(model, features):
            logits = model(**rows).logits[:, :-1]  # (n, C, V)
        out.append(selective_log_softmax(logits, completion, entropy=entropy))
    if entropy:
        logp, entropies = zip(*out)
        return torch.cat(logp), torch.cat(entropies)  # (N, C) each
    return torch.cat(out)  # (N, C)
