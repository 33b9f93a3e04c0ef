"""What a run checks before its first step: it never trains or reports on silently fewer clips,
and never does long work it cannot save.

- `require_manifests`: with --data, every other manifest the run reads must be named too;
  without it, `default_assets` builds the synthetic world (and the tiny thinker without --model).
- `load_manifests`: every manifest the run will read (train; val with --eval_every; test) is
  loaded on rank 0 and sent to every rank, its labels read in the run's label space (--labels,
  else labels.json beside --data, else the built-in one); each one's records and skipped lines
  are printed; a manifest with more skipped lines than --max_bad_records, or no record at all,
  refuses the run. Records whose audio is longer than the processor keeps, records with neither
  video nor audio and keys no code reads are counted and printed. The test report's path is
  checked writable with them, and their content is fingerprinted (runtime/fingerprint.py): a
  --resume on changed data refuses unless --allow_changed_data. The train records without
  reasoning or cues are counted and printed (`coverage.py`), and --sft_epochs becomes steps.
- `stage_records`: every prompt the run feeds the model must fit the model's positions with what
  follows it (an SFT target, or --max_new_tokens sampled tokens), train records in each stage,
  evaluated val and test records before the first; the records that do not are named.
- `summary`: the counts, for `<out>/run.jsonl` and test_report.json.
"""

import fcntl
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist
from transformers import WhisperFeatureExtractor

import data
from metrics import report
from runtime import coverage, fingerprint, logs, parallel, run_flags, rundir
from thinker import batching, media

# the flag of each split's manifest
FLAGS = {"train": "data", "val": "val_data", "test": "test_data"}
# skipped lines quoted in a refusal, and kept in a summary
SHOWN = 5
KEPT = 20


def require_manifests(args):
    """With --data the run's other manifests have no default (the synthetic world's would be
    wrong): SystemExit naming each flag it needs, --test_data, and --val_data with --eval_every."""
    if not args.data:
        return
    missing = []
    if not args.test_data:
        missing.append("--test_data (the final evaluation's manifest)")
    if args.eval_every and not args.val_data:
        missing.append("--val_data (the manifest --eval_every evaluates)")
    if missing:
        rundir.refuse(f"with --data, give {' and '.join(missing)} too")


def default_assets(args, master):
    """`python train.py` with no paths: build the synthetic world and the tiny thinker if absent.
    The synthetic package is imported here alone: a run on real data never loads it."""
    if not args.data:
        from synthetic import world

        # a manifest given stays
        for flag, split in zip(("data", "val_data", "test_data"), world.SPLITS):
            if not getattr(args, flag):
                setattr(args, flag, f"{world.WORLD_DIR}/{split}.jsonl")
        if master:
            world.ensure_world(world.WORLD_DIR, frames=args.frames)
    dist.barrier()
    if not args.model:
        from synthetic import tiny

        args.model = tiny.TINY_DIR
        if master:
            with building(args.model):
                if not (Path(args.model) / "config.json").exists():
                    corpus = batching.corpus(data.load_manifest(args.data))
                    tiny.build_tiny(args.model, seed=0, corpus=corpus)
    dist.barrier()


