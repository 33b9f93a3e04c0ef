"""Evaluation: emotion recognition and MEP-Bench-style modality utilization and faithfulness.

docs/method.md, section 7. Each record is answered with the full input, the video fully masked
and the audio fully masked, greedily and by K sampled completions. Full input: WAR / UAR,
MER-UniBench-style HIT, open-vocabulary P / R / F, sentiment WAF / accuracy, utilization U^m;
faithfulness per clip: F^m under x\\m where m carried cues, F_absent^m under x where m is absent.
The metrics themselves are in metrics/, reports in metrics/report.py.
Commands:
  python eval.py --model runs/oppo/oppo/final --data runs/synth/test.jsonl --out runs/eval/o.json
  torchrun --nproc_per_node=8 eval.py --model DIR --data test.jsonl --out ours.json --bf16
  python eval.py --compare base.json ours.json --plot compare.png
A train.py export (`<out>/<stage>/final`) is evaluated with the frames, completion cap, tau,
theta, label space and embedder of its run (`<out>/<stage>/args.json`); a flag given wins; a
checkpoint without a run takes runtime/eval_flags.py's DEFAULTS (the 3B/7B recipe's). The label
space is then --labels, else labels.json beside --data, else the built-in one.
"""

import math
import os
import sys
from argparse import RawDescriptionHelpFormatter
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import HfArgumentParser

import data
import reward
import rollout
from corpora import labels as label_spaces
from matching.matcher import Matcher
from metrics import perception, recognition, report
from runtime import eval_flags, parallel, preflight, rundir
from thinker import batching, encoders, model, scoring

# each run of a record: the modality its input has masked
MASKS = {"full": None, "no_video": "video", "no_audio": "audio"}


# ---------------------------------------------------------------- scoring
def score(records, texts, matcher, theta=0.6, tau=0.5, wheels=None, samples=None, labels=None):
    """The report of completions `texts` = {"full", "no_video", "no_audio"} -> list[str], the
    greedy answers, and `samples`, the same keys -> K sampled completions per record (None: the
    greedy answers stand in for them).

    Each list is aligned with `records`. Cues are recovered from the full run's greedy answers;
    every completion's sentences about a modality are found against the dataset's whole cue
    inventory (metrics.perception.describes). Answers and labels are read in the label space
    `labels` (corpora/labels.py; None: the built-in one).
    """
    if any(len(texts.get(run, ())) != len(records) for run in MASKS):
        raise ValueError(
            f"eval.score: texts needs keys {list(MASKS)}, each one completion per record"
        )
    if samples is None:
        samples = {run: [[text] for text in texts[run]] for run in MASKS}
    cues = [r.get("cues") or {} for r in records]
    inventory = perception.cue_inventory(cues)
    full = matcher.similarities(texts["full"], cues)
    greedy = {run: [[text] for text in texts[run]] for run in MASKS}
    greedy_sims = perception.inventory_similarities(matcher, greedy, inventory)
    sampled_sims = perception.inventory_similarities(matcher, samples, inventory)
    rows = []
    for i, record in enumerate(records):
        row = {
            "label": record["label"],
            "valence": record.get("valence"),
            "format": reward.format_reward(texts["full"][i]),
            "answer": {run: reward.extract_answer(texts[run][i]) for run in MASKS},
            "has": {sense: bool(cues[i].get(sense)) for sense in perception.SENSES},
            "u": {
                sense: perception.recovered_share(full[i].S[sense], theta)
                for sense in perception.SENSES
            },
            "claims": {
                run: perception.claims(greedy_sims[run][i][0], tau) for run in perception.CLAIMED
            },
        }
        for kind, completions, sims in (
            ("greedy", greedy, greedy_sims),
            ("sampled", samples, sampled_sims),
        ):
            row[kind] = {}
            for run in MASKS:
                pairs = zip(completions[run][i], sims[run][i])
                row[kind][run] = [perception.describes(text, sim, tau) for text, sim in pairs]
        rows.append(row)
    result = report.summarize(rows, wheels, labels)
    return result | report.breakdown(records, rows, texts, wheels, labels)


