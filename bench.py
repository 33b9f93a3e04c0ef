"""Benchmark: what an OPPO step costs against plain GRPO, where its time goes, and PERF.md's levers.

    python bench.py                               # CPU: tiny thinker, B=4, G=8, 64 tokens; all sections
    python bench.py --only step,levers --steps 7  # sections: step, levers, scaling
    python bench.py --config 7b --B 1 --tokens 512 --frames 8 --size 756   # GPU: Qwen2.5-Omni-7B shape

It times the training code itself (train.oppo_step; rollout's generate and scoring): medians after a
warm-up, configurations interleaved (A B C A B C ...), ratios taken pair by pair so load drift hits all
alike; counts from forward hooks are exact. Rows run to the token cap (min_new_tokens): equal work.
"""

import argparse
import contextlib
import os
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

import data
import model as policy_lib
import parallel
import perception_loss
import reward
import rollout
import synth
import train
from flops import lm_shape, peak, step_flops

# Qwen2.5-Omni-{7B,3B} thinkers (their config.json); the vision and audio towers are alike in both.
REAL = {
    "7b": dict(
        hidden_size=3584,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        intermediate_size=18944,
        vocab_size=152064,
    ),
    "3b": dict(
        hidden_size=2048,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        intermediate_size=11008,
        vocab_size=151936,
    ),
}
VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    fullatt_block_indexes=[7, 15, 23, 31],
)
AUDIO = dict(
    num_mel_bins=128,
    encoder_layers=32,
    encoder_attention_heads=20,
    encoder_ffn_dim=5120,
    d_model=1280,
)


# ---------------------------------------------------------------- 1. counts, clock, memory
def count_hooks(n, **models):
    """Hooks adding to n["update" under grad, else tag]: tower calls, clips; LM forwards, tokens; head rows."""

    def add(tag, **kv):
        n["update" if torch.is_grad_enabled() else tag].update(kv)

    for tag, m in models.items():
        for part, mod, size in (
            ("vision", m.model.visual, lambda kw: len(kw["grid_thw"])),
            ("audio", m.model.audio_tower, lambda kw: len(kw["feature_lens"])),
            ("lm", m.model.language_model, lambda kw: kw["inputs_embeds"].shape[:2].numel()),
        ):
            mod.register_forward_pre_hook(
                lambda mod, args, kw, tag=tag, p=part, size=size: add(
                    tag, **{f"{p}_calls": 1, f"{p}_{'tokens' if p == 'lm' else 'clips'}": size(kw)}
                ),
                with_kwargs=True,
            )
        m.lm_head.register_forward_hook(
            lambda mod, args, out, tag=tag: add(tag, head_rows=out.shape[:-1].numel())
        )


def clock():  # GPU work is asynchronous: wait for it before reading the clock
    return (torch.cuda.synchronize() if torch.cuda.is_available() else None) or time.perf_counter()


def timed(ctx, fn):
    """Seconds, peak memory in MB (CUDA allocated; on a CPU the resident set's peak) and counts of fn()."""
    ctx.n.clear()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text(
            "5"
        )  # Linux: the peak resident set (VmHWM) restarts from now
    t0 = clock()
    fn()
    return {
        "t": clock() - t0,
        "peak_mb": torch.cuda.max_memory_allocated() / 2**20
        if torch.cuda.is_available()
        else int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 1024,
        **{f"{b}.{k}": v for b, c in ctx.n.items() for k, v in c.items()},
    }


# ---------------------------------------------------------------- 2. setup
def real_config(name, tokenizer):
    """Thinker config of Qwen2.5-Omni-3B/7B's shapes around this tokenizer's special-token ids."""
    from transformers import Qwen2_5OmniThinkerConfig

    tiny, r = policy_lib.tiny_config(tokenizer).to_dict(), REAL[name]
    text = {
        **{k: v for k, v in tiny["text_config"].items() if k != "layer_types"},
        **r,
        "head_dim": 128,
        "max_position_embeddings": 32768,
        "rope_parameters": dict(rope_theta=1e6, mrope_section=[16, 24, 24]),
    }
    return Qwen2_5OmniThinkerConfig(
        **{
            **tiny,
            "text_config": text,
            "audio_config": {**tiny["audio_config"], **AUDIO, "output_dim": r["hidden_size"]},
            "vision_config": {
                **tiny["vision_config"],
                **VISION,
                "out_hidden_size": r["hidden_size"],
            },
        }
    )


