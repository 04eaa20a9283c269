"""The perturbation study report's plots (report.py computes the tables): accuracy against
latency for every configuration, the compression speedups, and sparse against dense by
sparsity, each as interactive HTML (plotly) and PNG (matplotlib). The HTML files share one
plotly.min.js written beside them (inlined, it was 4.6 MB in each).

    names = write(frame, tables, out_dir)   # e.g. ["configurations", "compression_speedup"]
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

__all__ = ["write"]


def write(frame: pd.DataFrame, tables: dict, out: Path) -> list[str]:
    """Each plot as interactive HTML (plotly) and PNG (matplotlib); the names written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plotly.express as px
    from plotly.offline import get_plotlyjs

    (out / "plotly.min.js").write_text(get_plotlyjs(), encoding="utf-8")

    written = []
    # 1. latency vs accuracy, sized by model size, coloured by compression
    if not frame.empty:
        fig = px.scatter(frame, x="latency_ms", y="accuracy", color="compression",
                         symbol="primitive", hover_data=["arch", "target", "tuner", "size_mb"],
                         title="accuracy vs latency, every configuration")
        fig.write_html(out / "configurations.html", include_plotlyjs="directory")
        f, ax = plt.subplots(figsize=(7, 4.5))
        for label, g in frame.groupby("compression"):
            ax.scatter(g["latency_ms"], g["accuracy"], label=label, s=18)
        ax.set_xlabel("latency_ms"), ax.set_ylabel("accuracy"), ax.grid(alpha=0.3)
        ax.legend(fontsize=7), ax.set_title("accuracy vs latency, every configuration")
        f.tight_layout(), f.savefig(out / "configurations.png", dpi=110), plt.close(f)
        written.append("configurations")
    # 2. compression speedups
    speed = tables["compression_speedup"]
    if not speed.empty:
        speed = speed.assign(setting=speed["target"] + " / " + speed["tuner"])
        fig = px.bar(speed, x="compression", y="speedup", color="setting", barmode="group",
                     title="speedup over the uncompressed model (geometric mean over models)")
        fig.write_html(out / "compression_speedup.html", include_plotlyjs="directory")
        pivot = speed.pivot_table(index="compression", columns="setting", values="speedup")
        f, ax = plt.subplots(figsize=(7, 4.5))
        pivot.plot.bar(ax=ax)
        ax.axhline(1, color="grey", lw=0.8), ax.set_ylabel("speedup"), ax.grid(alpha=0.3)
        ax.set_title("speedup over the uncompressed model")
        f.tight_layout(), f.savefig(out / "compression_speedup.png", dpi=110), plt.close(f)
        written.append("compression_speedup")
    # 3. sparse vs dense by sparsity
    sparse = tables["sparse_vs_dense"]
    if not sparse.empty:
        fig = px.line(sparse, x="sparsity_level", y="median_ratio", markers=True,
                      title="dense / sparse latency (>1: sparse faster)")
        fig.write_html(out / "sparse_vs_dense.html", include_plotlyjs="directory")
        f, ax = plt.subplots(figsize=(6, 4))
        ax.plot(sparse["sparsity_level"], sparse["median_ratio"], marker="o")
        ax.axhline(1, color="grey", lw=0.8), ax.grid(alpha=0.3)
        ax.set_xlabel("sparsity"), ax.set_ylabel("dense / sparse latency")
        f.tight_layout(), f.savefig(out / "sparse_vs_dense.png", dpi=110), plt.close(f)
        written.append("sparse_vs_dense")
    return written
