"""Evaluation: emotion recognition and MEP-Bench-style modality utilization and faithfulness.

SPEC.md section 7. Each record is answered (greedy by default) with the full input, the video
fully masked and the audio fully masked. Full input: WAR / UAR, MER-UniBench-style HIT,
open-vocabulary P / R / F, sentiment WAF / accuracy, utilization U^m; with m masked: WAR and
faithfulness F^m = 1 - CHAIR^m. Commands:
  python eval.py --model runs/tiny --data runs/synth/test.jsonl --out runs/eval/tiny.json
  torchrun --nproc_per_node=8 eval.py --model DIR --data test.jsonl --out ours.json --bf16
  python eval.py --compare base.json ours.json --plot compare.png
"""

import argparse
import inspect
import json
import math
import os
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import model as policy_lib
import perception_loss
import reward
import rollout

SENSES = ("visual", "acoustic")
MASKS = {"full": None, "no_video": "video", "no_audio": "audio"}  # run -> modality masked
CLAIMED = {
    "no_video": "visual",
    "no_audio": "acoustic",
}  # masked run -> the claims it must not make
VALENCE = {
    "happy": 1,
    "surprise": 0,
    "neutral": 0,
    "sad": -1,
    "angry": -1,
    "worried": -1,
}  # surprise: flat face
KEYS = (
    "war",
    "uar",
    "hit",
    "ov_f",
    "sent_waf",
    "sent_acc",
    "format",
    "war_no_video",
    "war_no_audio",
    "U_visual",
    "U_acoustic",
    "U",
    "F_visual",
    "F_acoustic",
    "F",
)
_WORD_SEP = re.compile(r"[,;/，、；]|\band\b")


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def clusters(text, wheel=None):
    """Normalised emotion words (wheel clusters if given) of an answer or label: str (split at , ; / and) or list."""
    words = text if isinstance(text, (list, tuple)) else _WORD_SEP.split(text or "")
    return {c for c in (reward.normalize_emotion(w, wheel) for w in words if w and w.strip()) if c}


# ---------------------------------------------------------------- recognition
def war_uar(preds, labels):
    """Closed-set WAR = accuracy and UAR = mean over the classes present in the ground truth of
    the per-class recall (the DFEW / MAFW / RAVDESS protocol). Both sides go through
    reward.normalize_emotion; an unparseable answer (None) is wrong; a list label counts as its first word."""
    one = lambda x: reward.normalize_emotion(x if isinstance(x, str) else x[0]) if x else None
    gold, pred = [one(x) for x in labels], [one(x) for x in preds]
    right = [p is not None and p == g for p, g in zip(pred, gold, strict=True)]
    recall = {
        c: _mean([r for r, g in zip(right, gold) if g == c]) for c in sorted(set(gold) - {None})
    }
    return {"war": _mean(right), "uar": _mean(recall.values()), "recall": recall}


def hit_rate(preds, labels, wheel=None):
    """MER-UniBench basic-emotion HIT (AffectGPT, Lian et al. 2025): share of samples (neutral ground
    truth excluded) where any predicted word falls in a ground-truth cluster. Returns (hit | None, n)."""
    hits = [
        bool(clusters(p, wheel) & clusters(l, wheel))
        for p, l in zip(preds, labels)
        if clusters(l) - {"neutral"}
    ]
    return _mean(hits), len(hits)


def open_vocab_prf(preds, labels, wheel=None):
    """MER-UniBench open-vocabulary scores (AffectGPT): per sample precision |G & P| / |P| (0 when
    nothing is predicted) and recall |G & P| / |G|, each averaged over the samples with a
    ground truth, then F = 2PR / (P + R). Returns (P, R, F, n)."""
    pr = [
        (len(g & p) / len(p) if p else 0.0, len(g & p) / len(g))
        for g, p in ((clusters(l, wheel), clusters(a, wheel)) for a, l in zip(preds, labels))
        if g
    ]
    P, R = _mean([x for x, _ in pr]), _mean([y for _, y in pr])
    F = None if P is None else 2 * P * R / (P + R) if P + R else 0.0
    return P, R, F, len(pr)