def setup(a):
    """Process group, 8-frame world and tiny thinker (built in --out when absent), reference, optimizer."""
    if not dist.is_initialized():  # train.oppo_step sums its counts over ranks: one rank here
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    out, device = Path(a.out), "cuda" if torch.cuda.is_available() else "cpu"
    synth.ensure_world(
        out / "synth", n_train=max(12, 3 * a.B), n_val=1, n_test=1, frames=8, size=a.size
    )
    recs = [
        r
        for r in data.load_manifest(out / "synth" / "train.jsonl")
        if r.get("video") and r.get("audio")
    ]
    if (
        a.config
    ):  # random weights of the real shapes; the tiny processor, with 128 mel bins and big frames
        from transformers import (
            Qwen2_5OmniThinkerForConditionalGeneration as Thinker,
        )
        from transformers import (
            WhisperFeatureExtractor,
        )

        processor = policy_lib.tiny_processor(data.corpus(recs))
        processor.feature_extractor = WhisperFeatureExtractor(
            feature_size=128, chunk_length=2, sampling_rate=16000
        )
        processor.video_processor.size = {"shortest_edge": 56 * 56, "longest_edge": a.size**2}
        with torch.device(device):
            policy, ref = (
                Thinker(real_config(a.config, processor.tokenizer)).to(torch.bfloat16)
                for _ in range(2)
            )
    else:
        if not (out / "tiny" / "config.json").exists():
            policy_lib.build_tiny(out / "tiny", seed=0, corpus=data.corpus(recs))
        (policy, processor), ref = (
            policy_lib.load_policy(out / "tiny"),
            policy_lib.load_policy(out / "tiny")[0],
        )
    parallel.shard(
        policy.train(), device, False, bool(a.config)
    )  # one process: moved; a 7B also checkpointed
    parallel.shard(ref.requires_grad_(False), device)
    targs = train.Args(
        **{
            **train.CPU,
            "batch": a.B,
            "G": a.G,
            "max_new_tokens": a.tokens,
            "micro_batch": a.B,
            "beta": a.beta,
            "frames": a.frames,
        }
    )  # the CPU profile; one micro-batch of all B clips
    optim = (torch.optim.SGD if a.config else torch.optim.AdamW)(
        policy.parameters(), lr=targs.lr
    )  # 7B: no state
    ctx = argparse.Namespace(
        a=a,
        targs=targs,
        policy=policy,
        ref=ref,
        processor=processor,
        recs=recs,
        optim=optim,
        matcher=reward.Matcher(),
        n=defaultdict(Counter),
    )
    count_hooks(ctx.n, policy=policy, ref=ref)
    ctx.batch, ctx.media = batch_for(ctx, a.frames)
    return ctx


def batch_for(ctx, frames):
    """B clips with video and audio (cycled if the world has fewer), processed, on the model's device."""
    recs = [ctx.recs[i % len(ctx.recs)] for i in range(ctx.a.B)]
    return recs, {
        k: v.to(ctx.policy.device) if torch.is_tensor(v) else v
        for k, v in data.encode(ctx.processor, recs, frames=frames).items()
    }


