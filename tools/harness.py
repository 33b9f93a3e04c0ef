"""The bench's harness: the two thinkers, the batch, and one real OPPO step, timed and counted.

tools/bench.py runs it under its sections; the measuring itself is tools/measure.py.
"""

import contextlib
import unittest.mock
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist

import data
import perception_loss
import train
from matching.matcher import Matcher
from runtime import config, parallel
from runtime.flops import lm_shape, peak, step_flops
from synthetic import tiny, world
from thinker import batching, model
from tools.measure import clock, count_hooks, timed
from tools.shapes import real_config


# ---------------------------------------------------------------- setup
@dataclass
class Bench:
    """What every measurement shares."""

    # the command line, tools.bench.Args
    args: object
    train_args: config.Args
    policy: torch.nn.Module
    ref: torch.nn.Module
    processor: object
    records: list
    optim: torch.optim.Optimizer
    matcher: Matcher
    # defaultdict(Counter) filled by the forward hooks of tools/measure.py
    counts: defaultdict
    # the B records of a step, and their processed batch on the policy's device
    batch: list = field(default_factory=list)
    media: dict = field(default_factory=dict)


def thinkers(args, records, device):
    """(policy, reference, processor): random weights of a real config's shapes with the tiny
    processor (128 mel bins, big frames), the export in --init, or the tiny thinker in --out
    (built when absent)."""
    out = Path(args.out)
    if args.init and args.config:
        raise SystemExit("tools/bench.py: --init and --config exclude each other")
    if args.init:
        policy, processor = model.load_policy(args.init)
        ref = model.load_policy(args.init)[0]
        return policy, ref, processor
    if not args.config:
        if not (out / "tiny" / "config.json").exists():
            tiny.build_tiny(out / "tiny", seed=0, corpus=batching.corpus(records))
        policy, processor = model.load_policy(out / "tiny")
        ref = model.load_policy(out / "tiny")[0]
        return policy, ref, processor
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration as Thinker
    from transformers import WhisperFeatureExtractor

    processor = tiny.tiny_processor(batching.corpus(records))
    processor.feature_extractor = WhisperFeatureExtractor(
        feature_size=128, chunk_length=2, sampling_rate=16000
    )
    processor.video_processor.size = {"shortest_edge": 56 * 56, "longest_edge": args.size**2}
    with torch.device(device):
        policy = Thinker(real_config(args.config, processor.tokenizer)).to(torch.bfloat16)
        ref = Thinker(real_config(args.config, processor.tokenizer)).to(torch.bfloat16)
    return policy, ref, processor


