"""tools/bench.py at a toy size: every count of a GRPO and an OPPO step and of the levers against
the formula written out here; the FLOP counter (runtime/flops.py) against its formula; the 3B/7B
shapes; and the FSDP2 lever (2 gloo ranks): generate gathers each unit once inside
parallel.unsharded, per forward without.

Run as a script under torchrun, this file is that 2-rank worker and prints its timings:
    python -m torch.distributed.run --nproc_per_node=2 tests/test_bench.py runs/bench B G TOKENS
"""

import json
import os
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import rollout  # noqa: E402
from runtime import flops  # noqa: E402
from thinker import batching, encoders, model, scoring  # noqa: E402
from tools import bench, measure, shapes  # noqa: E402

# clips, completions per clip, completion tokens, tokens in the generate levers
B, G, C, T = 2, 2, 6, 3


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("bench")
    # the session's tiny thinker; tools/bench.py builds its 8-frame world
    shutil.copytree(tiny_dir, out / "tiny")
    threads = torch.get_num_threads()
    try:
        res = bench.main(
            [
                "--out",
                str(out),
                "--B",
                str(B),
                "--G",
                str(G),
                "--tokens",
                str(C),
                "--steps",
                "1",
                "--warmup",
                "0",
                "--reps",
                "1",
                "--lever_tokens",
                str(T),
                "--only",
                "step,levers",
            ]
        )
    finally:
        # tools/bench.py runs on one thread; the rest of the session keeps its own
        torch.set_num_threads(threads)
        # tools/bench.py's one-process group must not meet train.py's in a later test
        if dist.is_initialized():
            dist.destroy_process_group()
    processor = model.load_policy(out / "tiny")[1]
    manifest = data.load_manifest(out / "synth" / "train.jsonl")
    recs = [r for r in manifest if r.get("video") and r.get("audio")]
    # the batch's padded prompt length
    P = batching.encode(processor, recs[:B], frames=4)["input_ids"].shape[1]
    return out, res, P


def test_step_counts(run):
    """Each tower runs once a clip per pass (B clips, not B*G); the LM head sees completion
    positions only (C + 1 a row), one LM forward per scoring pass, C in generate. The masked passes
    score the rows with evidence: none from a random thinker (no reasoning), all N when every
    token is routed."""
    _, res, P = run
    N = B * G
    for name, r in ((k, rs[0]) for k, rs in res["step"].items()):
        assert r["C"] == C and all(r[k] > 0 for k in ("step", "generate", "update", "peak_mb")), (
            name
        )
        # x\v (video re-encoded, audio shared), x\a (the other way round)
        masked = name == "oppo_every_token"
        assert r["masked_rows"] == 2 * N * masked, name
        want = {
            "policy.vision_calls": 1 + masked,
            "policy.vision_clips": B * (1 + masked),
            "policy.audio_calls": 1 + masked,
            "policy.audio_clips": B * (1 + masked),
            "policy.lm_calls": C + 2 * masked,
            "policy.lm_tokens": N * P + N * (C - 1) + 2 * masked * N * (P + C),
            "policy.head_rows": N * C + 2 * masked * N * (C + 1),
            "update.vision_clips": B,
            "update.audio_clips": B,
            "update.lm_calls": 1,
            "update.lm_tokens": N * (P + C),
            "update.head_rows": N * (C + 1),
        }
        if name != "oppo_beta0":
            want.update(
                {
                    "ref.vision_clips": B,
                    "ref.audio_clips": B,
                    "ref.lm_calls": 1,
                    "ref.head_rows": N * (C + 1),
                }
            )
        assert {k: r.get(k) for k in want} == want, name
        # beta = 0: no reference forward
        assert name != "oppo_beta0" or not any(k.startswith("ref.") for k in r)


def test_lever_counts(run):
    (_, res, P), N = run, B * G
    lev = {k: {ab: rs[0] for ab, rs in v.items()} for k, v in res["levers"].items()}
    # video encoded once a clip and shared by its rows (B clips), or once a row (N)
    assert (
        lev["video_once"]["A"]["policy.vision_clips"],
        lev["video_once"]["B"]["policy.vision_clips"],
    ) == (B, N)
    assert (
        lev["lm_head_rows"]["A"]["policy.head_rows"],
        lev["lm_head_rows"]["B"]["policy.head_rows"],
    ) == (N * (C + 1), N * (P + C))
    # the prompt once, then a token a step
    assert lev["kv_cache"]["A"]["policy.lm_tokens"] == N * P + N * (T - 1)
    # no cache: all again
    assert lev["kv_cache"]["B"]["policy.lm_tokens"] == sum(N * (P + t) for t in range(T))
    # the shared audio features: no tower in generate
    assert "policy.audio_calls" not in lev["kv_cache"]["B"]
    calls = [lev["batched_generate"][ab]["policy.lm_calls"] for ab in "AB"]
    assert calls == [T, G * T]  # one batched generate vs G calls of B rows
    assert (
        lev["audio_once"]["A"]["policy.audio_clips"],
        lev["audio_once"]["B"]["policy.audio_clips"],
    ) == (B, N)
    assert (
        lev["positions_once"]["A"]["policy.lm_tokens"]
        == lev["positions_once"]["B"]["policy.lm_tokens"]
        == N * (P + C)
    )