# ---------------------------------------------------------------- 3. one real step; A/B interleaving
def timed_step(ctx, i, batch=None, media=None, every_token=False, **over):
    """train.oppo_step, then clip and optimizer step as train.py does; `over` replaces train.Args fields.
    every_token: route every completion token to both modalities, so both masked passes score all rows."""
    targs, batch, media, m = replace(ctx.targs, **over), batch or ctx.batch, media or ctx.media, {}
    ctx.policy.generation_config.min_new_tokens = targs.max_new_tokens
    route = perception_loss.evidence_masks

    def step():
        perception_loss.evidence_masks = (
            (lambda tok, ids, mask, sims: (mask, mask)) if every_token else route
        )
        try:
            m.update(
                train.oppo_step(
                    targs, ctx.policy, ctx.ref, ctx.processor, ctx.matcher, batch, media, None, 1, i
                )
            )
        finally:
            perception_loss.evidence_masks = route
        m["t"] = clock()
        torch.nn.utils.clip_grad_norm_(ctx.policy.parameters(), targs.grad_clip)
        ctx.optim.step()
        ctx.optim.zero_grad(set_to_none=True)

    r, N, prompt = (
        timed(ctx, step),
        len(batch) * targs.G,
        float(media["attention_mask"].sum()) * targs.G,
    )
    r.update(
        step=r.pop("t"),
        optim=clock() - m["t"],
        reward=m["time/reward"],
        update=m["time/update"],
        masked=m.get("time/masked", 0),
        masked_rows=m.get("masked_rows", 0),
        C=r["update.head_rows"] / N - 1,
        **{k: m[f"time/rollout_{k}"] for k in ("generate", "ref")},
    )
    flops = [
        m["flops"],
        step_flops(ctx.policy, N, prompt, m["tokens"], 0, generate=False),
    ]  # the step, its update
    r.update(
        scoring_over_update=(r["ref"] + r["masked"]) / r["update"],
        tok_per_s=m["tokens"] / r["step"],
        gflop_per_s=flops[0] / r["step"] / 1e9,
        update_mfu=flops[1] / r["update"] / (peak() or float("nan")),
        padding=1 - (prompt + m["tokens"]) / (N * (media["input_ids"].shape[1] + r["C"])),
    )
    # a decode step reads every LM weight and the K, V cached so far; the generate time includes the prefill
    text, (n, layers, d, head) = ctx.policy.config.text_config, lm_shape(ctx.policy)
    kv = (
        2 * layers * d * text.num_key_value_heads // text.num_attention_heads
    )  # numbers cached a token
    rate = (n + head + kv * N * (media["input_ids"].shape[1] + r["C"] / 2)) * r["C"] / r["generate"]
    rate *= next(ctx.policy.parameters()).element_size()  # bytes/s
    r.update(decode_GBps=rate / 1e9, decode_bw=rate / (peak(1) or float("nan")))
    return r


def interleave(fns, warmup, reps):
    """{name: fn(i)} round-robin, warmup + reps rounds; {name: [results after the warm-up]}."""
    out = {k: [] for k in fns}
    for i in range(warmup + reps):
        for k, fn in fns.items():
            out[k].append(fn(i))
    return {k: v[warmup:] for k, v in out.items()}


def med(rs, key):
    return statistics.median(r.get(key, 0) for r in rs)


def paired(runs, a, b, key="t"):  # the median over rounds of b/a, each pair measured side by side
    return statistics.median(y[key] / x[key] for x, y in zip(runs[a], runs[b]))


