"""Evaluation: emotion recognition and MEP-Bench-style modality utilization and faithfulness.

docs/method.md, section 7. Each record is answered (greedy by default) with the full input, the
video fully masked and the audio fully masked. Full input: WAR / UAR, MER-UniBench-style HIT,
open-vocabulary P / R / F, sentiment WAF / accuracy, utilization U^m; with m masked: WAR and
faithfulness F^m = 1 - CHAIR^m. The metrics themselves are in metrics/, reports in
metrics/report.py.
Commands:
  python eval.py --model runs/tiny --data runs/synth/test.jsonl --out runs/eval/tiny.json
  torchrun --nproc_per_node=8 eval.py --model DIR --data test.jsonl --out ours.json --bf16
  python eval.py --compare base.json ours.json --plot compare.png
"""

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import HfArgumentParser

import data
import reward
import rollout
from matching.matcher import Matcher
from metrics import perception, recognition, report
from runtime import parallel, preflight
from thinker import batching, model, scoring

# each run of a record: the modality its input has masked
MASKS = {"full": None, "no_video": "video", "no_audio": "audio"}
# the media features, cast to the policy's dtype (bfloat16 under --bf16); ids and masks keep theirs
FEATURES = ("pixel_values_videos", "input_features")


# ---------------------------------------------------------------- scoring
def score(records, texts, matcher, theta=0.6, tau=0.5, wheels=None, n_examples=3):
    """The report of completions `texts` = {"full", "no_video", "no_audio"} -> list[str].

    Each list is aligned with `records`. Cues are recovered from the full run's completions;
    the masked runs' claims are routed against the whole dataset's cue inventory.
    """
    if any(len(texts.get(run, ())) != len(records) for run in MASKS):
        raise ValueError(
            f"eval.score: texts needs keys {list(MASKS)}, each one completion per record"
        )
    cues = [r.get("cues") or {} for r in records]
    inventory = perception.cue_inventory(cues)
    full = matcher.similarities(texts["full"], cues)
    masked = {}
    for run in perception.CLAIMED:
        masked[run] = matcher.similarities(texts[run], [inventory] * len(records))
    rows = []
    for i, record in enumerate(records):
        row = {
            "label": record["label"],
            "valence": record.get("valence"),
            "format": reward.format_reward(texts["full"][i]),
            "answer": {run: reward.extract_answer(texts[run][i]) for run in MASKS},
            "u": {
                sense: perception.recovered_share(full[i].S[sense], theta)
                for sense in perception.SENSES
            },
            "claims": {run: perception.claims(masked[run][i], tau) for run in perception.CLAIMED},
        }
        rows.append(row)
    result = report.summarize(rows, wheels)
    # only the synthetic world's records have a scenario
    scenarios = sorted({str(r["scenario"]) for r in records if "scenario" in r})
    result["per_scenario"] = {}
    for scenario in scenarios:
        in_scenario = [row for row, r in zip(rows, records) if str(r.get("scenario")) == scenario]
        result["per_scenario"][scenario] = report.summarize(in_scenario, wheels)
    result["examples"] = []
    for i, record in enumerate(records[:n_examples]):
        completions = {run: texts[run][i] for run in MASKS}
        result["examples"].append({"id": record.get("id"), "label": record["label"], **completions})
    return result


# ---------------------------------------------------------------- generation
def to_policy(batch, param):
    """The batch's tensors on the policy's device, its media FEATURES also in the policy's dtype."""
    moved = {}
    for key, value in batch.items():
        if not torch.is_tensor(value):
            moved[key] = value
        elif key in FEATURES:
            moved[key] = value.to(param.device, param.dtype)
        else:
            moved[key] = value.to(param.device)
    return moved