# ---------------------------------------------------------------- generation
def evaluate(
    policy,
    processor,
    records,
    matcher,
    batch_size=32,
    max_new_tokens=64,
    theta=0.6,
    tau=0.5,
    frames=4,
    progress=True,
    samples=4,
    temperature=1.0,
    top_p=1.0,
    seed=0,
    wheels=None,
    labels=None,
):
    """Answer every record under the three inputs, greedy and by `samples` sampled completions
    (`answer`), and score them (`score`).

    Under torch.distributed rank 0 scores (only it needs a matcher) and every rank returns the
    same report. `wheels`: see metrics.recognition.load_wheels; `labels`: the label space.
    """
    sampling = dict(
        samples=samples,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        seed=seed,
    )
    texts, sampled = answer(policy, processor, records, batch_size, frames, progress, sampling)
    scored = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        scored = [score(records, texts, matcher, theta, tau, wheels, sampled, labels)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(scored, src=0)
    result = scored[0]
    space = (labels or label_spaces.BUILTIN).name
    settings = dict(n=len(records), theta=theta, tau=tau, frames=frames, labels=space)
    result["settings"] = settings | sampling | {"wheels": len(wheels or [])}
    return result


def answer(policy, processor, records, batch_size, frames, progress, sampling):
    """({run: the greedy completion of each record}, {run: its `samples` sampled completions}
    or None when samples is 0) for the runs of MASKS. sampling: samples, temperature, top_p,
    max_new_tokens, and the seed of the sampled ones, drawn in a forked random state so that an
    evaluation never moves a training run's random stream.

    Under torch.distributed, rank r answers records[r::world]: every rank makes the same number
    of generate calls (generate is collective under FSDP) and the texts are all-gathered.
    """
    rank, world = 0, 1
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    shard = records[rank::world]
    steps = math.ceil(len(records) / (world * batch_size))
    answers = {kind: {run: [] for run in MASKS} for kind in ("greedy", "sampled")}
    param = next(policy.parameters())
    devices = [param.device] if param.device.type == "cuda" else []
    with parallel.unsharded(policy), rollout.sampling_mode(policy):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(sampling["seed"])
            for step in tqdm(range(steps), desc="eval", disable=not progress or rank != 0):
                batch_records = shard[step * batch_size : (step + 1) * batch_size]
                answered = len(batch_records)
                # a rank out of records still joins the collective generate, on a stand-in record
                batch = batching.encode(processor, batch_records or records[:1], frames=frames)
                for run, modality in MASKS.items():
                    inputs = batch
                    if modality is not None:
                        inputs = batching.mask_modality(batch, modality, rho=1.0, seed=0)
                    completions = answer_batch(
                        policy, processor, batching.to_policy(inputs, param), sampling
                    )
                    for kind, texts in completions.items():
                        answers[kind][run] += texts[:answered]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, answers)
        # record i was the (i // world)-th answer of rank i % world
        for kind, runs in answers.items():
            for run in runs:
                runs[run] = [parts[i % world][kind][run][i // world] for i in range(len(records))]
    return answers["greedy"], answers["sampled"] if sampling["samples"] else None


def answer_batch(policy, processor, inputs, sampling):
    """{"greedy": one completion per record, "sampled": K of them per record (empty lists when
    K = 0)} of a processed batch on the policy's device."""
    video = encoders.encode_video(policy, inputs)
    K = sampling["samples"]
    generate = dict(max_new_tokens=sampling["max_new_tokens"])
    # G = 1: one row a record
    _, _, greedy = rollout.generate(
        policy, processor, scoring.expand(inputs, 1, video), greedy=True, **generate
    )
    sampled = [[] for _ in greedy]
    if K:
        generate.update(temperature=sampling["temperature"], top_p=sampling["top_p"])
        # K rows a record, record b's rows b * K to b * K + K - 1
        rows = scoring.expand(inputs, K, video, encoders.encode_audio(policy, inputs))
        _, _, texts = rollout.generate(policy, processor, rows, **generate)
        sampled = [texts[b * K : (b + 1) * K] for b in range(len(greedy))]
    return {"greedy": greedy, "sampled": sampled}


# ---------------------------------------------------------------- command line
def evaluate_model(args):
    """The report of the policy --model on the manifest --data, under torchrun on every rank."""
    # under torchrun each rank answers its shard; the group follows train.py's device rule
    _, _, device = parallel.init()
    space = data.label_space(args.labels, args.data)
    # on_error="raise": a DataError names file:line; audio past the processor's window is counted
    window = preflight.audio_window(args.model)
    loaded = data.load_manifest(args.data, on_error="raise", audio_window=window, labels=space)
    records = loaded[: args.limit or None]
    if not records:
        sys.exit(f"eval.py: --data {args.data}: the manifest holds no records")
    if loaded.truncated_audio and dist.get_rank() == 0:
        print(
            f"eval.py: --data {args.data}: {loaded.truncated_audio} of {len(loaded)} records have "
            f"audio longer than the processor's {window:g} s window; only their first "
            f"{window:g} s are heard"
        )
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    policy, processor = model.load_policy(args.model, dtype=dtype)
    wheels = recognition.load_wheels(args.wheels) if args.wheels else None
    result = evaluate(
        policy.to(device),
        processor,
        records,
        Matcher(args.embedder or None),
        batch_size=args.batch_size,
        samples=args.samples,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        theta=args.theta,
        tau=args.tau,
        frames=args.frames,
        temperature=args.temperature,
        top_p=args.top_p,
        wheels=wheels,
        labels=space,
    )
    result["settings"].update(model=str(args.model), data=str(args.data))
    result["settings"]["truncated_audio"] = loaded.truncated_audio
    return result


def main(argv=None):
    parser = HfArgumentParser(
        eval_flags.Args, description=__doc__, formatter_class=RawDescriptionHelpFormatter
    )
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    if args.compare:
        reports = [report.load(path) for path in args.compare]
        names = [Path(path).stem for path in args.compare]
    elif not args.model or not args.data:
        parser.error("--model and --data are required (or --compare REPORT ...)")
    else:
        rundir.from_run(args, args.model, eval_flags.DEFAULTS)
        # before the evaluation: where its results go must be writable (rank 0 writes them)
        if int(os.environ.get("RANK", 0)) == 0:
            for flag, path in (("--out", args.out), ("--plot", args.plot)):
                problem = report.unwritable(path) if path else None
                if flag == "--plot" and path and not problem:
                    problem = report.unplottable(path)
                if problem:
                    parser.error(f"{flag} {path} {problem}")
        try:
            reports = [evaluate_model(args)]
        finally:
            # the group evaluate_model made goes with it, also when it fails
            if dist.is_initialized():
                dist.destroy_process_group()
        names = [Path(args.model).name]
    if int(os.environ.get("RANK", 0)) == 0:
        # the table first: a failed write loses no result
        print(report.table(*reports, names=names))
        if args.out and not args.compare:
            report.save(reports[0], args.out)
        if args.plot:
            report.plot(reports, names, args.plot)


if __name__ == "__main__":
    main()
