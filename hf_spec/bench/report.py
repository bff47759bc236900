"""Results as files people compare: raw JSON, a Markdown table in Spec-Bench's layout, a PNG plot.

Spec-Bench (Xia et al. 2024) tabulates one row per method and one column per task group (speedup over
plain decoding), then the mean accepted tokens and the overall speedup. Slowdowns are shown as they
are (a speedup below 1.00x); methods whose greedy output differs from plain decoding are flagged in
the table and listed under it.
"""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .identity import Mismatch
from .metrics import OVERALL

GROUP_TITLES = {"mt_bench": "MT-Bench", "code": "Code", "math": "Math", "summarization": "Summarization",
                "qa": "QA", "extraction": "Extraction", OVERALL: "Overall"}


def title(group: str) -> str:
    return GROUP_TITLES.get(group, group)


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def markdown(rows: list[dict], groups: list[str], header: str, greedy: bool,
             skipped: dict[str, str] | None = None, mismatches: list[Mismatch] | None = None, tokenizer=None) -> str:
    columns = [title(group) for group in groups] + ["Overall", "Mean accepted tokens"]
    if greedy:
        columns.append("Identical to plain")
    lines = [header, "", "| Method | " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - greedy)
             + (":---:|" if greedy else "")]
    for row in rows:
        cells = [_speedup(row["groups"][group]["speedup"]) for group in groups]
        cells += [_speedup(row[OVERALL]["speedup"]), f"{row[OVERALL]['mean_accepted_tokens']:.2f}"]
        if greedy:
            cells.append(_identity(row))
        lossy = "" if row.get("lossless", True) else " (lossy)"
        lines.append(f"| {row['method']}{lossy} | " + " | ".join(cells) + " |")
    baseline = rows[0]
    lines += ["", f"Baseline ({baseline['method']}): {baseline[OVERALL]['tokens_per_second']:.1f} tokens/s overall "
                  "(median over repetitions); speedups are ratios to it within each repetition, median over repetitions."]
    if skipped:
        lines += ["", "Not measured: " + "; ".join(f"{name} ({why})" for name, why in skipped.items()) + "."]
    if mismatches:
        lines += ["", f"**WARNING: {len(mismatches)} generation(s) differ from plain generate():**", ""]
        lines += [f"- {mismatch.describe(tokenizer)}" for mismatch in unique_mismatches(mismatches)]
    return "\n".join(lines) + "\n"


def unique_mismatches(mismatches: list[Mismatch]) -> list[Mismatch]:
    """The first mismatch of each (method, item): repetitions usually repeat it."""
    seen, unique = set(), []
    for mismatch in mismatches:
        if (mismatch.method, mismatch.item) not in seen:
            seen.add((mismatch.method, mismatch.item))
            unique.append(mismatch)
    return unique


def _speedup(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _identity(row: dict) -> str:
    if row["identical"] is None:
        return "-"
    return "yes" if row["identical"] else f"**NO** ({row['mismatched_generations']} generations)"


def plot(rows: list[dict], groups: list[str], path: Path, subtitle: str = "") -> None:
    """Grouped bars: speedup per task group (and overall) for each method but the baseline; 1.0 marked."""
    methods = rows[1:]
    columns = groups + [OVERALL]
    figure = Figure(figsize=(max(7.0, 1.3 * len(columns) + 0.25 * len(methods) * len(columns)), 4.8))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / max(len(methods), 1)
    for index, row in enumerate(methods):
        values = [(row["groups"][group] if group != OVERALL else row[OVERALL])["speedup"] or 0.0 for group in columns]
        positions = [column + (index - (len(methods) - 1) / 2) * width for column in range(len(columns))]
        axes.bar(positions, values, width, label=row["method"])
    axes.axhline(1.0, color="black", linestyle="--", linewidth=1, label=f"{rows[0]['method']} (1.0x)")
    axes.set_xticks(range(len(columns)), [title(column) for column in columns])
    axes.set_ylabel("speedup over plain generate()")
    axes.set_title("hf-spec bench" + (f": {subtitle}" if subtitle else ""), fontsize=10)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
