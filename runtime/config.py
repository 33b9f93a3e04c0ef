"""train.py's command line: the Args dataclass, and the profile that fills its unset fields.

A field left unset (None) takes the value of the run's profile (runtime/profiles.py): `cpu`, the
tiny thinker on the synthetic world (docs/method.md, section 10), or `real`, a 3B/7B Qwen2.5-Omni
thinker on real data with the recipe of docs/method.md, section 6. Args inherits
runtime/run_flags.py's flags; runtime/validate.py checks every flag's value before the run starts.
"""

from dataclasses import dataclass, field

from runtime.profiles import CPU, REAL
from runtime.run_flags import RunFlags


@dataclass
class Args(RunFlags):
    model: str = field(
        default="",
        metadata={
            "help": "local Qwen2.5-Omni(-Thinker) directory; empty: the tiny thinker in runs/tiny"
        },
    )
    profile: str = field(
        default="",
        metadata={
            "help": "defaults for the fields left unset: cpu (tiny model) or real (3B/7B, "
            "docs/method.md, section 6); empty: real with --model, else cpu"
        },
    )
    data: str = field(
        default="",
        metadata={
            "help": "train manifest (JSON lines, docs/method.md, section 8); "
            "empty: the synthetic world in runs/synth"
        },
    )
    val_data: str = field(
        default="",
        metadata={
            "help": "validation manifest of --eval_every; required with --data and "
            "--eval_every; empty without --data: the synthetic val split"
        },
    )
    test_data: str = field(
        default="",
        metadata={
            "help": "test manifest of the final table; required with --data; empty without "
            "--data: the synthetic test split"
        },
    )
    out: str = field(
        default="runs/oppo",
        metadata={"help": "output directory: <out>/<stage>/{ckpt,final,log.jsonl}"},
    )
    stages: str = field(
        default="sft,oppo",
        metadata={"help": "comma-separated stages to run, in order: sft (cold start), oppo"},
    )
    init: str = field(
        default="",
        metadata={
            "help": "weights to start the first stage from (default: --model); later stages "
            "start from the previous stage's export"
        },
    )
    resume: bool = field(
        default=False,
        metadata={"help": "continue each stage from its last checkpoint in <out>/<stage>/ckpt"},
    )
    seed: int = field(
        default=0,
        metadata={
            "help": "random seed, 0 to 2**20 - 1; rank r seeds with seed + r * 2**20 (rank 0 "
            "with seed itself), so no two ranks or seeds share samples"
        },
    )
    frames: int = field(default=None, metadata={"help": "video frames per clip (CPU 4, real 8)"})
    # SFT cold start
    sft_steps: int = field(
        default=None, metadata={"help": "SFT optimizer steps (CPU 900; real: --sft_epochs)"}
    )
    sft_batch: int = field(
        default=None, metadata={"help": "SFT clips per step, global over ranks (CPU 16, real 64)"}
    )
    sft_lr: float = field(
        default=None, metadata={"help": "SFT learning rate (CPU 1e-3, real 1e-5)"}
    )
    sft_micro_batch: int = field(
        default=None,
        metadata={
            "help": "clips per SFT forward, each rank (CPU 0: the whole batch; real 1); the "
            "loss is normalised by the global token count, so micro-batches sum to the batch's"
        },
    )
    # OPPO
    steps: int = field(
        default=None, metadata={"help": "OPPO steps, one update per rollout (CPU 120, real 500)"}
    )
    batch: int = field(
        default=None,
        metadata={"help": "clips per OPPO step, global over ranks (B; CPU 4, real 64)"},
    )
    G: int = field(default=8, metadata={"help": "completions per clip (G, Eq. 5)"})
    lr: float = field(default=None, metadata={"help": "OPPO learning rate (CPU 1e-4, real 1e-6)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    warmup: int = field(
        default=None, metadata={"help": "linear warm-up steps of each stage (CPU 30, real 10)"}
    )
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling p"})
    max_new_tokens: int = field(
        default=None, metadata={"help": "completion cap (CPU 96, real 512)"}
    )
    micro_batch: int = field(
        default=None,
        metadata={"help": "clips per forward in the update and the scoring passes (CPU 4, real 1)"},
    )
    beta: float = field(
        default=None,
        metadata={
            "help": "beta: weight of the k3 KL to the reference, Eq. (7); 0 drops the "
            "reference model (CPU 0.0, real 0.04)"
        },
    )
    eps_low: float = field(
        default=0.2, metadata={"help": "eps_low of the clipped surrogate, Eq. (6)"}
    )
    eps_high: float = field(
        default=0.28, metadata={"help": "eps_high of the clipped surrogate, Eq. (6)"}
    )
    agg: str = field(
        default="token-mean", metadata={"help": "Eq. (8) aggregation: token-mean or seq-mean"}
    )
    scale_std: bool = field(
        default=True,
        metadata={"help": "Eq. (5) divide advantages by the group std (False: Dr. GRPO)"},
    )
    perception_reward: bool = field(
        default=True,
        metadata={"help": "ablation: add the Omni-Perception Reward w_op * R_op, Eq. (4)"},
    )
    perception_loss: bool = field(
        default=True, metadata={"help": "ablation: add the Omni-Perception Loss L_op, Eq. (11)"}
    )
    w_fmt: float = field(
        default=0.1, metadata={"help": "w_fmt, weight of the format reward, Eq. (4)"}
    )
    w_op: float = field(
        default=0.5, metadata={"help": "w_op, weight of the Omni-Perception Reward, Eq. (4)"}
    )
    tau: float = field(
        default=0.5,
        metadata={
            "help": "tau, cue-recovery and routing threshold, Eqs. (3) and (9): the reward, the "
            "evidence tokens, the masked rollouts' claims and the evaluation's claims"
        },
    )
    theta: float = field(
        default=0.6,
        metadata={
            "help": "theta, the cosine at which the evaluation counts a cue as recovered "
            "(utilization U^m, docs/method.md, section 7)"
        },
    )
    gamma: float = field(
        default=None,
        metadata={
            "help": "gamma, weight of the masked KL in L_op, Eq. (11) "
            "(0.02; 0.2 collapsed the tiny model)"
        },
    )
    eta: float = field(
        default=None, metadata={"help": "eta, weight of the entropy term in L_op, Eq. (11)"}
    )
    rho: float = field(
        default=0.9,
        metadata={
            "help": "rho, fraction of a modality's features zeroed in x\\v and x\\a "
            "(docs/method.md, section 5)"
        },
    )
    clamp: float = field(
        default=10.0, metadata={"help": "per-token clamp of the masked divergence d, Eq. (10)"}
    )
    masked_grad: bool = field(
        default=False,
        metadata={
            "help": "Eqs. (10)-(11) form (b): compute the x\\v and x\\a log-probs of the rows "
            "with evidence in the update, with gradient, so the loss also changes what the "
            "policy writes under masked input; False: form (a), a no-grad pass with the "
            "pre-update policy"
        },
    )
    eta_masked: float = field(
        default=0.03,
        metadata={
            "help": "weight of the masked-branch entropy term (PAPO's double entropy), used "
            "with --masked_grad"
        },
    )
    embedder: str = field(
        default="",
        metadata={
            "help": "sentence-embedding model directory for Eqs. (3) and (9); "
            "empty: all-MiniLM-L6-v2 (offline package)"
        },
    )
    masked_rollouts: int = field(
        default=0,
        metadata={
            "help": "Gm, completions sampled per clip under each masked input (rho = 1), their "
            "claims of the masked modality penalised (variants/masked_rollout.py); 0: off"
        },
    )
    masked_rollout_modalities: str = field(
        default="video,audio",
        metadata={"help": "the modalities masked in the masked rollouts: video, audio or both"},
    )
    masked_rollout_weight: float = field(
        default=1.0, metadata={"help": "w_mr, weight of the masked rollouts' loss"}
    )
    # bookkeeping
    save_every: int = field(default=50, metadata={"help": "steps between sharded checkpoints"})
    bf16: bool = field(
        default=None,
        metadata={
            "help": "bf16 compute with fp32 master weights and reduction (default: on with CUDA)"
        },
    )
    activation_checkpointing: bool = field(
        default=None,
        metadata={
            "help": "recompute decoder layers in backward to save memory (CPU off, real on: "
            "the 7B update needs it to fit, docs/performance.md)"
        },
    )
    cache_inputs: bool = field(
        default=None,
        metadata={
            "help": "keep every clip's processed prompt tensors in memory "
            "(CPU on: small clips; real off)"
        },
    )
    max_bad_records: int = field(
        default=0,
        metadata={
            "help": "lines each manifest may lose (missing media, bad JSON, ...: printed, "
            "counted in <out>/run.jsonl and test_report.json); more refuse to start"
        },
    )
    allow_changed_args: bool = field(
        default=False,
        metadata={
            "help": "--resume refuses arguments that differ from <out>/<stage>/args.json; this "
            "accepts them (printed, logged; more steps continue a finished stage). Exempt: out "
            "resume stages profile val_data test_data eval_every eval_limit eval_samples theta "
            "save_every max_bad_records micro_batch sft_micro_batch activation_checkpointing "
            "cache_inputs"
        },
    )
    allow_changed_data: bool = field(
        default=False,
        metadata={
            "help": "--resume refuses manifests whose content (bytes, or the size or modification "
            "time of a medium a record names) changed since <out>/data.json was written; this "
            "accepts them (printed, logged in <out>/run.jsonl)"
        },
    )


def apply_profile(args, device):
    """Fill the fields left unset from the profile (real with --model, else cpu); bf16 defaults
    to on with CUDA."""
    if not args.profile:
        args.profile = "real" if args.model else "cpu"
    if args.profile not in ("cpu", "real"):
        raise ValueError(f"--profile must be cpu or real, got {args.profile!r}")
    defaults = REAL if args.profile == "real" else CPU
    for key, value in defaults.items():
        # --sft_epochs sets the SFT length: the profile's step count gives way
        if key == "sft_steps" and args.sft_epochs is not None:
            continue
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.bf16 is None:
        args.bf16 = device.type == "cuda"
