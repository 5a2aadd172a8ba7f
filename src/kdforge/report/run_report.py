"""report.md and a learning-curve PNG for one run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdforge.engine.run_format import read_results, upgrade_rows
from kdforge.errors import KdforgeError

#: epochs up to which every point of a curve gets a marker
MARKERS_UP_TO = 30


def _f(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(int(_f(r["epoch"])), _f(r[key])) for r in rows if r.get(key) not in (None, "")]
    return [p[0] for p in pts], [p[1] for p in pts]


def monitor_key(rows: list[dict[str, Any]], monitor: str | None = None) -> str | None:
    """The validation column to plot: ``val_<monitor>``, else ``val_top1``, else the first non-loss ``val_`` column."""
    keys = [k for r in rows for k in r]
    for k in ([f"val_{monitor}"] if monitor else []) + ["val_top1"]:
        if k in keys:
            return k
    return next((k for k in keys if k.startswith("val_") and "loss" not in k), None)


def curve_panels(rows: list[dict[str, Any]], monitor: str | None = None) -> list[tuple[str, str, str]]:
    """The panels of a curves plot, as (column, title, y label): training loss, the validation metric,
    validation loss and learning rate, each where the rows have it."""
    keys = {k for r in rows for k in r if r.get(k) not in (None, "")}
    val_key = monitor_key(rows, monitor)
    panels: list[tuple[str, str, str]] = [("train_loss", "training loss", "loss")]
    if val_key:
        unit = " (%)" if any(a in val_key for a in ("top", "acc", "R@", "mAP")) else ""
        panels.append((val_key, f"validation {val_key.removeprefix('val_')}", val_key.removeprefix("val_") + unit))
    if "val_loss" in keys:
        panels.append(("val_loss", "validation loss", "loss"))
    if "lr" in keys:
        panels.append(("lr", "learning rate", "lr"))
    return panels


def plot_curves(runs: dict[str, list[dict[str, Any]]], path: Path, title: str = "", monitor: str | None = None) -> Path:
    """Plot per-epoch training loss (and each loss term of a single run), the validation metric,
    validation loss and learning rate of one or more runs' metrics rows into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = {label: upgrade_rows(rows) for label, rows in runs.items()}
    every = [r for rows in runs.values() for r in rows]
    panels = curve_panels(every, monitor)
    terms = sorted({k for r in every for k in r if k.startswith("train_loss_") and r.get(k) not in (None, "")})
    multi = len(runs) > 1
    legend_rows = -(-len(runs) // 4) if multi else 0  # one legend below the panels, four runs a row
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 0.8, 3.6 + 0.25 * legend_rows),
                             squeeze=False)
    for ax, (key, name, ylabel) in zip(axes[0], panels, strict=True):
        for label, rows in runs.items():
            ep, ys = _series(rows, key)
            mk = "o" if len(rows) <= MARKERS_UP_TO else None
            if key == "train_loss" and len(runs) == 1 and terms:
                ax.plot(ep, ys, marker=mk, ms=3, lw=2, label="total (weighted)")
                for t in terms:
                    tep, tys = _series(rows, t)
                    ax.plot(tep, tys, marker=mk, ms=2.5, lw=1, ls="--", label=t.removeprefix("train_loss_"))
            elif ep:
                ax.plot(ep, ys, marker=mk, ms=3, label=label)
        ax.set(xlabel="epoch", ylabel=ylabel, title=name)
        epochs = sorted({int(_f(r["epoch"])) for rows in runs.values() for r in rows
                         if r.get("epoch") not in (None, "")})
        if 0 < len(epochs) <= 12:  # a short run: a tick at every epoch
            ax.set_xticks(epochs)
            ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if not multi and key == "train_loss" and terms and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)  # one run: its loss terms
    if multi:  # several runs: one legend for the figure, not one over each panel's curves
        handles, labels = max((ax.get_legend_handles_labels() for ax in axes[0]), key=lambda hl: len(hl[1]))
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.25 * legend_rows / (3.6 + 0.25 * legend_rows) + (0.02 if multi else 0), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        d = yaml.safe_load(path.read_text()) if path.is_file() else None
    except yaml.YAMLError:
        return {}
    return d if isinstance(d, dict) else {}


