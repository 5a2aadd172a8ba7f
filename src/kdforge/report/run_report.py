"""report.md and a learning-curve PNG for one run folder."""

from __future__ import annotations

import json
from pathlib import Path

from kdforge.engine.run_dir import read_csv
from kdforge.errors import KdforgeError


def plot_curves(runs: dict[str, list[dict[str, str]]], path: Path, title: str = "") -> Path:
    """Plot train loss and validation top-1 per epoch for one or more runs into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, rows in runs.items():
        ep = [int(float(r["epoch"])) + 1 for r in rows]
        ax1.plot(ep, [float(r["train_loss"]) if r.get("train_loss") else float("nan") for r in rows], label=label)
        pts = [(e, float(r["val_top1"])) for e, r in zip(ep, rows, strict=True) if r.get("val_top1")]
        if pts:
            ax2.plot(*zip(*pts, strict=True), marker="o", ms=3, label=label)
    ax1.set(xlabel="epoch", ylabel="train loss", title="training loss")
    ax2.set(xlabel="epoch", ylabel="val top-1 (%)", title="validation accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_run_report(run_dir: str | Path) -> Path:
    """(Re)write ``report.md`` and ``curves.png`` of a run folder from its files alone."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.csv"
    if not metrics.is_file():
        raise KdforgeError(f"{str(run_dir)!r} is not a run folder (no metrics.csv)")
    rows = read_csv(metrics)
    plot_curves({run_dir.name: rows}, run_dir / "curves.png", title=run_dir.name)
    res = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").is_file() else {}
    lines = [f"# Run `{run_dir.name}`", ""]
    if res:
        key = res.get("monitor", "top1")
        lines += ["| metric | value |", "| --- | --- |", f"| epochs | {res['epochs']} |"]
        if res.get("best_value", res.get("best_val_top1")) is not None and res.get("best_epoch", -1) >= 0:
            best = res.get("best_value", res.get("best_val_top1"))
            lines.append(f"| best val {key} | {best:.2f} (epoch {res['best_epoch'] + 1}) |")
        else:
            lines.append("| best by validation | none (no validation split: only the last checkpoint is kept) |")
        for name, d in (("last", res.get("test_last")), ("best-by-val", res.get("test_best"))):
            for k, v in (d or {}).items():
                if k in ("top1", "top5", key) and isinstance(v, int | float):
                    lines.append(f"| test {k}, {name} | {v:.2f} |")
        lines += [f"| training time | {res.get('train_time_s', 0.0):.1f} s |", ""]
    lines += ["![learning curves](curves.png)", "", "Recipe: [config.yaml](config.yaml); per-epoch metrics: "
              "[metrics.csv](metrics.csv); weights: `checkpoints/{best,last}.safetensors`.", ""]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines))
    return out