@contextmanager
def building(folder):
    """Hold `<folder>.lock` (an flock, waited for) through the block: of two runs building the
    same default asset at once, the second waits, then finds it built."""
    Path(folder).parent.mkdir(parents=True, exist_ok=True)
    with open(f"{folder}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def needed(args):
    """{split: path} of every manifest the run reads."""
    paths = {"train": args.data, "test": args.test_data}
    if args.eval_every:
        paths["val"] = args.val_data
    return paths


def load_manifests(args):
    """{split: data.Manifest} of `needed` on every rank, their counts logged in the run's log;
    or SystemExit on every rank naming the flag, the manifest and its first skipped lines, or
    what a stage lacks (coverage.refusal)."""
    space = coverage.label_space(args)
    manifests, problem = parallel.from_rank0(_load, args, space)
    if problem:
        rundir.refuse(problem)
    problem = coverage.refusal(args, manifests["train"])
    if problem:
        rundir.refuse(problem)
    args.sft_steps = run_flags.sft_steps(args, len(manifests["train"]))
    start = {"event": "start", "manifests": summary(args, manifests)}
    logs.log_event(args.out, start, dist.get_rank() == 0)
    return manifests


def _load(args, space=None):
    """(manifests, None), or (None, why the run cannot start); rank 0. `space`: the label space
    the labels are read in (None: as written)."""
    manifests = {}
    window = audio_window(args.model)
    for split, path in needed(args).items():
        flag = f"--{FLAGS[split]}"
        try:
            manifest = data.load_manifest(path, audio_window=window, labels=space)
        except data.DataError as err:
            return None, f"{flag}: {err}"
        skipped = manifest.errors
        counts = f"{len(manifest)} records, {len(skipped)} lines skipped"
        if manifest.truncated_audio:
            counts += f", {manifest.truncated_audio} with audio cut to the first {window:g} s"
        if manifest.no_media:
            counts += f", {manifest.no_media} with neither video nor audio"
        if manifest.unknown_keys:
            counts += f"; {data.unknown_text(manifest)}"
        print(f"train.py: {flag} {path}: {counts}", *skipped[:KEPT], sep="\n  ")
        quoted = "\n  ".join(skipped[:SHOWN])
        if not manifest:
            return None, f"{flag} {path}: no usable record, every line skipped:\n  {quoted}"
        if len(skipped) > args.max_bad_records:
            return None, (
                f"{flag} {path}: {len(skipped)} lines skipped, more than --max_bad_records "
                f"{args.max_bad_records}; the first:\n  {quoted}\nfix them, or accept training "
                f"and evaluating without them with --max_bad_records {len(skipped)}"
            )
        manifests[split] = manifest
    # the run's result, written at its end
    test_report = Path(args.out) / "test_report.json"
    problem = report.unwritable(test_report)
    if problem:
        return None, f"{test_report} {problem}"
    read = {f"--{FLAGS[split]}": (path, manifests[split]) for split, path in needed(args).items()}
    changed, problem = fingerprint.check_and_record(
        args.out, read, args.resume, args.allow_changed_data
    )
    if changed and not problem:
        logs.log_event(args.out, {"event": "changed_data", "manifests": changed}, True)
    return manifests, problem


def audio_window(model_dir):
    """Seconds of audio the model's processor keeps (media.audio_window), read from its feature
    extractor's config alone: the model is not loaded yet."""
    extractor = WhisperFeatureExtractor.from_pretrained(model_dir, local_files_only=True)
    return extractor.n_samples / media.SR


def stage_records(stage, args, manifests, policy, processor):
    """The records a stage trains on: the train manifest's. Before it, SystemExit on every rank
    naming the flag and the records (file:line) whose prompt text and what follows it exceed
    the model's positions (max_position_embeddings): an SFT target in SFT, --max_new_tokens
    sampled tokens in OPPO and in the evaluation (the val and test records evaluated, checked
    before the first stage). Their media's positions come on top."""
    limit = policy.config.text_config.max_position_embeddings
    checked = [("data", manifests["train"], stage == "sft")]
    if stage == args.stages.split(",")[0]:
        for split in ("val", "test"):
            if split in manifests:
                evaluated = manifests[split][: args.eval_limit or None]
                checked.append((FLAGS[split], evaluated, False))
    for flag, records, sft in checked:
        problem = parallel.from_rank0(_too_long, flag, records, processor, limit, sft, args)
        if problem:
            rundir.refuse(problem)
    return manifests["train"]


def _too_long(flag, records, processor, limit, sft, args):
    """Why some records' prompts and what follows them (an SFT target when `sft`, else
    --max_new_tokens) exceed `limit` positions, or None; rank 0."""
    prompts = []
    for rec in records:
        chat = batching.messages(rec, "video" in rec, "audio" in rec)
        prompts.append(
            processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        )
    tok = processor.tokenizer
    prompt_ids = tok(prompts, add_special_tokens=False)["input_ids"]
    following = [args.max_new_tokens] * len(records)
    if sft:
        # as train.sft_step tokenizes them
        targets = [batching.target_text(rec) + "<|im_end|>" for rec in records]
        following = [len(ids) for ids in tok(targets, add_special_tokens=False)["input_ids"]]
    over = []
    for rec, prompt, after in zip(records, prompt_ids, following):
        if len(prompt) + after > limit:
            after_text = f"{after} target tokens" if sft else f"{after} sampled (--max_new_tokens)"
            over.append(f"{rec['source']}: {len(prompt)} prompt + {after_text}")
    if not over:
        return None
    quoted = "\n  ".join(over[:SHOWN])
    purpose = "for SFT" if sft else "to sample from"
    return (
        f"--{flag}: {len(over)} records need more positions than the model's {limit} "
        f"(max_position_embeddings) {purpose}, before their media's; the first:\n  {quoted}\n"
        "shorten their subtitle or reasoning, or leave them out of the manifest"
    )


def summary(args, manifests):
    """{split: {"path", "records", "skipped", "errors" (the first KEPT), and for val and test
    "evaluated" (the first --eval_limit records)}}."""
    out = {}
    for split, manifest in manifests.items():
        entry = {
            "path": str(getattr(args, FLAGS[split])),
            "records": len(manifest),
            "skipped": len(manifest.errors),
            "truncated_audio": manifest.truncated_audio,
            "errors": manifest.errors[:KEPT],
        }
        if split != "train":
            entry["evaluated"] = len(manifest[: args.eval_limit or None])
        else:
            entry.update(data.coverage(manifest))
        out[split] = entry
    return out
