"""memory.png: per-stage model-state memory against vanilla and the budget (the paper's Figure 2)."""

from __future__ import annotations

import io
from typing import Any


def memory_png(plan: dict[str, Any], title: str) -> bytes:
    """Render the bar chart to PNG bytes, byte-identical for the same plan (no timestamps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "stepc"
    labels = ["vanilla"] + [f"stage {s['index']}\n{s['total_layers']} layers" for s in plan["stages"]]
    values = [plan["vanilla_peak_bytes"] / 1e9] + [s["peak_bytes"] / 1e9 for s in plan["stages"]]
    colors = ["#9e9e9e"] + ["#1f77b4"] * len(plan["stages"])
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(labels) + 1.5), 3.6), dpi=100)
    bars = ax.bar(labels, values, color=colors)
    for bar, value in zip(bars, values):
        ax.annotate(f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom", fontsize=8)
    if plan["budget_bytes"] is not None:
        ax.axhline(plan["budget_bytes"] / 1e9, color="#d62728", linestyle="--", linewidth=1, label="budget")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_ylabel(f"model states (GB, {plan['accounting']} accounting)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})  # no matplotlib version stamp in the bytes
    plt.close(fig)
    return buffer.getvalue()