def evaluate(
    policy,
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
    """Answer every record under the three inputs (`answer`) and score them (`score`).

    Under torch.distributed rank 0 scores (only it needs a matcher) and every rank returns the
    same report. `wheels`: see metrics.recognition.load_wheels.
    """
    sampling = dict(
        temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, greedy=greedy
    )
    texts = answer(policy, processor, records, batch_size, frames, progress, sampling)
    scored = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        scored = [score(records, texts, matcher, theta, tau, wheels)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(scored, src=0)
    result = scored[0]
    result["settings"] = {
        "n": len(records),
        "greedy": greedy,
        "temperature": temperature,
        "top_p": top_p,
        "theta": theta,
        "tau": tau,
        "max_new_tokens": max_new_tokens,
        "frames": frames,
        "wheels": len(wheels or []),
    }
    return result


def answer(policy, processor, records, batch_size, frames, progress, sampling):
    """{run: one completion per record} for the runs of MASKS (rollout.generate, G = 1; sampling:
    its temperature, top_p, max_new_tokens and greedy).

    Under torch.distributed, rank r answers records[r::world]: every rank makes the same number
    of generate calls (generate is collective under FSDP) and the texts are all-gathered.
    """
    rank, world = 0, 1
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    shard = records[rank::world]
    steps = math.ceil(len(records) / (world * batch_size))
    texts = {run: [] for run in MASKS}
    param = next(policy.parameters())
    with parallel.unsharded(policy), rollout.sampling_mode(policy):
        for step in tqdm(range(steps), desc="eval", disable=not progress or rank != 0):
            batch_records = shard[step * batch_size : (step + 1) * batch_size]
            answered = len(batch_records)
            # a rank out of records still joins the collective generate, on a stand-in record
            if not batch_records:
                batch_records = records[:1]
            # the processed batch, CPU tensors
            batch = batching.encode(processor, batch_records, frames=frames)
            for run, modality in MASKS.items():
                if modality is None:
                    inputs = to_policy(batch, param)
                else:
                    masked = batching.mask_modality(batch, modality, rho=1.0, seed=0)
                    inputs = to_policy(masked, param)
                video = scoring.encode_video(policy, inputs)
                # G = 1: one row a record
                prompts = scoring.expand(inputs, 1, video)
                _, _, completions = rollout.generate(policy, processor, prompts, **sampling)
                texts[run] += completions[:answered]
    if world == 1:
        return texts
    parts = [None] * world
    dist.all_gather_object(parts, texts)
    # record i was the (i // world)-th answer of rank i % world
    gathered = {}
    for run in MASKS:
        gathered[run] = [parts[i % world][run][i // world] for i in range(len(records))]
    return gathered


# ---------------------------------------------------------------- command line
@dataclass
class Args:
    model: str | None = field(
        default=None, metadata={"help": "policy directory (model.load_policy)"}
    )
    data: str | None = field(default=None, metadata={"help": "JSONL manifest (data.load_manifest)"})
    out: str | None = field(default=None, metadata={"help": "write the JSON report here"})
    limit: int = field(default=0, metadata={"help": "evaluate the first N records (0: all)"})
    batch_size: int = field(default=32, metadata={"help": "records per generate call"})
    max_new_tokens: int = field(default=64, metadata={"help": "completion tokens at most"})
    theta: float = field(default=0.6, metadata={"help": "cosine at which a cue is recovered"})
    tau: float = field(default=0.5, metadata={"help": "similarity routing a claim, Eq. (9)"})
    frames: int = field(default=4, metadata={"help": "video frames per clip"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (--sample)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling's p (--sample)"})
    sample: bool = field(default=False, metadata={"help": "sample (--temperature, --top_p)"})
    wheels: str | None = field(
        default=None, metadata={"help": "directory of emotion-wheel files (metrics/recognition.py)"}
    )
    embedder: str | None = field(
        default=None, metadata={"help": "sentence-embedding model dir (default all-MiniLM-L6-v2)"}
    )
    bf16: bool = field(default=False, metadata={"help": "load the policy in bfloat16"})
    compare: list[str] | None = field(
        default=None, metadata={"help": "print these reports side by side", "metavar": "REPORT"}
    )
    plot: str | None = field(
        default=None, metadata={"help": "write a bar chart of the report(s) to this PNG"}
    )


def evaluate_model(args):
    """The report of the policy --model on the manifest --data, under torchrun on every rank."""
    # under torchrun each rank answers its shard; the group follows train.py's device rule
    _, _, device = parallel.init()
    # on_error="raise": a DataError names file:line; audio past the processor's window is counted
    window = preflight.audio_window(args.model)
    loaded = data.load_manifest(args.data, on_error="raise", audio_window=window)
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
        Matcher(args.embedder),
        batch_size=args.batch_size,
        greedy=not args.sample,
        max_new_tokens=args.max_new_tokens,
        theta=args.theta,
        tau=args.tau,
        frames=args.frames,
        temperature=args.temperature,
        top_p=args.top_p,
        wheels=wheels,
    )
    result["settings"].update(model=str(args.model), data=str(args.data))
    result["settings"]["truncated_audio"] = loaded.truncated_audio
    return result


def main(argv=None):
    parser = HfArgumentParser(Args, description=__doc__.split("\n")[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    if args.compare:
        reports = [report.load(path) for path in args.compare]
        names = [Path(path).stem for path in args.compare]
    elif not args.model or not args.data:
        parser.error("--model and --data are required (or --compare REPORT ...)")
    else:
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
