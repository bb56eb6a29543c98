"""LoBaSS's section of the report: the selection's statistics and a histogram of the
learnability scores (reports/lobass_scores.png)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spinflow.graph import Graph
from spinflow.io import atomic_path, read_jsonl
from spinflow.methods.lobass.graph import LOBASS_SCORES, SCORE_HISTOGRAM
from spinflow.nodes import METRICS_DIR
from spinflow.report import Section, read_output


def section(graph: Graph, rows: list[dict[str, Any]], test: list[dict]) -> Section:
    write_score_histogram(SCORE_HISTOGRAM)
    return Section(body=lobass_section())


def _lobass_scores() -> list[dict[str, Any]]:
    return read_jsonl(LOBASS_SCORES / "scores.jsonl")


def lobass_section() -> list[str]:
    scored = read_output(METRICS_DIR / "lobass_score.json")
    selected = read_output(METRICS_DIR / "lobass_select.json")
    return [
        "## LoBaSS selection",
        "",
        "Learnability S = 1 − L_after / L_before of each SFT example (mean answer-token loss "
        "under the base model, then under θ0 fine-tuned on all of them).",
        "",
        "| | value |",
        "|---|---:|",
        f"| SFT examples scored | {scored['examples']} |",
        f"| mean loss before / after | {scored['mean_loss_before']:.4f} / "
        f"{scored['mean_loss_after']:.4f} |",
        f"| mean score | {scored['mean_score']:.4f} |",
        f"| examples whose loss rose (S < 0) | {scored['negative_scores']} |",
        f"| selected | {selected['selected']} ({selected['selected_fraction']:.1%}) |",
        f"| mean score: selected / random control | {selected['mean_score_selected']:.4f} / "
        f"{selected['mean_score_random']:.4f} |",
        f"| selected examples also in the random control | {selected['overlap_with_random']} |",
        "",
        "![LoBaSS scores](lobass_scores.png)",
        "",
    ]


def write_score_histogram(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _lobass_scores()
    size = read_output(METRICS_DIR / "lobass_select.json")["selected"]
    chosen = [r["score"] for r in rows if r["rank"] <= size]
    rest = [r["score"] for r in rows if r["rank"] > size]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    bins = 20
    ax.hist([rest, chosen], bins=bins, stacked=True, label=["not selected", "selected"])
    ax.set_xlabel("learnability S = 1 − L_after / L_before")
    ax.set_ylabel("SFT examples")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
