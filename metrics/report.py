"""Evaluation reports: the headline metrics, saved and loaded as JSON, compared in a table, plotted.

A report is the dict eval.evaluate returns: `summarize` computes its "metrics" (defined in
docs/method.md, section 7) from eval.score's per-sample rows. train.py saves the test split's as
test_report.json, and `python eval.py --compare A.json B.json --plot out.png` prints and draws
several side by side.
"""

import json
import os
import sys
from pathlib import Path

from metrics import perception, recognition

# the headline metrics, in the order of every table and plot
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
    "F_absent_visual",
    "F_absent_acoustic",
)


def summarize(rows, wheels=None, labels=None):
    """Every metric and count over per-sample rows (built by eval.score); `labels`: the label
    space every answer and label is read in (corpora.labels.LabelSpace; None: built-in)."""
    gold = [r["label"] for r in rows]
    answers = [r["answer"]["full"] for r in rows]
    valences = [r["valence"] for r in rows]
    recognized = recognition.war_uar(answers, gold, labels)
    # AffectGPT scores with each emotion wheel and averages; no wheels: the built-in synonym map
    wheel_list = wheels or [None]
    hits = [recognition.hit_rate(answers, gold, w, labels) for w in wheel_list]
    prfs = [recognition.open_vocab_prf(answers, gold, w, labels) for w in wheel_list]
    waf, sentiment_acc, sentiment_n = recognition.sentiment(answers, gold, valences, labels)
    counts = {
        "n": len(rows),
        "answered": sum(a is not None for a in answers),
        "hit": hits[0][1],
        "open_vocab": prfs[0][3],
        "sentiment": sentiment_n,
    }
    scores = {
        "war": recognized["war"],
        "uar": recognized["uar"],
        "hit": recognition.mean([h[0] for h in hits]),
        "ov_precision": recognition.mean([prf[0] for prf in prfs]),
        "ov_recall": recognition.mean([prf[1] for prf in prfs]),
        "ov_f": recognition.mean([prf[2] for prf in prfs]),
        "sent_waf": waf,
        "sent_acc": sentiment_acc,
        "format": recognition.mean([r["format"] for r in rows]),
    }
    for run in perception.CLAIMED:
        run_answers = [r["answer"][run] for r in rows]
        scores[f"war_{run}"] = recognition.war_uar(run_answers, gold, labels)["war"]
    for sense in perception.SENSES:
        shares = [r["u"][sense] for r in rows if r["u"][sense] is not None]
        scores[f"U_{sense}"] = recognition.mean(shares)
        counts[f"U_{sense}"] = len(shares)
    for run, sense in perception.CLAIMED.items():
        run_claims = [r["claims"][run] for r in rows]
        # the earlier pooled share of claims, greedy answers only
        chair_rate, faithfulness, chair_s = perception.chair(run_claims, sense)
        scores[f"CHAIR_{sense}"] = chair_rate
        scores[f"F_pooled_{sense}"] = faithfulness
        scores[f"CHAIR_s_{sense}"] = chair_s
        counts[f"claims_{run}"] = {s: sum(c[s] for c in run_claims) for s in perception.SENSES}
    faithful, pairs, notes = perception.faithfulness_scores(rows)
    scores.update(faithful)
    counts.update(pairs)
    scores["U"] = recognition.mean([scores["U_visual"], scores["U_acoustic"]])
    scores["F"] = recognition.mean([scores["F_visual"], scores["F_acoustic"]])
    return {"metrics": scores, "counts": counts, "recall": recognized["recall"], "notes": notes}


def breakdown(records, rows, texts, wheels=None, labels=None, n_examples=3):
    """A report's per-scenario metrics (records with a "scenario", as the synthetic world's) and
    the first records' answers; rows as eval.score builds them, texts its greedy answers."""
    scenarios = sorted({str(r["scenario"]) for r in records if "scenario" in r})
    per_scenario = {}
    for scenario in scenarios:
        in_scenario = [row for row, r in zip(rows, records) if str(r.get("scenario")) == scenario]
        per_scenario[scenario] = summarize(in_scenario, wheels, labels)
    examples = []
    for i, record in enumerate(records[:n_examples]):
        completions = {run: answers[i] for run, answers in texts.items()}
        examples.append({"id": record.get("id"), "label": record["label"], **completions})
    return {"per_scenario": per_scenario, "examples": examples}


def summary(report):
    """The headline metrics of a report, flat."""
    return {k: report["metrics"].get(k) for k in KEYS}


def save(report, path):
    """Write the JSON report atomically: a temporary file, then a rename. When either fails, the
    temporary file goes and the error is raised: a good report is never replaced by a half one."""
    text = json.dumps(report, indent=2)
    tmp = Path(f"{path}.tmp")
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        # a directory of that name is not ours to remove
        if tmp.is_file():
            tmp.unlink()
        raise


def unwritable(path):
    """Why the report `path` cannot be written (its folder created, `<path>.tmp` written and
    removed, as `save` will), or None when it can: checked before the long work that makes it."""
    path = Path(path)
    if path.is_dir():
        return "is a directory; give a file name such as report.json"
    for folder in path.parents:
        if folder.exists() and not folder.is_dir():
            return f"{folder} is a file, not a folder"
    probe = Path(f"{path}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        return f"cannot be written ({err.strerror or err})"
    return None


def unplottable(path):
    """Why matplotlib cannot write a plot to `path` (its extension names no format it writes), or
    None; a name without one is a PNG."""
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    extension = Path(path).suffix.lstrip(".").lower()
    if not extension or extension in formats:
        return None
    return f"has the extension .{extension}, not one of {', '.join(sorted(formats))}"


def load(path):
    """A report written by `save`; exits with a message naming the file when it is not one."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        sys.exit(f"eval.py: report {path}: cannot be read as JSON ({e})")
    if not isinstance(report, dict) or not isinstance(report.get("metrics"), dict):
        sys.exit(f"eval.py: report {path}: no 'metrics' object, not an eval.py report")
    return report


def cell(value):
    """A metric in a table: 3 decimals, "-" when missing."""
    return "-" if value is None else f"{value:.3f}"


def table(*reports, names=None):
    """Markdown table of the headline metrics, one column per report, then each report's notes
    on what it could not measure."""
    names = names or [f"report {i}" for i in range(len(reports))]
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    summaries = [summary(r) for r in reports]
    for key in KEYS:
        cells = [cell(s[key]) for s in summaries]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    for name, r in zip(names, reports):
        for note in r.get("notes", []):
            lines.append(f"{name}: {note}")
    return "\n".join(lines)


def plot(reports, names, path):
    """Grouped bar chart of the headline metrics, one bar per report, written to `path` (PNG)."""
    # no pyplot: the Agg canvas, no GUI, no global state
    from matplotlib.figure import Figure

    ax = Figure(figsize=(max(8.0, 0.5 * len(KEYS) * len(reports)), 4)).subplots()
    width = 0.8 / len(reports)
    for i, (r, name) in enumerate(zip(reports, names)):
        positions = [k + i * width for k in range(len(KEYS))]
        heights = [summary(r)[k] or 0.0 for k in KEYS]
        ax.bar(positions, heights, width, label=name)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(KEYS))], KEYS, rotation=45, ha="right")
    ax.set(ylim=(0, 1), title="eval.py (a missing metric is drawn as 0)")
    ax.legend()
    ax.figure.savefig(path, bbox_inches="tight")