# ---------------------------------------------------------------- 4. the levers
def bench_levers(ctx):
    """PERF.md's levers, A pulled and B not, interleaved; rollout.py pulls them all."""
    a, p, media, G, tok = ctx.a, ctx.policy, ctx.media, ctx.a.G, ctx.processor.tokenizer
    video, audio = (
        torch.no_grad()(lambda f=f: f(p, media))
        for f in (rollout.encode_video, rollout.encode_audio)
    )
    fresh = lambda g: rollout.expand(
        media, g, video(), audio()
    )  # each tower once a clip, as rollout.py does
    shared, one = fresh(G), fresh(1)
    clips = media["pixel_values_videos"].split(media["video_grid_thw"].prod(-1).tolist())
    per_row = lambda: {
        **rollout.expand(
            {k: v for k, v in media.items() if k != "pixel_values_videos"}, G, None, audio()
        ),
        "pixel_values_videos": torch.cat([c for c in clips for _ in range(G)]),  # a row, its clip
        **{
            k: media[k].repeat_interleave(G, 0) for k in ("video_grid_thw", "video_second_per_grid")
        },
    }
    ids = torch.randint(
        max(tok.all_special_ids) + 1, len(tok), (a.B * G, a.tokens), device=p.device
    )
    p.generation_config.min_new_tokens = a.lever_tokens

    @torch.no_grad()
    def score(
        inputs, head_rows=True
    ):  # rollout.logprobs in one forward; head_rows=False: logits everywhere
        x = {
            **inputs,
            "input_ids": torch.cat([inputs["input_ids"], ids], 1),
            "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(ids)], 1),
        }
        with (
            rollout.lm_head_rows(p, a.tokens + 1) if head_rows else contextlib.nullcontext(),
            rollout.audio_features(p, x.pop("audio_features", None)),
        ):
            return rollout.selective_log_softmax(
                p(**x).logits[:, -a.tokens - 1 : -1], ids
            )  # (N, C)

    def gen(inputs, cache=True):  # cache=False: every decode step re-runs the whole sequence
        p.generation_config.use_cache = cache
        try:
            rollout.generate(p, ctx.processor, inputs, max_new_tokens=a.lever_tokens)
        finally:
            p.generation_config.use_cache = True

    logprobs = torch.no_grad()(
        lambda pos: rollout.logprobs(
            p,
            rollout.expand(  # rotary positions once a clip, or
                media, G, video(), audio(), rollout.positions(p, media) if pos else None
            ),
            ids,
        )
    )  # in every forward, per row
    pairs = {
        "kv_cache": (lambda: gen(shared), lambda: gen(shared, False)),
        "batched_generate": (lambda: gen(shared), lambda: [gen(one) for _ in range(G)]),
        "video_once": (lambda: score(fresh(G)), lambda: score(per_row())),
        "lm_head_rows": (lambda: score(shared), lambda: score(shared, head_rows=False)),
        "audio_once": (lambda: score(fresh(G)), lambda: score(rollout.expand(media, G, video()))),
        "positions_once": (lambda: logprobs(True), lambda: logprobs(False)),
    }
    return {
        k: interleave(
            {"A": lambda i, f=f: timed(ctx, f), "B": lambda i, g=g: timed(ctx, g)}, 1, a.reps
        )
        for k, (f, g) in pairs.items()
    }