def _model_name(spec: Any) -> str:
    if isinstance(spec, dict):
        kw = spec.get("kwargs") or {}
        extra = f" ({', '.join(f'{k}={v}' for k, v in kw.items())})" if kw else ""
        ck = f", weights `{spec['checkpoint']}`" if spec.get("checkpoint") else ""
        return f"`{spec.get('model', '?')}`{extra}{ck}"
    if isinstance(spec, list):
        return "; ".join(_model_name(s) for s in spec)
    return "?"


def _fmt(v: Any, digits: int = 2) -> str:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    return f"{v:,}" if isinstance(v, int) else f"{v:.{digits}f}"


def method_lines(config: dict[str, Any], info: dict[str, Any]) -> list[str]:
    """The method part of a report: method, model(s), teacher(s), loss terms with weights."""
    from kdforge.engine.callbacks import fmt_count

    md = config.get("method") if isinstance(config.get("method"), dict) else {}
    assert isinstance(md, dict)
    lines = [f"**Method** `{md.get('name', info.get('method', '?'))}`", ""]
    params = f" — {fmt_count(info['params'])} parameters" if info.get("params") else ""
    flops = f", {fmt_count(info['flops'])}FLOPs per sample" if info.get("flops") else ""
    teacher = md.get("teacher") or md.get("teachers")
    if teacher:
        lines.append(f"- student: {_model_name(md.get('student', {}))}{params}{flops}")
        tp = f" — {fmt_count(info['teacher_params'])} parameters, frozen" if info.get("teacher_params") else ""
        lines.append(f"- teacher: {_model_name(teacher)}{tp}")
    elif md.get("model") or md.get("student"):
        lines.append(f"- model: {_model_name(md.get('model') or md.get('student'))}{params}{flops}")
    elif params:
        lines.append(f"- model: `{info.get('model', '?')}`{params}{flops}")
    terms = md.get("terms")
    if isinstance(terms, list) and terms:
        lines += ["", "Loss = Σ weight × term (each term's unweighted value is plotted as `train_loss_<term>`):", "",
                  "| term | weight | options |", "| --- | --- | --- |"]
        for t in terms:
            if isinstance(t, dict):
                opts = ", ".join(f"{k}={v}" for k, v in t.items() if k not in ("loss", "weight"))
                lines.append(f"| {t.get('loss', '?')} | {t.get('weight', 1.0)} | {opts or '—'} |")
    return [*lines, ""]


def write_run_report(run_dir: str | Path) -> Path:
    """(Re)write ``report.md`` and ``curves.png`` of a run folder from its files alone (any format version)."""
    from kdforge.engine.run_dir import read_csv

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.csv"
    if not metrics.is_file():
        raise KdforgeError(f"{str(run_dir)!r} is not a run folder (no metrics.csv)")
    rows = upgrade_rows(read_csv(metrics))
    res = read_results(run_dir / "results.json") if (run_dir / "results.json").is_file() else {}
    config = _load_yaml(run_dir / "config.yaml")
    key = res.get("monitor", "top1")
    plot_curves({run_dir.name: rows}, run_dir / "curves.png", title=run_dir.name, monitor=key)
    lines = [f"# Run `{run_dir.name}`", "", *method_lines(config, res.get("info") or {})]
    if res:
        lines += ["| result | value |", "| --- | --- |", f"| epochs | {res['epochs']} |"]
        best = res.get("best_value", res.get("best_val_top1"))
        if best is not None and res.get("best_epoch", -1) >= 1:
            lines.append(f"| best val {key} | {best:.2f} (epoch {res['best_epoch']}) |")
        else:
            lines.append("| best by validation | none (no validation split: only the last checkpoint is kept) |")
        for name, d in (("last", res.get("test_last")), ("best-by-val", res.get("test_best"))):
            for k, v in (d or {}).items():
                if k in ("top1", "top5", key) and isinstance(v, int | float):
                    lines.append(f"| test {k}, {name} | {v:.2f} |")
        lines += [f"| training time | {res.get('train_time_s', 0.0):.1f} s |", ""]
    lines += ["![learning curves](curves.png)", "", "Recipe: [config.yaml](config.yaml); per-epoch metrics: "
              "[metrics.csv](metrics.csv) (epochs from 1, accuracies in %); weights: "
              "`checkpoints/{best,last}.safetensors`.", ""]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines))
    return out
