"""The study's tables and plot: mean ± std over seeds per arm, and each arm's paired differences
to GRPO with 95% intervals (tools/study.py writes the runs; this reads study.json's form)."""

import math
import statistics

# each column of the tables: eval.py's metric key -> the table's name
COLUMNS = {
    "war": "accuracy",
    "U_visual": "U^v",
    "U_acoustic": "U^a",
    "F_visual": "F^v",
    "F_acoustic": "F^a",
    "F_absent_visual": "F_abs^v",
    "F_absent_acoustic": "F_abs^a",
}
# the scenarios the training split never shows, and the faithfulness they test
HELD_OUT = {"no_face": ("F_absent_visual",), "noise_audio": ("F_absent_acoustic",)}
# the arm every other is compared with, seed by seed
BASELINE = "GRPO"


def spread(values):
    """(mean, sample std, n) of the values that are not None; (None, None, 0) without any."""
    xs = [x for x in values if x is not None]
    if not xs:
        return None, None, 0
    std = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return statistics.fmean(xs), std, len(xs)


def paired(arm, baseline, column):
    """(mean, low, high, n) of arm - baseline over the seeds both have a value for: the mean
    difference and its 95% t-interval; None values when fewer than two seeds pair."""
    diffs = []
    for seed, metrics in arm.items():
        other = baseline.get(seed, {}).get(column)
        if metrics.get(column) is not None and other is not None:
            diffs.append(metrics[column] - other)
    if len(diffs) < 2:
        return None, None, None, len(diffs)
    # scipy comes with scikit-learn (requirements.txt)
    from scipy.stats import t

    mean = statistics.fmean(diffs)
    half = t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half, len(diffs)


def cell(mean, std, n, seeds):
    """ "mean ± std", with the seed count when some seeds measured nothing."""
    if mean is None:
        return "-"
    text = f"{mean:.3f} ± {std:.3f}"
    return text if n == seeds else f"{text} (n={n})"


def markdown(study, seconds):
    """Both tables, then the seeds and the wall time."""
    seeds = len(study["settings"]["seeds"])
    names = list(COLUMNS.values())
    lines = ["| run | " + " | ".join(names) + " |", "|---|" + "---|" * len(COLUMNS)]
    sft = [cell(study["SFT"][c], 0.0, 1, 1) for c in COLUMNS]
    lines.append("| SFT | " + " | ".join(sft) + " |")
    for arm, runs in study["arms"].items():
        cells = [cell(*spread(m[c] for m in runs.values()), seeds) for c in COLUMNS]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"mean ± sample std over {seeds} seed(s) (SFT: one run)")
    if BASELINE in study["arms"] and len(study["arms"]) > 1:
        lines += ["", f"Paired difference to {BASELINE}, mean [95% interval] over seeds:", ""]
        lines += ["| run | " + " | ".join(names) + " |", "|---|" + "---|" * len(COLUMNS)]
        for arm, runs in study["arms"].items():
            if arm == BASELINE:
                continue
            cells = []
            for column in COLUMNS:
                mean, low, high, _ = paired(runs, study["arms"][BASELINE], column)
                cells.append("-" if mean is None else f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]")
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "Absence faithfulness on the kinds of absence held out of training:", ""]
    lines += held_out_table(study, seeds)
    # runs finished by an earlier invocation are reused, not timed again
    lines.append("")
    lines.append(f"wall time of this invocation {seconds / 60:.1f} min")
    return "\n".join(lines) + "\n"


def plot(study, path):
    """Grouped bars, one group per metric, one bar per arm, seed std as error bars."""
    # no pyplot: no GUI, no global state
    from matplotlib.figure import Figure

    rows = {"SFT": {c: (study["SFT"][c], 0.0) for c in COLUMNS}}
    for arm, runs in study["arms"].items():
        rows[arm] = {c: spread(m[c] for m in runs.values())[:2] for c in COLUMNS}
    ax = Figure(figsize=(10, 4)).subplots()
    width = 0.8 / len(rows)
    for i, (name, row) in enumerate(rows.items()):
        ax.bar(
            [k + i * width for k in range(len(COLUMNS))],
            [row[c][0] or 0.0 for c in COLUMNS],
            width,
            yerr=[row[c][1] or 0.0 for c in COLUMNS],
            capsize=2,
            label=name,
        )
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(COLUMNS))], list(COLUMNS.values()))
    ax.set(ylim=(0, 1.05), title="synthetic test split: recognition, utilization U, faithfulness F")
    # below the axes: above them it hides the bars near 1
    ax.legend(fontsize="small", ncol=len(rows), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    ax.figure.savefig(path, bbox_inches="tight", dpi=120)


def held_out_table(study, seeds):
    """F_absent on each held-out scenario: one line per run, "mean ± std" per scenario."""
    columns = [f"{key}@{scenario}" for scenario, keys in HELD_OUT.items() for key in keys]
    lines = ["| run | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    sft = [cell(study["SFT"].get(c), 0.0, 1, 1) for c in columns]
    lines.append("| SFT | " + " | ".join(sft) + " |")
    for arm, runs in study["arms"].items():
        cells = [cell(*spread(m.get(c) for m in runs.values()), seeds) for c in columns]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines
