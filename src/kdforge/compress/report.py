"""``OUT/report.md`` and ``OUT/pareto.png``: a deployment-style table of the original and every candidate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdforge.compress.gate import verdict


def caption(env: dict[str, Any]) -> str:
    """The machine line under a table: CPU, threads, versions, date."""
    return (f"{env['cpu']}, {env['threads']} runtime thread(s) ({env.get('cores_visible')} core(s) visible), "
            f"torch {env['torch']}, onnxruntime {env.get('onnxruntime')}, Python {env['python']}, {env['date']}")


def rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Table rows (original first) from ``compress.json`` data."""
    orig = data["original"]
    bs = [str(b) for b in data["recipe"]["gate"]["batch_sizes"]]
    out = []
    for c in [orig, *data["candidates"]]:
        fast = c.get("gate", {}).get("faster", {}).get("values", {})
        lat = {b: (fast["latency"][b]["compressed"]["median_ms"] if fast else
                   c.get("latency_ms", {}).get(b)) for b in bs}
        speed = {b: (fast.get("speedup", {}).get(b) if fast else (1.0 if c is orig else None)) for b in bs}
        size = c.get("bytes", {}).get("onnx") or c.get("bytes", {}).get("safetensors")
        failed = next((k for k, v in c.get("gate", {}).items() if not v["ok"]), None)
        gate = "—" if c is orig else ("pass" if c.get("passed") else f"FAIL: {failed}")
        b = c.get("budget", {})
        if b and not b.get("fits", True):
            gate += " (outside the budget)"
        where = {"onnxruntime": " ort", "torch eager": " eager"}.get(b.get("runtime") or "", "")
        budget = "1.00" if c is orig else ("—" if b.get("ratio") is None else f"{b['ratio']:.2f}{where}")
        out.append({"model": c["name"], "family": c["family"], "budget": budget,
                    "size_mb": size / 1e6 if size else None,
                    "params": c["params"], "peak_mb": c.get("peak_rss_mb"), "latency": lat, "speedup": speed,
                    "top1": c["top1"], "drop": orig["top1"] - c["top1"], "gate": gate})
    return out


def table(data: dict[str, Any]) -> str:
    """The markdown table."""
    bs = [str(b) for b in data["recipe"]["gate"]["batch_sizes"]]
    head = (["model", f"{data['budget']['metric']} ratio", "size MB", "params", "peak RSS MB"]
            + [f"ms b{b}" for b in bs] + [f"speed-up b{b}" for b in bs]
            + ["top-1 %", "drop", "gate"])

    def f(v: Any, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows(data):
        cells = [r["model"], r["budget"], f(r["size_mb"], ".3f"), f"{r['params']:,}", f(r["peak_mb"], ".0f")]
        cells += [f(r["latency"][b], ".2f") for b in bs] + [f(r["speedup"][b], ".2f") + "×" for b in bs]
        cells += [f"{r['top1']:.2f}", f"{r['drop']:+.2f}", r["gate"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pareto_plot(data: dict[str, Any], path: Path) -> Path:
    """Top-1 vs batch-1 latency (marker area: size on disk); the Pareto set outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bs = str(data["recipe"]["gate"]["batch_sizes"][0])
    rs = rows(data)
    fig, ax = plt.subplots(figsize=(6, 4))
    front = set(data.get("pareto", []))
    for r in rs:
        lat = r["latency"][bs]
        if lat is None:
            continue
        size = 30 + 400 * (r["size_mb"] or 0) / max(x["size_mb"] or 1e-9 for x in rs)
        ax.scatter(lat, r["top1"], s=size, alpha=0.6, edgecolors="k" if r["model"] in front else "none",
                   marker="*" if r["model"] == "original" else "o")
        ax.annotate(r["model"], (lat, r["top1"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(f"median latency at batch {bs} (ms)")
    ax.set_ylabel("top-1 (%) on the test split")
    ax.set_title("compress: quality vs latency (area: size on disk; outlined: Pareto set)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(res: Any) -> Path:
    """Write ``report.md`` and ``pareto.png`` into the result's folder."""
    from kdforge.engine.checkpoint import atomic_write_text

    data = res.to_json()
    out: Path = res.out
    pareto_plot(data, out / "pareto.png")
    b = data["budget"]
    lines = [f"# compress: {data['name']}", "",
             f"Budget: {b['metric']} at most {b['fraction']:g}x the original; top-1 drop at most {b['max_drop']:g} "
             f"points on the test split (selection and healing never read it)."
             + (" The ratio column is the latency at batch "
                f"{b['latency_batch']} over the original's, measured interleaved with it in the runtime it names: "
                "torch eager for float models (the search), onnxruntime for int8 copies (the gate)."
                if b["metric"] == "latency" else "")
             + " A model outside the budget is never chosen.", "", *_healing(data["recipe"]["heal"]),
             table(data), "", f"*{caption(data['environment'])}. Latency: median of "
             f"{data['recipe']['gate']['rounds']} interleaved rounds (original and candidate alternating) in the "
             "runtime named by each gate; peak RSS: a fresh process loading the ONNX file and running the largest "
             "batch.*", "", "![pareto](pareto.png)", ""]
    if data["chosen"]:
        lines += [f"Chosen: **{data['chosen']}** (best top-1 among the candidates within the budget that passed "
                  "the gate), written as "
                  + ", ".join(f"`{Path(p).name}`" for p in next(c for c in data["candidates"]
                                                              if c["name"] == data["chosen"])["files"].values()) + ".",
                  ""]
    else:
        lines += ["**No candidate passed the gate**; every artifact stays in `candidates/` for inspection.", ""]
    lines += ["## Gate", ""]
    for c in res.candidates:
        failed = verdict(c.checks)
        b = c.info.get("budget", {})
        outside = "" if b.get("fits", True) else (
            f"; outside the budget ({b['metric']} {b['ratio']:.2f}x > {b['fraction']:g}x)" if b.get("ratio") is not None
            else "; not measured against the budget")
        lines.append(f"- **{c.name}**: " + ("passed" if failed is None else f"rejected by `{failed.name}`") + outside)
        lines += [f"  - {ch.line()}" for ch in c.checks]
    if res.skipped:
        lines += ["", "## Families without a candidate", ""]
        lines += [f"- {s.family}: {s.reason}" for s in res.skipped]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.md"


def _healing(h: dict[str, Any]) -> list[str]:
    """The report's line on how candidates were healed (none without healing)."""
    if h["mode"] == "none":
        return []
    if h.get("teacher") == "cache":
        return ["Healing: KD from the original's logits, computed once into the teacher cache `teacher-cache/`.", ""]
    return ["Healing: KD from the original, run live on every batch.", ""]