def sentiment(preds, labels, valences=None):
    """MER-UniBench sentiment (AffectGPT): on the samples whose ground-truth valence is non-zero
    (a record's numeric "valence", else the sum of its label's VALENCE over clusters(), unknown
    words 0), ground truth positive iff > 0, prediction positive iff its valence > 0. Returns
    (WAF, accuracy, n), WAF the support-weighted mean F1 of both classes, as AffectGPT computes it
    (sklearn f1_score, average="weighted")."""
    from sklearn.metrics import (
        accuracy_score,
        f1_score,
    )  # scikit-learn comes with sentence-transformers

    valence = lambda text: sum(VALENCE.get(c, 0) for c in clusters(text))
    vals = [
        valence(l) if v is None else v for l, v in zip(labels, valences or [None] * len(labels))
    ]
    pairs = [(v > 0, valence(p) > 0) for p, v in zip(preds, vals) if v != 0]  # (gold, pred)
    if not pairs:
        return None, None, 0
    g, p = zip(*pairs)
    return (
        float(f1_score(g, p, average="weighted", zero_division=0)),
        float(accuracy_score(g, p)),
        len(g),
    )


def load_wheels(directory):
    """Emotion wheels: every wheel*.csv in `directory` (AffectGPT has 5), sorted by name, each a
    dict word -> cluster from `word,cluster` (or tab-separated) lines; blank lines and # comments
    are skipped (a `word,cluster` header is harmless). For AffectGPT's emotion_wheel/, one file per wheel."""
    files, wheels = sorted(Path(directory).glob("wheel*.csv")), []
    if not files:
        raise FileNotFoundError(f"eval.load_wheels: no wheel*.csv in {directory}")
    for f in files:
        wheels.append({})
        for n, line in enumerate(f.read_text().splitlines(), 1):
            word, *cluster = [c.strip() for c in re.split(r"[,\t]", line)]
            if word and not word.startswith("#"):
                if len(cluster) != 1 or not cluster[0]:
                    raise ValueError(
                        f"eval.load_wheels: {f}:{n}: expected `word,cluster`, got {line!r}"
                    )
                wheels[-1][reward._clean(word)] = reward._clean(
                    cluster[0]
                )  # cleaned as normalize_emotion does
    return wheels


# ---------------------------------------------------------------- MEP-Bench: utilization, faithfulness
def recovered_share(S, theta=0.6):
    """MEP-Bench-style utilization of one sample (SPEC section 7): the share of its cues (columns of S,
    (K clauses, J cues)) some reasoning clause matches at cosine >= theta; None without cues, 0 without clauses."""
    hit = (S.max(dim=0).values >= theta).float() if S.shape[0] else torch.zeros(S.shape[1])  # (J,)
    return hit.mean().item() if S.shape[1] else None


def chair(counts, m):
    """CHAIR^m (Rohrbach et al. 2018, by modality) over the run with m masked: #m-claims / #(visual +
    acoustic claims), 0 without claims. Returns (CHAIR, F = 1 - CHAIR, CHAIR_s: share of samples with an m-claim)."""
    total = sum(c["visual"] + c["acoustic"] for c in counts)
    c = sum(x[m] for x in counts) / total if total else 0.0
    return c, 1.0 - c, _mean([x[m] > 0 for x in counts])


# ---------------------------------------------------------------- scoring, generation
def summarize(rows, wheels=None):
    """Every metric and count over per-sample rows (built by `score`)."""
    labels, ans = [r["label"] for r in rows], [r["answer"]["full"] for r in rows]
    rec = war_uar(ans, labels)
    # AffectGPT scores with each emotion wheel and averages; no wheels: the built-in synonym map
    hits, prfs = (
        [fn(ans, labels, wheel=w) for w in wheels or [None]] for fn in (hit_rate, open_vocab_prf)
    )
    hit, (P, R, F) = _mean([h[0] for h in hits]), (_mean([x[k] for x in prfs]) for k in range(3))
    counts = dict(
        n=len(rows), answered=sum(a is not None for a in ans), hit=hits[0][1], open_vocab=prfs[0][3]
    )
    waf, s_acc, counts["sentiment"] = sentiment(ans, labels, [r["valence"] for r in rows])
    m = {
        "war": rec["war"],
        "uar": rec["uar"],
        "hit": hit,
        "ov_precision": P,
        "ov_recall": R,
        "ov_f": F,
        "sent_waf": waf,
        "sent_acc": s_acc,
        "format": _mean([r["format"] for r in rows]),
        **{
            f"war_{run}": war_uar([r["answer"][run] for r in rows], labels)["war"]
            for run in CLAIMED
        },
    }
    for s in SENSES:
        shares = [r["u"][s] for r in rows if r["u"][s] is not None]
        m[f"U_{s}"], counts[f"U_{s}"] = _mean(shares), len(shares)
    for run, s in CLAIMED.items():
        m[f"CHAIR_{s}"], m[f"F_{s}"], m[f"CHAIR_s_{s}"] = chair([r["claims"][run] for r in rows], s)
        counts[f"claims_{run}"] = {c: sum(r["claims"][run][c] for r in rows) for c in SENSES}
    m["U"], m["F"] = (
        _mean([m["U_visual"], m["U_acoustic"]]),
        _mean([m["F_visual"], m["F_acoustic"]]),
    )
    return {"metrics": m, "counts": counts, "recall": rec["recall"]}