def test_lm_flops_is_the_formula():
    n, L, d, Tt, Ts, S, H, rt, rs = 1000, 3, 16, 10, 20, 40, 500, 4, 6
    want = (
        6 * n * Tt + 12 * L * d * S * Tt + 2 * n * Ts + 4 * L * d * S * Ts + 6 * H * rt + 2 * H * rs
    )
    assert flops.lm_flops(n, L, d, Tt, Ts, S, H, rt, rs) == want


def test_step_flops_and_shapes(tiny_dir):
    policy = model.load_policy(tiny_dir)[0]
    lm = policy.model.language_model
    layer_params = sum(p.numel() for p in lm.layers.parameters())
    n = layer_params + sum(p.numel() for p in lm.norm.parameters())
    text, H = policy.config.text_config, policy.lm_head.weight.numel()
    d, L = text.hidden_size, text.num_hidden_layers
    assert flops.lm_shape(policy) == (n, L, d, H)
    rows, prompt, comp = 8, 800, 160  # T = 120: train once, 3 scoring passes + generate
    want = (
        (6 * n + 12 * L * d * 120) * 960
        + (2 * n + 4 * L * d * 120) * 4 * 960
        + 6 * H * (comp + rows)
        + 2 * H * (3 * (comp + rows) + comp)
    )
    assert flops.step_flops(policy, rows, prompt, comp, 3) == pytest.approx(want)


@pytest.mark.parametrize(
    "name, layers, d, kv, ff, vocab",
    [("7b", 28, 3584, 4, 18944, 152064), ("3b", 36, 2048, 2, 11008, 151936)],
)
def test_real_shapes(tiny_dir, name, layers, d, kv, ff, vocab):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    tok = model.load_policy(tiny_dir)[1].tokenizer
    with torch.device("meta"):  # shapes only, no memory
        thinker = Qwen2_5OmniThinkerForConditionalGeneration(shapes.real_config(name, tok))
    kv_dim = kv * 128
    # q, k, v (biased), o, MLP, norms
    layer = (d * d + d) + 2 * (d * kv_dim + kv_dim) + d * d + 3 * d * ff + 2 * d
    assert flops.lm_shape(thinker) == (layers * layer + d, layers, d, vocab * d)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_real_config_refuses_without_gpu():
    with pytest.raises(SystemExit, match="CUDA GPU"):
        bench.main(["--config", "7b"])


def test_fsdp_unsharded_gathers_once(run):
    """FSDP2 units: 2 decoder layers, vision, audio, root. Generating T tokens re-gathers the
    layers at every forward unless parallel.unsharded (the towers ran before: features shared);
    the root keeps its parameters gathered after a forward, as FSDP2 leaves a root and
    unsharded gives back, so it is gathered once a round, and not at all by an unsharded round
    that follows a per-forward one (the rounds alternate)."""
    # imported here: run as the torchrun worker, this file needs nothing of train_runs
    from train_runs import free_port

    out = run[0]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            __file__,
            str(out),
            str(B),
            str(G),
            str(T),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert (res["per_forward"]["gathers"], res["unsharded"]["gathers"]) == (2 * T + 1, 5 - 1)
    print(f"\nFSDP2 generate (2 gloo ranks, B={B} G={G}, {T} tokens): {res}")


def fsdp_worker(out, b, g, tokens):
    """Rank r of 2: median seconds and parameter all-gathers of generate, with and without
    parallel.unsharded."""
    import data
    from runtime import parallel

    dist.init_process_group("gloo")
    torch.set_num_threads(1)  # one core each
    policy, processor = model.load_policy(Path(out) / "tiny")
    # FSDP2 units: each decoder layer, the vision tower, the audio tower, the root
    parallel.shard(policy)
    manifest = data.load_manifest(Path(out) / "synth" / "train.jsonl")
    recs = [r for r in manifest if r.get("video") and r.get("audio")]
    media = batching.encode(processor, recs[:b], frames=4)
    counts = defaultdict(Counter)
    measure.count_hooks(counts, policy=policy)
    gather = dist.all_gather_into_tensor

    def counted_gather(*args, **kwargs):
        counts["fsdp"].update(gathers=1)
        return gather(*args, **kwargs)

    # FSDP2 gathers a unit's parameters with dist.all_gather_into_tensor: count its calls
    dist.all_gather_into_tensor = counted_gather
    policy.generation_config.min_new_tokens = tokens
    with torch.no_grad():
        inputs = scoring.expand(
            media, g, encoders.encode_video(policy, media), encoders.encode_audio(policy, media)
        )

    def gen(unshard):
        # the same samples every round: a sampled stop string would end a round early, with
        # fewer forwards and gathers than the next
        torch.manual_seed(dist.get_rank())
        with parallel.unsharded(policy) if unshard else torch.no_grad():
            rollout.generate(policy, processor, inputs, max_new_tokens=tokens)

    rounds = {
        "per_forward": partial(measure.timed_round, counts, partial(gen, False)),
        "unsharded": partial(measure.timed_round, counts, partial(gen, True)),
    }
    runs = measure.interleave(rounds, 1, 3)
    if dist.get_rank() == 0:
        summary = {}
        for name, rs in runs.items():
            summary[name] = {"t": measure.med(rs, "t"), "gathers": rs[-1]["fsdp.gathers"]}
        print(json.dumps(summary))
    dist.destroy_process_group()


if __name__ == "__main__":
    fsdp_worker(sys.argv[1], *map(int, sys.argv[2:5]))
