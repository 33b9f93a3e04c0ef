"""The levers of docs/performance.md, each timed pulled (A) and undone (B), rounds interleaved.

thinker/scoring.py and rollout.py pull every lever; here each one is undone alone:
  kv_cache          generate with the KV cache, or re-running the whole sequence every step
  batched_generate  one generate of the G rows of every clip, or G generates of one row a clip
  video_once        the video tower once a clip, its features shared by the clip's G rows,
                    or once a row
  lm_head_rows      the LM head on the completion positions only, or on every position
  audio_once        the audio tower once a clip, or once a row
  positions_once    the rotary positions once a clip, or in every forward
"""

import contextlib
from functools import partial

import torch

import rollout
from thinker import encoders, scoring
from tools.measure import interleave, timed_round


class Levers:
    """What the levers run, on the bench's policy and batch of B clips, G rows a clip."""

    def __init__(self, ctx):
        args = ctx.args
        self.policy = ctx.policy
        self.processor = ctx.processor
        self.media = ctx.media
        self.G = args.G
        self.tokens = args.tokens
        self.lever_tokens = args.lever_tokens
        self.shared = self.fresh(self.G)
        self.one = self.fresh(1)
        grid = self.media["video_grid_thw"]  # (B, 3)
        # each clip's rows of pixel_values_videos
        self.clips = self.media["pixel_values_videos"].split(grid.prod(-1).tolist())
        tokenizer = ctx.processor.tokenizer
        # the completions scored: random ordinary (not special) tokens, `tokens` a row
        self.ids = torch.randint(  # (N, C)
            max(tokenizer.all_special_ids) + 1,
            len(tokenizer),
            (args.B * self.G, self.tokens),
            device=self.policy.device,
        )

    @torch.no_grad()
    def encode_video(self):
        return encoders.encode_video(self.policy, self.media)

    @torch.no_grad()
    def encode_audio(self):
        return encoders.encode_audio(self.policy, self.media)

    def fresh(self, g):
        """g rows a clip sharing its features, each tower run once a clip (as thinker/scoring)."""
        return scoring.expand(self.media, g, self.encode_video(), self.encode_audio())

    def video_per_row(self):
        """G rows a clip, each with its own copy of the clip's video: the tower runs once a row."""
        without_video = {k: v for k, v in self.media.items() if k != "pixel_values_videos"}
        rows = scoring.expand(without_video, self.G, None, self.encode_audio())
        # a row's pixels are its clip's
        row_clips = [clip for clip in self.clips for _ in range(self.G)]
        rows["pixel_values_videos"] = torch.cat(row_clips)
        for key in ("video_grid_thw", "video_second_per_grid"):
            rows[key] = self.media[key].repeat_interleave(self.G, 0)
        return rows

    def audio_per_row(self):
        """G rows a clip without audio features: the audio tower runs once a row."""
        return scoring.expand(self.media, self.G, self.encode_video())

    @torch.no_grad()
    def score(self, inputs, head_rows=True):
        """scoring.logprobs in one forward, (N, C); head_rows=False: the LM head everywhere."""
        completion_mask = torch.ones_like(self.ids)  # (N, C)
        x = {
            **inputs,
            "input_ids": torch.cat([inputs["input_ids"], self.ids], 1),
            "attention_mask": torch.cat([inputs["attention_mask"], completion_mask], 1),
        }
        if head_rows:
            head = scoring.lm_head_rows(self.policy, self.tokens + 1)
        else:
            head = contextlib.nullcontext()
        audio = x.pop("audio_features", None)
        with head, scoring.audio_features(self.policy, audio):
            logits = self.policy(**x).logits[:, -self.tokens - 1 : -1]  # (N, C, V)
            return scoring.selective_log_softmax(logits, self.ids)  # (N, C)

    def score_fresh(self):
        return self.score(self.fresh(self.G))

    def score_video_per_row(self):
        return self.score(self.video_per_row())

    def score_audio_per_row(self):
        return self.score(self.audio_per_row())

    def generate(self, inputs, cache=True):
        """One generate of lever_tokens tokens; cache=False re-runs the whole sequence each step."""
        config = self.policy.generation_config
        config.use_cache = cache
        try:
            rollout.generate(self.policy, self.processor, inputs, max_new_tokens=self.lever_tokens)
        finally:
            config.use_cache = True

    def generate_each(self):
        """G generates of one row a clip: the same G rows a clip, unbatched."""
        for _ in range(self.G):
            self.generate(self.one)

    @torch.no_grad()
    def logprobs(self, positions_once):
        """scoring.logprobs of fresh rows, their rotary positions given once a clip or not at all
        (then computed in every forward, per row)."""
        video = self.encode_video()
        audio = self.encode_audio()
        positions = None
        if positions_once:
            positions = scoring.positions(self.policy, self.media)
        rows = scoring.expand(self.media, self.G, video, audio, positions)
        return scoring.logprobs(self.policy, rows, self.ids)


def bench_levers(ctx):
    """Every lever, A pulled and B undone, interleaved: {lever: {"A": [round, ...], "B": [...]}}."""
    levers = Levers(ctx)
    ctx.policy.generation_config.min_new_tokens = ctx.args.lever_tokens
    shared = levers.shared
    pairs = {
        "kv_cache": (
            partial(levers.generate, shared),
            partial(levers.generate, shared, cache=False),
        ),
        "batched_generate": (partial(levers.generate, shared), levers.generate_each),
        "video_once": (levers.score_fresh, levers.score_video_per_row),
        "lm_head_rows": (
            partial(levers.score, shared),
            partial(levers.score, shared, head_rows=False),
        ),
        "audio_once": (levers.score_fresh, levers.score_audio_per_row),
        "positions_once": (partial(levers.logprobs, True), partial(levers.logprobs, False)),
    }
    results = {}
    for name, (pulled, undone) in pairs.items():
        rounds = {
            "A": partial(timed_round, ctx.counts, pulled),
            "B": partial(timed_round, ctx.counts, undone),
        }
        results[name] = interleave(rounds, 1, ctx.args.reps)
    return results