def score(records, texts, matcher, theta=0.6, tau=0.5, wheels=None, n_examples=3):
    """The report for completions texts = {"full", "no_video", "no_audio"} -> list[str] aligned with
    `records`. Claims are routed against the whole dataset's visual and acoustic cue inventory."""
    if any(len(texts.get(run, ())) != len(records) for run in MASKS):
        raise ValueError(
            f"eval.score: texts needs keys {list(MASKS)}, each one completion per record"
        )
    cues = [r.get("cues") or {} for r in records]
    inventory = {m: sorted({c for x in cues for c in x.get(m) or []}) for m in SENSES}
    full = matcher.similarities(texts["full"], cues)
    masked = {run: matcher.similarities(texts[run], [inventory] * len(records)) for run in CLAIMED}
    route = lambda sim: perception_loss.route_clauses(
        sim.S["visual"], sim.S["acoustic"], tau
    )  # Eq. (9)
    claims = lambda sim: {m: route(sim).count(m) for m in SENSES}
    rows = [
        {
            "label": r["label"],
            "valence": r.get("valence"),
            "format": reward.format_reward(texts["full"][i]),
            "answer": {run: reward.extract_answer(texts[run][i]) for run in MASKS},
            "u": {m: recovered_share(full[i].S[m], theta) for m in SENSES},
            "claims": {run: claims(masked[run][i]) for run in CLAIMED},
        }
        for i, r in enumerate(records)
    ]
    report = summarize(rows, wheels)
    scenarios = sorted(
        {str(r["scenario"]) for r in records if "scenario" in r}
    )  # synthetic world only
    report["per_scenario"] = {
        s: summarize([row for row, r in zip(rows, records) if str(r.get("scenario")) == s], wheels)
        for s in scenarios
    }
    report["examples"] = [
        {"id": r.get("id"), "label": r["label"], **{run: texts[run][i] for run in MASKS}}
        for i, r in enumerate(records[:n_examples])
    ]
    return report


def evaluate(
    model,
    processor,
    records,
    matcher,
    batch_size=32,
    greedy=True,
    max_new_tokens=64,
    theta=0.6,
    tau=0.5,
    frames=4,
    progress=True,
    temperature=1.0,
    top_p=1.0,
    wheels=None,
):
    """Answer every record under the three inputs (rollout.generate, G = 1) and score them.

    Under torch.distributed, rank r answers records[r::world]: every rank makes the same number of
    generate calls (generate is collective under FSDP), the texts are all-gathered, rank 0 scores
    (only it needs a matcher) and every rank returns the same report. `wheels`: see load_wheels."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    shard, steps, texts = (
        records[rank::world],
        math.ceil(len(records) / (world * batch_size)),
        {r: [] for r in MASKS},
    )
    param, was_training = next(model.parameters()), model.training
    move = lambda b: {
        k: v.to(
            param.device, param.dtype if k in ("pixel_values_videos", "input_features") else None
        )
        if torch.is_tensor(v)
        else v
        for k, v in b.items()
    }
    model.eval()
    with rollout.unsharded(model):
        for s in tqdm(range(steps), desc="eval", disable=not progress or rank != 0):
            recs = shard[s * batch_size : (s + 1) * batch_size]
            real, recs = (
                len(recs),
                recs or records[:1],
            )  # a rank out of records still joins the collective
            batch = data.encode(processor, recs, frames=frames)  # CPU tensors
            for run, m in MASKS.items():
                b = move(batch if m is None else data.mask_modality(batch, m, rho=1.0, seed=0))
                out = rollout.generate(
                    model,
                    processor,
                    rollout.expand(b, 1, rollout.encode_video(model, b)),
                    temperature,
                    top_p,
                    max_new_tokens,
                    greedy,
                )
                texts[run] += out[2][:real]
    model.train(was_training)
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, texts)
        texts = {
            run: [parts[i % world][run][i // world] for i in range(len(records))] for run in MASKS
        }
    out = [score(records, texts, matcher, theta, tau, wheels) if rank == 0 else None]
    dist.broadcast_object_list(out, src=0) if world > 1 else None
    out[0]["settings"] = dict(
        n=len(records),
        greedy=greedy,
        temperature=temperature,
        top_p=top_p,
        theta=theta,
        tau=tau,
        max_new_tokens=max_new_tokens,
        frames=frames,
        wheels=len(wheels or []),
    )
    return out[0]


# ---------------------------------------------------------------- reports: save, read, compare, plot
def summary(report):
    """The headline metrics of a report, flat."""
    return {k: report["metrics"].get(k) for k in KEYS}


def save_report(report, path):
    """Write the JSON report atomically: a temporary file, then a rename."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{path}.tmp").write_text(json.dumps(report, indent=2))
    os.replace(f"{path}.tmp", path)


