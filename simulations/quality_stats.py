"""Seeds -> mean ± std, verdicts against FedAvg, the papers' claims, and the quality report.

A method is ``better`` (or ``worse``) than FedAvg only when the difference of the final
means exceeds *both* standard deviations over the seeds; anything closer is ``within
noise``, and one seed cannot tell. The claims checked (``CLAIMS``) are the ones this
product's methods are sold on; each is answered confirms / refutes / cannot tell.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

BASELINE = "fedavg"


@dataclass(frozen=True)
class Curve:
    """One run (one method, one seed): held-out perplexity at its evaluated rounds."""

    name: str
    points: tuple[tuple[int, float], ...]
    mb_up: float
    wall_s: float
    status: str
    lr: float


@dataclass(frozen=True)
class Summary:
    """One method over the seeds: mean and sample std per evaluated round and at the end."""

    name: str
    seeds: int
    final_mean: float
    final_std: float  # nan with one seed: no spread to compare against
    rounds: tuple[tuple[int, float, float], ...]  # (round, mean, std)
    finals: tuple[float, ...]
    mb_up: float
    wall_s: float
    status: str
    lr: float


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def summarise(curves: Sequence[Curve]) -> Summary:
    ok = [c for c in curves if c.points]
    by_round: dict[int, list[float]] = {}
    for c in ok:
        for r, ppl in c.points:
            by_round.setdefault(r, []).append(ppl)
    finals = tuple(c.points[-1][1] for c in ok)
    mean, std = _mean_std(finals)
    bad = [c.status for c in curves if c.status not in ("completed", "reference")]
    return Summary(name=curves[0].name, seeds=len(ok), final_mean=mean, final_std=std,
                   rounds=tuple((r, *_mean_std(v)) for r, v in sorted(by_round.items())), finals=finals,
                   mb_up=statistics.fmean(c.mb_up for c in curves), wall_s=sum(c.wall_s for c in curves),
                   status=bad[0] if bad else curves[0].status, lr=curves[0].lr)


def compare(method: Summary, baseline: Summary) -> str:
    """'better' / 'worse' (lower / higher perplexity beyond both stds), 'within noise', or why not."""
    if method.seeds < 2 or baseline.seeds < 2:
        return "cannot tell (fewer than 2 seeds)"
    diff = baseline.final_mean - method.final_mean
    if abs(diff) > max(method.final_std, baseline.final_std):
        return "better" if diff > 0 else "worse"
    return "within noise"


def verdict_line(tables: Mapping[str, Sequence[Summary]], label: str, method: str) -> str:
    rows = {s.name: s for s in tables[label]}
    if method not in rows or BASELINE not in rows:
        return ""
    return compare(rows[method], rows[BASELINE])


def _beats(verdict: str) -> str:
    return {"better": "confirms", "worse": "refutes"}.get(verdict, "cannot tell")


def _matches(verdict: str, upload_ratio: float) -> str:
    if verdict == "worse" or upload_ratio >= 1.0:
        return "refutes"
    return "confirms" if verdict in ("better", "within noise") else "cannot tell"


def claims(tables: Mapping[str, Sequence[Summary]]) -> list[dict[str, str]]:
    """Per non-DP table: FLoRA beats FedAvg (mixed ranks), LoRA-FAIR beats FedAvg, Fed-SB matches it."""
    out = []
    for label, rows in tables.items():
        if "DP" in label:
            continue
        by = {s.name: s for s in rows}
        base = by.get(BASELINE)
        if base is None:
            continue
        if label.startswith("mixed") and "flora" in by:
            v = compare(by["flora"], base)
            out.append(_claim("FLoRA beats FedAvg with mixed ranks", label, _beats(v), by["flora"], base, v))
        if "lora-fair" in by:
            v = compare(by["lora-fair"], base)
            out.append(_claim("LoRA-FAIR beats FedAvg", label, _beats(v), by["lora-fair"], base, v))
        if "fed-sb" in by:
            v = compare(by["fed-sb"], base)
            ratio = by["fed-sb"].mb_up / base.mb_up if base.mb_up else math.inf
            out.append(_claim("Fed-SB matches FedAvg at a fraction of the upload", label, _matches(v, ratio),
                              by["fed-sb"], base, f"{v}; upload {ratio:.1%} of FedAvg's"))
    return out


def _claim(claim: str, label: str, verdict: str, method: Summary, base: Summary, why: str) -> dict[str, str]:
    return {"claim": claim, "scenario": label, "verdict": verdict,
            "evidence": f"{method.name} {fmt(method.final_mean, method.final_std)} vs fedavg "
                        f"{fmt(base.final_mean, base.final_std)} ({why})"}


def fmt(mean: float, std: float) -> str:
    return f"{mean:.1f}" if math.isnan(std) else f"{mean:.1f} ± {std:.1f}"


HEADERS = ["scenario", "method", "lr", "final ppl (mean ± std)", "vs FedAvg", "MB up", "wall s", "status",
           "ppl by round (mean ± std)"]


def table_rows(tables: Mapping[str, Sequence[Summary]]) -> list[list[str]]:
    rows = []
    for label, summaries in tables.items():
        for s in summaries:
            vs = "-" if s.name == BASELINE or s.status == "reference" else verdict_line(tables, label, s.name) or "-"
            rows.append([label, s.name, "-" if math.isnan(s.lr) else f"{s.lr:g}", fmt(s.final_mean, s.final_std),
                         vs, f"{s.mb_up:.2f}", f"{s.wall_s:.0f}", s.status,
                         " → ".join(f"r{r}: {fmt(m, sd)}" for r, m, sd in s.rounds)])
    return rows


def write_outputs(tables: Mapping[str, Sequence[Summary]], verdicts: list[dict[str, str]], out: Path,
                  header: str) -> Path:
    rows = table_rows(tables)
    md = [f"# Quality: {header}", "", "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    if verdicts:
        md += ["", "| claim | scenario | our run | evidence |", "|---|---|---|---|"]
        md += [f"| {v['claim']} | {v['scenario']} | **{v['verdict']}** | {v['evidence']} |" for v in verdicts]
    (out / "quality.md").write_text("\n".join(md) + "\n")
    with open(out / "quality.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(HEADERS)
        writer.writerows(rows)
    _plot(tables, out / "quality.png")
    return out / "quality.md"


def _plot(tables: Mapping[str, Sequence[Summary]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 4), dpi=100, squeeze=False)
    for ax, (label, summaries) in zip(axes[0], tables.items()):
        for s in summaries:
            if not s.rounds:
                continue
            xs = [r for r, _, _ in s.rounds]
            ms = [m for _, m, _ in s.rounds]
            sd = [0.0 if math.isnan(d) else d for _, _, d in s.rounds]
            line, = ax.plot(xs, ms, "--" if s.status == "reference" else "-", marker="o", markersize=3, label=s.name)
            ax.fill_between(xs, [m - d for m, d in zip(ms, sd)], [m + d for m, d in zip(ms, sd)],
                            color=line.get_color(), alpha=0.15)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel("held-out answer perplexity")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
