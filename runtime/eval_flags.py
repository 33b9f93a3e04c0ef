"""eval.py's command line: its flags, and the settings a trained run's args.json gives it.

`python eval.py --model <out>/<stage>/final` takes the frames, completion cap, thresholds, label
space and embedder of the run that exported the model (rundir.from_run), a flag given winning;
a checkpoint without a run takes DEFAULTS, the 3B/7B recipe's (docs/method.md, section 6).
"""

from dataclasses import dataclass, field

# the settings a trained run's args.json gives, and their values for a checkpoint without one
DEFAULTS = dict(frames=8, max_new_tokens=512, theta=0.6, tau=0.5, labels="", embedder="")


@dataclass
class Args:
    model: str | None = field(
        default=None, metadata={"help": "policy directory (model.load_policy)"}
    )
    data: str | None = field(default=None, metadata={"help": "JSONL manifest (data.load_manifest)"})
    out: str | None = field(default=None, metadata={"help": "write the JSON report here"})
    limit: int = field(default=0, metadata={"help": "evaluate the first N records (0: all)"})
    batch_size: int = field(default=32, metadata={"help": "records per generate call"})
    max_new_tokens: int = field(default=None, metadata={"help": "completion tokens at most"})
    theta: float = field(default=None, metadata={"help": "cosine at which a cue is recovered"})
    tau: float = field(default=None, metadata={"help": "similarity routing a claim, Eq. (9)"})
    frames: int = field(default=None, metadata={"help": "video frames per clip"})
    labels: str | None = field(default=None, metadata={"help": "label space (corpora/labels.py)"})
    samples: int = field(
        default=4,
        metadata={
            "help": "K, completions sampled per record and input beside the greedy one, for the "
            "faithfulness metrics (docs/method.md, section 7); 0: greedy only"
        },
    )
    temperature: float = field(default=1.0, metadata={"help": "the samples' temperature"})
    top_p: float = field(default=1.0, metadata={"help": "the samples' nucleus p"})
    seed: int = field(default=0, metadata={"help": "the samples' random seed"})
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