def read_report(path):
    """A report written by save_report; exits with a message naming the file when it is not one."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        sys.exit(f"eval.py: report {path}: cannot be read as JSON ({e})")
    if not isinstance(report, dict) or not isinstance(report.get("metrics"), dict):
        sys.exit(f"eval.py: report {path}: no 'metrics' object, not an eval.py report")
    return report


def table(*reports, names=None):
    """Markdown table of the headline metrics, one column per report."""
    names, cell = (
        names or [f"report {i}" for i in range(len(reports))],
        lambda v: "-" if v is None else f"{v:.3f}",
    )
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    return "\n".join(
        lines
        + [f"| {k} | " + " | ".join(cell(summary(r)[k]) for r in reports) + " |" for k in KEYS]
    )


def plot(reports, names, path):
    """Grouped bar chart of the headline metrics, one bar per report, written to `path` (PNG)."""
    from matplotlib.figure import Figure  # no pyplot: the Agg canvas, no GUI, no global state

    ax = Figure(figsize=(max(8.0, 0.5 * len(KEYS) * len(reports)), 4)).subplots()
    width = 0.8 / len(reports)
    for i, (r, name) in enumerate(zip(reports, names)):
        ax.bar(
            [k + i * width for k in range(len(KEYS))],
            [summary(r)[k] or 0.0 for k in KEYS],
            width,
            label=name,
        )
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(KEYS))], KEYS, rotation=45, ha="right")
    ax.set(ylim=(0, 1), title="eval.py (a missing metric is drawn as 0)")
    ax.legend()
    ax.figure.savefig(path, bbox_inches="tight")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="policy directory (model.load_policy)")
    p.add_argument("--data", help="JSONL manifest (data.load_manifest)")
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N records (0: all)")
    knobs = {
        k: v.default
        for k, v in inspect.signature(evaluate).parameters.items()
        if type(v.default) in (int, float)
    }
    for k, v in knobs.items():  # evaluate()'s numeric arguments, same names and defaults
        p.add_argument(
            f"--{k.replace('_', '-')}", type=type(v), default=v, help=f"evaluate({k}=...)"
        )
    p.add_argument(
        "--sample", action="store_true", help="sample (--temperature, --top-p), not greedy"
    )
    p.add_argument("--wheels", help="directory of emotion-wheel files (load_wheels)")
    p.add_argument("--embedder", help="sentence-embedding model dir (default all-MiniLM-L6-v2)")
    p.add_argument("--bf16", action="store_true", help="load the policy in bfloat16")
    p.add_argument(
        "--compare", nargs="+", metavar="REPORT", help="print these reports side by side"
    )
    p.add_argument("--plot", help="write a bar chart of the report(s) to this PNG")
    args = p.parse_args(argv)
    if args.compare:
        reports, names = (
            [read_report(f) for f in args.compare],
            [Path(f).stem for f in args.compare],
        )
    elif not args.model or not args.data:
        p.error("--model and --data are required (or --compare REPORT ...)")
    else:
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # torchrun: each rank answers its shard
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        device = torch.device(
            f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
        )
        records = data.load_manifest(args.data, on_error="raise")[
            : args.limit or None
        ]  # DataError names file:line
        if not records:
            sys.exit(f"eval.py: --data {args.data}: the manifest holds no records")
        policy, processor = policy_lib.load_policy(
            args.model, dtype=torch.bfloat16 if args.bf16 else torch.float32
        )
        report = evaluate(
            policy.to(device),
            processor,
            records,
            reward.Matcher(args.embedder),
            greedy=not args.sample,
            wheels=load_wheels(args.wheels) if args.wheels else None,
            **{k: getattr(args, k) for k in knobs},
        )
        report["settings"].update(model=str(args.model), data=str(args.data))
        reports, names = [report], [Path(args.model).name]
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_report(reports[0], args.out) if args.out and not args.compare else None
        print(table(*reports, names=names))
        plot(reports, names, args.plot) if args.plot else None
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
