r"""The leak probe: does the subtitle or the media decide whether a policy describes a modality?

    python -m tools.probe --model runs/oppo/sft/final --data runs/synth/test.jsonl

Teacher-forced on every clip: the probability that the policy opens a sentence about each
modality where the reference reasoning would,

    P_v = pi("In the video," | x, "<think>")
    P_a = pi("In the audio," | x, "<think>" + the reference's video sentence, if it has one)

under four inputs: the full input x; x\m with the probed modality's features masked at rho 0.9
(the training mask) and at rho 1 (the evaluation's); and x with the subtitle of another clip
whose subtitle is of another kind (docs/study.md). Means are split by whether the modality
carried cues in the clip. A policy that reads the media opens an m-sentence when m carries cues
and not when it is masked; a policy that reads the subtitle moves with the swap instead.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

import data
from matching import alignment
from synthetic import plan
from thinker import batching, encoders, model, scoring

OPENERS = {"visual": "In the video,", "acoustic": "In the audio,"}
MEDIUM = {"visual": "video", "acoustic": "audio"}
CONDITIONS = ("full", "masked rho 0.9", "masked rho 1", "swapped subtitle")


@dataclass
class Args:
    model: str = field(metadata={"help": "policy directory (an SFT export)"})
    data: str = field(metadata={"help": "manifest of the synthetic world (its test split)"})
    out: str = field(default="", metadata={"help": "write the probe's JSON here"})
    limit: int = field(default=0, metadata={"help": "the first N clips (0: all)"})
    batch: int = field(default=16, metadata={"help": "clips per forward"})
    frames: int = field(default=4, metadata={"help": "video frames per clip"})


def subtitle_kind(record):
    """A record's subtitle kind, recorded by the world or read off the line (an earlier world
    recorded none)."""
    if "subtitle_kind" in record:
        return record["subtitle_kind"]
    line = record["subtitle"]
    if not line:
        return "empty"
    for kind, table in (("arousal", plan.AROUSAL_TEXT), ("valence", plan.VALENCE_TEXT)):
        if any(line in lines for lines, _ in table.values()):
            return kind
    if any(line == text for text, _ in plan.EMOTION_TEXT.values()):
        return "emotion"
    return "plain"


def swapped(records):
    """Each record with the subtitle of the next record (cyclically) of another subtitle kind."""
    kinds = [subtitle_kind(r) for r in records]
    out = []
    for i, record in enumerate(records):
        for step in range(1, len(records)):
            j = (i + step) % len(records)
            if kinds[j] != kinds[i]:
                break
        out.append(dict(record, subtitle=records[j]["subtitle"]))
    return out


def prefix(record, sense):
    """The think section up to where the reference would open the sense's sentence."""
    if sense == "visual":
        return "<think>"
    reasoning = record.get("reasoning") or ""
    video = reasoning.split(". ")[0] + ". " if reasoning.startswith(OPENERS["visual"]) else ""
    return "<think>" + video


@torch.no_grad()
def opening_logprobs(policy, processor, records, batch, sense):
    """log P(the sense's opener | x, prefix) of each record, for one processed `batch`."""
    tok = processor.tokenizer
    texts = [prefix(r, sense) + OPENERS[sense] for r in records]
    ids = tok(texts, add_special_tokens=False, padding=True, padding_side="right")
    completion = torch.tensor(ids["input_ids"])  # (B, C)
    mask = torch.tensor(ids["attention_mask"])  # (B, C)
    video = encoders.encode_video(policy, batch)
    audio = encoders.encode_audio(policy, batch)
    inputs = scoring.expand(batch, 1, video, audio, scoring.positions(policy, batch))
    logp = scoring.logprobs(policy, inputs, completion)  # (B, C)
    out = []
    for i, record in enumerate(records):
        real = completion[i][mask[i].bool()].tolist()
        spans = alignment.token_char_spans(tok, real)
        start = len(prefix(record, sense))
        # the opener's tokens: those that end past the prefix
        target = torch.tensor([end > start for _, end in spans])
        out.append(float(logp[i, : len(real)][target].sum()))
    return out


def probe(policy, processor, records, batch_size=16, frames=4):
    """{sense: {condition: {"with cues": mean P, "without cues": mean P}}} and per-clip values."""
    swaps = swapped(records)
    values = {sense: {c: [] for c in CONDITIONS} for sense in OPENERS}
    for start in range(0, len(records), batch_size):
        recs = records[start : start + batch_size]
        batch = batching.encode(processor, recs, frames=frames)
        swapped_batch = batching.encode(processor, swaps[start : start + batch_size], frames=frames)
        for sense in OPENERS:
            inputs = {
                "full": batch,
                "masked rho 0.9": batching.mask_modality(batch, MEDIUM[sense], rho=0.9),
                "masked rho 1": batching.mask_modality(batch, MEDIUM[sense], rho=1.0),
                "swapped subtitle": swapped_batch,
            }
            for condition, processed in inputs.items():
                logp = opening_logprobs(policy, processor, recs, processed, sense)
                values[sense][condition] += [float(torch.tensor(x).exp()) for x in logp]
    table = {}
    for sense, conditions in values.items():
        carried = [bool(r["cues"][sense]) for r in records]
        table[sense] = {}
        for condition, probs in conditions.items():
            groups = {}
            for name, keep in (("with cues", True), ("without cues", False)):
                chosen = [p for p, c in zip(probs, carried) if c == keep]
                groups[name] = sum(chosen) / len(chosen) if chosen else None
                groups[f"n {name}"] = len(chosen)
            table[sense][condition] = groups
    return table, values


def markdown(table):
    """The probe as a table: one row per sense and condition."""
    lines = [
        "| opener | input | P, clips with its cues | P, clips without |",
        "|---|---|---|---|",
    ]
    for sense, conditions in table.items():
        for condition, groups in conditions.items():
            cells = [
                "-" if groups[g] is None else f"{groups[g]:.3f}"
                for g in ("with cues", "without cues")
            ]
            lines.append(f"| {OPENERS[sense]} | {condition} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv=None):
    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses(args=argv)
    policy, processor = model.load_policy(args.model)
    records = data.load_manifest(args.data)[: args.limit or None]
    table, values = probe(policy.eval(), processor, records, args.batch, args.frames)
    print(markdown(table))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        result = {"model": args.model, "data": args.data, "table": table, "per_clip": values}
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
