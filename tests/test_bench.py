"""bench.py at a toy size: every count of a GRPO and an OPPO step and of the levers against the
formula written out here; the FLOP counter (flops.py) against its formula; the 3B/7B shapes; and the FSDP2
lever (2 gloo ranks): generate gathers each unit once inside rollout.unsharded, per forward without.

Run as a script under torchrun, this file is that 2-rank worker and prints its timings:
    python -m torch.distributed.run --nproc_per_node=2 tests/test_bench.py runs/bench B G TOKENS
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench  # noqa: E402
import data  # noqa: E402
import flops  # noqa: E402
import model as policy_lib  # noqa: E402
import rollout  # noqa: E402

B, G, C, T = (
    2,
    2,
    6,
    3,
)  # clips, completions per clip, completion tokens, tokens in the generate levers


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("bench")
    shutil.copytree(
        tiny_dir, out / "tiny"
    )  # the session's tiny thinker; bench.py builds its 8-frame world
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
        torch.set_num_threads(
            threads
        )  # bench.py runs on one thread; the rest of the session keeps its own
        if (
            dist.is_initialized()
        ):  # bench.py's one-process group must not meet train.py's in a later test
            dist.destroy_process_group()
    processor = policy_lib.load_policy(out / "tiny")[1]
    recs = [
        r
        for r in data.load_manifest(out / "synth" / "train.jsonl")
        if r.get("video") and r.get("audio")
    ]
    P = data.encode(processor, recs[:B], frames=4)["input_ids"].shape[
        1
    ]  # the batch's padded prompt length
    return out, res, P


def test_step_counts(run):
    """Each tower runs once a clip per pass (B clips, not B*G); the LM head sees completion positions
    only (C + 1 a row), one LM forward per scoring pass, C in generate. The masked passes score the
    rows with evidence: none from a random thinker (no reasoning), all N when every token is routed."""
    _, res, P = run
    N = B * G
    for name, r in ((k, rs[0]) for k, rs in res["step"].items()):
        assert r["C"] == C and all(r[k] > 0 for k in ("step", "generate", "update", "peak_mb")), (
            name
        )
        masked = (
            name == "oppo_every_token"
        )  # x\v (video re-encoded, audio shared), x\a (the other way round)
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
        assert name != "oppo_beta0" or not any(
            k.startswith("ref.") for k in r
        )  # beta = 0: no reference forward


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
    assert lev["kv_cache"]["A"]["policy.lm_tokens"] == N * P + N * (
        T - 1
    )  # the prompt once, then a token a step
    assert lev["kv_cache"]["B"]["policy.lm_tokens"] == sum(
        N * (P + t) for t in range(T)
    )  # no cache: all again
    assert (
        "policy.audio_calls" not in lev["kv_cache"]["B"]
    )  # the shared audio features: no tower in generate
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
    model = policy_lib.load_policy(tiny_dir)[0]
    lm = model.model.language_model
    n = sum(p.numel() for p in lm.layers.parameters()) + sum(
        p.numel() for p in lm.norm.parameters()
    )
    text, H = model.config.text_config, model.lm_head.weight.numel()
    d, L = text.hidden_size, text.num_hidden_layers
    assert flops.lm_shape(model) == (n, L, d, H)
    rows, prompt, comp = 8, 800, 160  # T = 120: train once, 3 scoring passes + generate
    want = (
        (6 * n + 12 * L * d * 120) * 960
        + (2 * n + 4 * L * d * 120) * 4 * 960
        + 6 * H * (comp + rows)
        + 2 * H * (3 * (comp + rows) + comp)
    )
    assert flops.step_flops(model, rows, prompt, comp, 3) == pytest.approx(want)


@pytest.mark.parametrize(
    "name, layers, d, kv, ff, vocab",
    [("7b", 28, 3584, 4, 18944, 152064), ("3b", 36, 2048, 2, 11008, 151936)],
)
def test_real_shapes(tiny_dir, name, layers, d, kv, ff, vocab):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    tok = policy_lib.load_policy(tiny_dir)[1].tokenizer
    with torch.device("meta"):  # shapes only, no memory
        model = Qwen2_5OmniThinkerForConditionalGeneration(bench.real_config(name, tok))
    kv_dim = kv * 128
    layer = (
        (d * d + d) + 2 * (d * kv_dim + kv_dim) + d * d + 3 * d * ff + 2 * d
    )  # q, k, v (biased), o, MLP, norms
    assert flops.lm_shape(model) == (layers * layer + d, layers, d, vocab * d)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_real_config_refuses_without_gpu():
    with pytest.raises(SystemExit, match="CUDA GPU"):
        bench.main(["--config", "7b"])


def test_fsdp_unsharded_gathers_once(run):
    """FSDP2 units: 2 decoder layers, vision, audio, root. Generating T tokens re-gathers the layers
    and the root at every forward unless rollout.unsharded (the towers ran before: features shared)."""
    out = run[0]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29613",
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
    assert (res["per_forward"]["gathers"], res["unsharded"]["gathers"]) == ((2 + 1) * T, 5)
    print(f"\nFSDP2 generate (2 gloo ranks, B={B} G={G}, {T} tokens): {res}")


def fsdp_worker(out, b, g, tokens):
    """Rank r of 2: median seconds and parameter all-gathers of generate with and without unsharded."""
    import data
    import parallel

    dist.init_process_group("gloo")
    torch.set_num_threads(1)  # one core each
    policy, processor = policy_lib.load_policy(Path(out) / "tiny")
    parallel.shard(
        policy
    )  # FSDP2 units: each decoder layer, the vision tower, the audio tower, the root
    recs = [
        r
        for r in data.load_manifest(Path(out) / "synth" / "train.jsonl")
        if r.get("video") and r.get("audio")
    ]
    media = data.encode(processor, recs[:b], frames=4)
    ctx, gather = argparse.Namespace(n=defaultdict(Counter)), dist.all_gather_into_tensor
    bench.count_hooks(ctx.n, policy=policy)
    dist.all_gather_into_tensor = lambda *x, **kw: (
        ctx.n["fsdp"].update(gathers=1) or gather(*x, **kw)
    )  # FSDP2's
    policy.generation_config.min_new_tokens = tokens
    with torch.no_grad():
        inputs = rollout.expand(
            media, g, rollout.encode_video(policy, media), rollout.encode_audio(policy, media)
        )

    def gen(unshard):
        with rollout.unsharded(policy) if unshard else torch.no_grad():
            rollout.generate(policy, processor, inputs, max_new_tokens=tokens)

    runs = bench.interleave(
        {
            "per_forward": lambda i: bench.timed(ctx, lambda: gen(False)),
            "unsharded": lambda i: bench.timed(ctx, lambda: gen(True)),
        },
        1,
        3,
    )
    if dist.get_rank() == 0:
        print(
            json.dumps(
                {
                    k: {"t": bench.med(rs, "t"), "gathers": rs[-1]["fsdp.gathers"]}
                    for k, rs in runs.items()
                }
            )
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    fsdp_worker(sys.argv[1], *map(int, sys.argv[2:5]))