# ---------------------------------------------------------------- 5. command line and report
def table(title, runs, keys):
    print(
        f"\n{title}: medians of {len(next(iter(runs.values())))} interleaved rounds, load {os.getloadavg()[0]:.1f}"
        f"\n{'':>16}" + "".join(f"{k:>12.11}" for k in keys)
    )
    for name, rs in runs.items():
        print(f"{str(name):>16}" + "".join(f"{med(rs, k):>12.4g}" for k in keys))
    for name, rs in runs.items():  # the same in every round
        print(f"  {name}:", {k: v for k, v in rs[-1].items() if "." in k})


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ints = lambda s: [int(x) for x in s.split(",")]
    for name, default, kind, text in (
        ("only", "step,levers,scaling", str, "sections to run"),
        ("config", "", str, "3b|7b, GPU only"),
        (
            "out",
            "runs/bench",
            str,
            "directory of the tiny thinker and the world, built when absent",
        ),
        ("B", 4, int, "clips per step"),
        ("G", 8, int, "completions per clip"),
        ("beta", 0.04, float, "KL weight"),
        ("tokens", 64, int, "completion tokens a row"),
        ("frames", 4, int, "frames per clip"),
        ("size", 56, int, "frame side in px of a new world (756: ~360 tokens a frame, as Qwen's)"),
        ("steps", 5, int, "timed steps per configuration"),
        ("reps", 3, int, "rounds per lever, scaling point"),
        ("lever_tokens", 16, int, "tokens in the generate levers"),
        ("warmup", 1, int, "untimed rounds first"),
        (
            "threads",
            1,
            int,
            "CPU threads (2 stall on a core another job holds: 5-30x slower steps here)",
        ),
        ("scale_G", "2,4,8", ints, "G of the scaling table"),
        ("scale_tokens", "16,32,64", ints, "token caps"),
        ("scale_frames", "4,8", ints, "frame counts of the scaling table"),
    ):
        p.add_argument("--" + name, default=default, type=kind, help=f"{text} (default: {default})")
    a, cuda = p.parse_args(argv), torch.cuda.is_available()
    torch.set_num_threads(a.threads)
    if (
        a.config not in ("", *REAL) or a.config and not cuda
    ):  # a random 3B/7B thinker is not run on a CPU
        raise SystemExit(
            f"bench.py --config {a.config}: 3b or 7b, on a CUDA GPU only (GPUs here: {int(cuda)})"
        )
    only, res, ctx = a.only.split(","), {}, setup(a)
    print(
        f"bench.py: B={a.B} G={a.G} tokens={a.tokens} frames={a.frames} beta={a.beta}; load {os.getloadavg()[0]:.1f},"
        f" {torch.get_num_threads()}/{os.cpu_count()} threads; {torch.cuda.get_device_name() if cuda else 'CPU'}"
    )
    if (
        "step" in only
    ):  # GRPO, OPPO, OPPO with beta = 0, OPPO with every token routed: one configuration
        cfg = {
            "grpo": dict(perception_reward=False, perception_loss=False),
            "oppo": {},
            "oppo_beta0": dict(beta=0.0),
            "oppo_every_token": dict(every_token=True),
        }  # both masked passes on all N rows: their upper bound
        runs = res["step"] = interleave(
            {k: lambda i, kw=kw: timed_step(ctx, i, **kw) for k, kw in cfg.items()},
            a.warmup,
            a.steps,
        )
        table(
            "Step phases, s",
            runs,
            (
                "step",
                "generate",
                "masked",
                "ref",
                "reward",
                "update",
                "optim",
                "peak_mb",
                "tok_per_s",
                "gflop_per_s",
                "update_mfu",
                "decode_GBps",
                "decode_bw",
                "C",
                "masked_rows",
            ),
        )
        for k in ("oppo", "oppo_every_token"):
            print(
                f"  {k}: OPPO/GRPO step {paired(runs, 'grpo', k, 'step'):.3f} (target <= 1.35); (ref + masked)/update"
                f" {med(runs[k], 'scoring_over_update'):.3f} (target <= 1), masked rows {med(runs[k], 'masked_rows'):g}"
            )
        print(
            f"  beta = 0 / beta > 0 {paired(runs, 'oppo', 'oppo_beta0', 'step'):.3f}; padding "
            f"{med(runs['oppo'], 'padding'):.1%}"
        )
    if "levers" in only:
        res["levers"] = lev = bench_levers(ctx)
        for k, runs in lev.items():
            table(
                f"Lever {k}: A used, B not, B/A = {paired(runs, 'A', 'B'):.2f}",
                runs,
                ("t", "peak_mb"),
            )
    if "scaling" in only:  # one knob at a time around the default
        batches = {f: batch_for(ctx, f) for f in set(a.scale_frames) | {a.frames}}
        grid = dict.fromkeys(
            [(g, a.tokens, a.frames) for g in a.scale_G]
            + [(a.G, c, a.frames) for c in a.scale_tokens]
            + [(a.G, a.tokens, f) for f in a.scale_frames]
        )
        res["scaling"] = interleave(
            {
                k: lambda i, k=k: timed_step(ctx, i, *batches[k[2]], G=k[0], max_new_tokens=k[1])
                for k in grid
            },
            1,
            a.reps,
        )
        table(
            "OPPO by (G, tokens, frames), s",
            res["scaling"],
            ("step", "generate", "masked", "ref", "update", "C"),
        )
    return res


if __name__ == "__main__":
    main()
