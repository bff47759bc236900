"""Results as files people compare: raw JSON, a Markdown table, a PNG plot (matplotlib: ``pip install hf_spec[bench]``).

Spec-Bench (Xia et al. 2024) tabulates one row per method and one column per task group (speedup over
plain decoding), then the mean accepted tokens and the overall speedup: ``markdown``. The demo's
``demo_markdown`` keeps one compact row per method (tokens/s, speedup, tau, identity). Slowdowns are
shown as they are (a speedup below 1.00x); methods whose greedy output differs from plain decoding are
flagged in the table and listed under it. ``labels`` maps method names to the names rows show.
"""

from __future__ import annotations

import json
from pathlib import Path

from .identity import Mismatch
from .metrics import OVERALL

GROUP_TITLES = {"mt_bench": "MT-Bench", "code": "Code", "math": "Math", "summarization": "Summarization",
                "qa": "QA", "extraction": "Extraction", "code_edit": "Code editing", OVERALL: "Overall"}


def title(group: str) -> str:
    return GROUP_TITLES.get(group, group)


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def markdown(rows: list[dict], groups: list[str], header: str, greedy: bool,
             skipped: dict[str, str] | None = None, mismatches: list[Mismatch] | None = None, tokenizer=None,
             labels: dict[str, str] | None = None, one_token_ms: float | None = None) -> str:
    """Spec-Bench's layout: speedup per task group and overall, tau, identity (greedy runs)."""
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
        lines.append(f"| {_row_name(row, labels)} | " + " | ".join(cells) + " |")
    baseline = rows[0]
    lines += ["", f"Baseline ({_row_name(baseline, labels)}): {baseline[OVERALL]['tokens_per_second']:.1f} tokens/s "
                  "overall (median over repetitions); speedups are ratios to it within each repetition, median over "
                  "repetitions."]
    lines += depth_table(rows, labels) + timing_table(rows, labels, one_token_ms)
    return "\n".join(lines + _notes(skipped, mismatches, tokenizer, labels)) + "\n"


def timing_table(rows: list[dict], labels: dict[str, str] | None = None,
                 one_token_ms: float | None = None) -> list[str]:
    """Where a target step's time goes, per hf_spec method: the drafter, the target's forwards, the rest."""
    timed = [row for row in rows if row.get("ms_per_step")]
    if not timed:
        return []
    share = one_token_ms is not None
    lines = ["", "Milliseconds per target step: in the drafter's `propose`, in the target's forward, and the rest of "
             "the loop (tree mask, logits processors, verification, cache trimming, stopping criteria)"
             + (f"; the rest as a share of a one-token target forward ({one_token_ms:.1f} ms, the cost curve's):"
                if share else ":"), "",
             "| Method | draft | target | rest | " + ("rest / one-token forward |" if share else ""),
             "|---|---:|---:|---:|" + ("---:|" if share else "")]
    for row in timed:
        ms = row["ms_per_step"]
        cells = [f"{ms['draft']:.1f}", f"{ms['target']:.1f}", f"{ms['loop_overhead']:.1f}"]
        if share:
            cells.append(f"{100 * ms['loop_overhead'] / one_token_ms:.0f}%")
        lines.append(f"| {_row_name(row, labels)} | " + " | ".join(cells) + " |")
    return lines


def depth_table(rows: list[dict], labels: dict[str, str] | None = None) -> list[str]:
    """Per-depth acceptance of the methods that report it: the share of target steps accepting >= d drafts."""
    measured = [row for row in rows if row.get("accepted_at_least")]
    if not measured:
        return []
    depth = max(len(row["accepted_at_least"]) for row in measured)
    lines = ["", "Share of target steps that accepted at least *d* draft tokens (all task groups):", "",
             "| Method | " + " | ".join(f"d={d}" for d in range(1, depth + 1)) + " |", "|---|" + "---:|" * depth]
    for row in measured:
        shares = row["accepted_at_least"] + [0.0] * (depth - len(row["accepted_at_least"]))
        lines.append(f"| {_row_name(row, labels)} | " + " | ".join(f"{share:.2f}" for share in shares) + " |")
    return lines


def demo_markdown(rows: list[dict], header: str, greedy: bool, skipped: dict[str, str] | None = None,
                  mismatches: list[Mismatch] | None = None, tokenizer=None, labels: dict[str, str] | None = None,
                  footer: str = "") -> str:
    """One compact row per method: tokens/s, speedup over plain decoding, tau and (greedy) identity."""
    columns = ["tokens/s", "Speedup vs plain", "Mean accepted tokens"] + (["Identical to plain"] if greedy else [])
    lines = [header, "", "| Method | " + " | ".join(columns) + " |", "|---|---:|---:|---:|" + (":---:|" if greedy else "")]
    for row in rows:
        overall = row[OVERALL]
        cells = [f"{overall['tokens_per_second']:.1f}", _speedup(overall["speedup"]),
                 f"{overall['mean_accepted_tokens']:.2f}"] + ([_identity(row)] if greedy else [])
        lines.append(f"| {_row_name(row, labels)} | " + " | ".join(cells) + " |")
    lines += ["", "tokens/s: median over repetitions; speedup: ratio to plain generate() within each repetition, "
                  "median over repetitions."]
    lines += _notes(skipped, mismatches, tokenizer, labels)
    return "\n".join(lines + ([f"\n{footer}"] if footer else [])) + "\n"


def _row_name(row: dict, labels: dict[str, str] | None) -> str:
    name = (labels or {}).get(row["method"], row["method"])
    return name + ("" if row.get("lossless", True) else " (lossy)")


def _notes(skipped: dict[str, str] | None, mismatches: list[Mismatch] | None, tokenizer,
           labels: dict[str, str] | None) -> list[str]:
    lines = []
    if skipped:
        lines += ["", "Not measured: " + "; ".join(f"{(labels or {}).get(name, name)} ({why})"
                                                   for name, why in skipped.items()) + "."]
    if mismatches:
        lines += ["", f"**WARNING: {len(mismatches)} generation(s) differ from plain generate():**", ""]
        lines += [f"- {mismatch.describe(tokenizer)}" for mismatch in unique_mismatches(mismatches)]
    return lines


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


def plot(rows: list[dict], groups: list[str], path: Path, subtitle: str = "",
         labels: dict[str, str] | None = None) -> None:
    """Grouped bars: speedup per task group (and overall) for each method but the baseline; 1.0 marked.

    Needs matplotlib (``pip install hf_spec[bench]``); raises ``ImportError`` saying so without it.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("The speedup plot needs matplotlib: pip install 'hf_spec[bench]'.") from error

    methods = rows[1:]
    columns = groups + [OVERALL]
    figure = Figure(figsize=(max(7.0, 1.3 * len(columns) + 0.25 * len(methods) * len(columns)), 4.8))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / max(len(methods), 1)
    for index, row in enumerate(methods):
        values = [(row["groups"][group] if group != OVERALL else row[OVERALL])["speedup"] or 0.0 for group in columns]
        positions = [column + (index - (len(methods) - 1) / 2) * width for column in range(len(columns))]
        axes.bar(positions, values, width, label=_row_name(row, labels))
    axes.axhline(1.0, color="black", linestyle="--", linewidth=1, label=f"{_row_name(rows[0], labels)} (1.0x)")
    axes.set_xticks(range(len(columns)), [title(column) for column in columns])
    axes.set_ylabel("speedup over plain generate()")
    axes.set_title("hf-spec bench" + (f": {subtitle}" if subtitle else ""), fontsize=10)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