def setup(args):
    """Process group, 8-frame world, the two thinkers, optimizer, counting hooks, one batch."""
    # train.oppo_step sums its counts over ranks: a group of one rank
    if not dist.is_initialized():
        parallel.init()
    out = Path(args.out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n_train = max(12, 3 * args.B)
    world.ensure_world(out / "synth", n_train=n_train, n_val=1, n_test=1, frames=8, size=args.size)
    manifest = data.load_manifest(out / "synth" / "train.jsonl")
    records = [r for r in manifest if r.get("video") and r.get("audio")]
    policy, ref, processor = thinkers(args, records, device)
    # one process: moved to the device; a 3B/7B also activation-checkpointed
    parallel.shard(policy.train(), device, False, bool(args.config))
    parallel.shard(ref.requires_grad_(False), device)
    # the CPU profile, with one micro-batch of all B clips; the masked rollouts route their
    # claims against the cue inventory of this world's training manifest
    overrides = {
        "data": str(out / "synth" / "train.jsonl"),
        "batch": args.B,
        "G": args.G,
        "max_new_tokens": args.tokens,
        "micro_batch": args.B,
        "beta": args.beta,
        "frames": args.frames,
    }
    train_args = config.Args(**{**config.CPU, **overrides})
    # a 3B/7B trains with SGD: no optimizer state
    optimizer = torch.optim.SGD if args.config else torch.optim.AdamW
    optim = optimizer(policy.parameters(), lr=train_args.lr)
    counts = defaultdict(Counter)
    matcher = Matcher(args.embedder or None)
    ctx = Bench(args, train_args, policy, ref, processor, records, optim, matcher, counts)
    count_hooks(counts, policy=policy, ref=ref)
    ctx.batch, ctx.media = batch_for(ctx, args.frames)
    return ctx


def batch_for(ctx, frames):
    """B records with video and audio (cycled if the world has fewer) and their processed batch
    on the policy's device."""
    records = [ctx.records[i % len(ctx.records)] for i in range(ctx.args.B)]
    encoded = batching.encode(ctx.processor, records, frames=frames)
    media = {}
    for key, value in encoded.items():
        media[key] = value.to(ctx.policy.device) if torch.is_tensor(value) else value
    return records, media


# ---------------------------------------------------------------- one real step
def every_token_evidence(tokenizer, completion_ids, mask, sims, tau=0.5):
    """Stands in for perception_loss.evidence_masks: every completion token is evidence of both
    modalities, so that both masked passes score all N rows (the upper bound of their cost)."""
    return mask, mask


def timed_step(ctx, i, batch=None, media=None, every_token=False, **over):
    """train.oppo_step, then clip and optimizer step as train.py does; `over` replaces
    config.Args fields. every_token: route every completion token to both modalities."""
    targs = replace(ctx.train_args, **over)
    batch = batch or ctx.batch
    media = media or ctx.media
    policy = ctx.policy
    policy.generation_config.min_new_tokens = targs.max_new_tokens
    step_metrics = {}
    # train.oppo_step has no switch for the every-token upper bound: for this step only, its
    # routing, perception_loss.evidence_masks, is replaced (and restored on leaving the block)
    routing = contextlib.nullcontext()
    if every_token:
        routing = unittest.mock.patch.object(
            perception_loss, "evidence_masks", every_token_evidence
        )

    def step():
        with routing:
            step_metrics.update(
                train.oppo_step(targs, policy, ctx.ref, ctx.processor, ctx.matcher, batch, media, i)
            )
        step_metrics["t"] = clock()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), targs.grad_clip)
        ctx.optim.step()
        ctx.optim.zero_grad(set_to_none=True)

    result = timed(ctx.counts, step)
    N = len(batch) * targs.G
    # the rows sampled under x\v and x\a by --masked_rollouts, and their seconds
    masked_rollout_rows = 0
    masked_rollout_time = 0.0
    for key, value in step_metrics.items():
        if key.startswith("masked_rollouts/") and key.endswith("_rows"):
            masked_rollout_rows += value
        if key.startswith("masked_rollouts/") and key.endswith("_time"):
            masked_rollout_time += value
    prompt = float(media["attention_mask"].sum()) * targs.G
    result.update(
        step=result.pop("t"),
        optim=clock() - step_metrics["t"],
        reward=step_metrics["time/reward"],
        update=step_metrics["time/update"],
        masked=step_metrics.get("time/masked", 0),
        masked_rows=step_metrics.get("masked_rows", 0),
        mr=masked_rollout_time,
        # rows run to the token cap: the update's LM head sees C + 1 positions a row
        C=result["update.head_rows"] / (N + masked_rollout_rows) - 1,
        generate=step_metrics["time/rollout_generate"],
        ref=step_metrics["time/rollout_ref"],
    )
    tokens = step_metrics["tokens"]
    update_flops = step_flops(policy, N, prompt, tokens, 0, generate=False)
    # the padded length of a row: prompt and completion
    length = media["input_ids"].shape[1] + result["C"]
    result.update(
        scoring_over_update=(result["ref"] + result["masked"]) / result["update"],
        tok_per_s=tokens / result["step"],
        gflop_per_s=step_metrics["flops"] / result["step"] / 1e9,
        update_mfu=update_flops / result["update"] / (peak() or float("nan")),
        padding=1 - (prompt + tokens) / (N * length),
    )
    # a decode step reads every LM weight and the K, V cached so far (on average half of the
    # completion past the prompt); the generate time includes the prefill
    text = policy.config.text_config
    n, layers, d, head = lm_shape(policy)
    # numbers cached a token
    kv = 2 * layers * d * text.num_key_value_heads // text.num_attention_heads
    cached = media["input_ids"].shape[1] + result["C"] / 2
    rate = (n + head + kv * N * cached) * result["C"] / result["generate"]
    rate *= next(policy.parameters()).element_size()  # bytes/s
    result.update(decode_GBps=rate / 1e9, decode_bw=rate / (peak(1) or float("nan")))
    return result
