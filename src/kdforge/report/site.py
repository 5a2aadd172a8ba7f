"""``kdforge report DIR... -o SITE``: one static, offline HTML page over run folders and benchmark outputs.

The page (``SITE/index.html``) holds a sortable table of runs, learning curves, pruning CKA heatmaps and
segment maps, continual accuracy matrices, diffusion sample grids and the benchmark pages with their
charts. Images are copied to ``SITE/assets/``; the page loads nothing from the network (no CDN, no fonts).
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdforge.engine.run_format import read_results, upgrade_rows
from kdforge.errors import KdforgeError

_SKIP_DIRS = {"checkpoints", "tb", "stages", ".git", "__pycache__", "pruned", "cache"}


@dataclass
class Entry:
    """One thing the page shows: a run (train, staged, prune, cil) or a benchmark page."""

    kind: str  # train | prune | cil | bench
    path: Path
    name: str
    data: dict[str, Any] = field(default_factory=dict)


def discover(roots: list[Path]) -> list[Entry]:
    """Run folders and benchmark pages under ``roots`` (a root may itself be one); a folder that cannot be read
    is an entry of kind ``skipped`` with the reason."""
    found: list[Entry] = []
    seen: set[Path] = set()
    skipped: list[Entry] = []
    for root in roots:
        if not root.exists():
            raise KdforgeError(f"{str(root)!r} does not exist (give run folders, runs/, runs/bench/NAME or "
                               "docs/benchmarks)")
        if root.is_file():
            raise KdforgeError(f"{str(root)!r} is a file; give folders (run folders or benchmark output folders)")
        for d in _walk(root, skipped, root):
            key = d.resolve()
            if key in seen:
                continue
            seen.add(key)
            e = classify(d, root)
            if e is not None:
                found.extend(e)
    return found + skipped


def _walk(root: Path, skipped: list[Entry], top: Path) -> list[Path]:
    out: list[Path] = []
    stack = [root]
    while stack:
        d = stack.pop()
        out.append(d)
        if _is_run(d):  # a run folder's subfolders (checkpoints, stages, heal) are part of it
            continue
        try:
            subs = sorted((p for p in d.iterdir() if p.is_dir() and p.name not in _SKIP_DIRS
                           and not p.name.startswith(".")), reverse=True)
        except OSError as e:
            skipped.append(Entry("skipped", d, _label(d, top), {"why": f"cannot list it: {e.strerror or e}"}))
            continue
        stack.extend(subs)
    return out


def _is_run(d: Path) -> bool:
    return any((d / f).is_file() for f in ("metrics.csv", "results.json", "result.json", "stages.json"))


def _label(d: Path, root: Path) -> str:
    try:
        rel = d.resolve().relative_to(root.resolve().parent)
    except ValueError:
        rel = Path(d.name)
    return rel.as_posix()


def classify(d: Path, root: Path) -> list[Entry] | None:
    """What a folder is: a train, staged, prune or cil run, or a folder of benchmark pages."""
    name = _label(d, root)
    try:
        if (d / "result.json").is_file():
            res = json.loads((d / "result.json").read_text())
            if isinstance(res, dict) and "matrix" in res:
                return [Entry("cil", d, name, res)]
            if isinstance(res, dict) and "stages" in res and "fusion" in res:
                return [Entry("audio", d, name, res)]
        if (d / "compress.json").is_file() and (d / "report.md").is_file():  # kdforge compress: its report page
            return [Entry("bench", d / "report.md", f"{name}/report", {})]
        if (d / "results.json").is_file():
            res = json.loads((d / "results.json").read_text())
            if isinstance(res, dict) and "cka" in res and "segmentation" in res:
                return [Entry("prune", d, name, res)]
            if isinstance(res, dict) and "test_last" in res:
                return [Entry("train", d, name, read_results(d / "results.json"))]
            return [Entry("skipped", d, name, {"why": "results.json holds neither a training nor a pruning result"})]
        if (d / "metrics.csv").is_file():  # unfinished: curves only
            return [Entry("train", d, name, {})]
        if (d / "stages.json").is_file() and not (d / "result.json").is_file():
            return [Entry("skipped", d, name, {"why": "an unfinished multi-stage run (stages.json, no result yet)"})]
    except (OSError, json.JSONDecodeError, ValueError, KdforgeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:160]
        return [Entry("skipped", d, name, {"why": f"unreadable: {why}"})]
    if (d / "demo.json").is_file() and (d / "report.md").is_file():  # kdforge demo: its own paired table
        return [Entry("bench", d / "report.md", f"{name}/demo", {})]
    grids = sorted(d.glob("samples*.png"))
    if grids and any(d.glob("samples*.npz")):  # kdforge sample -o FOLDER
        return [Entry("samples", d, name, {"grids": [str(p) for p in grids]})]
    pages = sorted(p for p in d.glob("*.md") if p.name.lower() not in ("readme.md", "index.md"))
    if pages and (any(p.with_suffix(".json").is_file() for p in pages) or d.name == "benchmarks"):
        return [Entry("bench", p, f"{name}/{p.stem}", {}) for p in pages]
    return None


# -- the page ---------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:1em 2em;
color:#222;line-height:1.45}
h1{margin-bottom:.2em} h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
nav a{margin-right:1em} table{border-collapse:collapse;margin:.6em 0;font-size:14px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left} td.n{text-align:right;font-variant-numeric:tabular-nums}
table.sortable th{cursor:pointer;background:#f3f3f3;user-select:none;white-space:nowrap}
table.sortable th[aria-sort=ascending]::after{content:" \\25B2"}
table.sortable th[aria-sort=descending]::after{content:" \\25BC"}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top} figcaption{font-size:13px;color:#555}
img{max-width:100%;height:auto;border:1px solid #eee} .bench{border:1px solid #ddd;border-radius:6px;
padding:.4em 1em;margin:.6em 0} summary{cursor:pointer} .muted{color:#777;font-size:13px}
code{background:#f5f5f5;padding:0 3px}
pre{background:#f5f5f5;padding:.6em;overflow-x:auto} td.h{text-align:right}
.scroll{overflow-x:auto;max-width:100%} figure{max-width:100%} td.sig{font-weight:600}
h1,h2,h3,p,li,summary{overflow-wrap:anywhere}
@media (max-width:700px){body{padding:.5em .7em} table{font-size:12px} th,td{padding:2px 4px}}
"""

_JS = r"""
(function(){
  // the number a cell starts with (a Unicode minus is a minus; thousands separators and units ignored);
  // text after numbers, empty cells and dashes last
  function key(td){var v=td.getAttribute('data-v');if(v===null)v=td.textContent.trim();
    var t=v.replace(/\u2212/g,'-').replace(/(\d),(?=\d{3})/g,'$1');
    var m=t.match(/^[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?/i);
    if(m)return [0,parseFloat(m[0])];
    if(v===''||v==='\u2014'||v==='-')return [2,''];
    return [1,v.toLowerCase()];}
  function cmp(a,b){if(a[0]!==b[0])return a[0]-b[0];return a[1]<b[1]?-1:a[1]>b[1]?1:0;}
  document.querySelectorAll('table.sortable').forEach(function(t){
    t.querySelectorAll('th').forEach(function(th,i){th.addEventListener('click',function(){
      var asc=th.getAttribute('aria-sort')!=='ascending';
      t.querySelectorAll('th').forEach(function(h){h.removeAttribute('aria-sort');});
      th.setAttribute('aria-sort',asc?'ascending':'descending');
      var body=t.tBodies[0],rows=Array.prototype.slice.call(body.rows);
      rows.sort(function(r1,r2){var c=cmp(key(r1.cells[i]),key(r2.cells[i]));return asc?c:-c;});
      rows.forEach(function(r){body.appendChild(r);});});});});
})();
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _num(v: Any, digits: int = 2) -> tuple[str, str]:
    """(shown text, sort value) of a number; blanks for missing."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return ("—", "") if v in (None, "") else (str(v), str(v))
    return (f"{v:,}" if isinstance(v, int) else f"{v:,.{digits}f}"), repr(v)


class Site:
    """Builds the page: copies images into ``assets/`` and collects HTML sections."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.assets = out / "assets"
        self.used: set[str] = set()

    def asset(self, src: Path, hint: str) -> str:
        """Copy an image next to the page; returns its relative URL."""
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", hint).strip("-") or "img"
        name, i = f"{slug}{src.suffix}", 1
        while name in self.used:
            i += 1
            name = f"{slug}-{i}{src.suffix}"
        self.used.add(name)
        self.assets.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, self.assets / name)
        return f"assets/{name}"

    def new_asset(self, hint: str) -> tuple[Path, str]:
        """A fresh asset path to draw into, and its URL."""
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", hint).strip("-") or "img"
        name, i = f"{slug}.png", 1
        while name in self.used:
            i += 1
            name = f"{slug}-{i}.png"
        self.used.add(name)
        self.assets.mkdir(parents=True, exist_ok=True)
        return self.assets / name, f"assets/{name}"

    def fig(self, url: str, caption: str, width: int | None = None) -> str:
        w = f' style="max-width:min(100%,{width}px)"' if width else ""
        # the image links to itself: on a phone a wide chart shrinks to the screen, a tap opens it full size
        return (f'<figure><a href="{_e(url)}"><img src="{_e(url)}" alt="{_e(caption)}"{w}></a>'
                f"<figcaption>{_e(caption)}</figcaption></figure>")


def _params_from_checkpoint(run: Path) -> int | None:
    for name in ("last.safetensors", "best.safetensors"):
        p = run / "checkpoints" / name
        if p.is_file():
            try:
                from safetensors import safe_open

                n = 0
                with safe_open(str(p), "pt") as f:
                    for k in f.keys():
                        shape = f.get_slice(k).get_shape()
                        size = 1
                        for s in shape:
                            size *= int(s)
                        n += size
                return n
            except Exception:
                return None
    return None


def _config(run: Path) -> dict[str, Any]:
    from kdforge.report.run_report import _load_yaml

    return _load_yaml(run / "config.yaml")


def run_row(e: Entry) -> dict[str, Any]:
    """One row of the runs table: who, what, sizes, and ``values`` (one number per metric column)."""
    row: dict[str, Any] = {"run": e.name, "kind": e.kind, "values": {}}
    vals: dict[str, float | None] = row["values"]
    if e.kind == "train":
        res, cfg = e.data, _config(e.path)
        info = res.get("info") or {}
        md = cfg.get("method") if isinstance(cfg.get("method"), dict) else {}
        assert isinstance(md, dict)
        key = res.get("monitor", "top1")
        student = md.get("student") or md.get("model") or {}
        model = info.get("model") or (student.get("model") if isinstance(student, dict) else None)
        row.update(method=info.get("method") or md.get("name", "?"), model=model or "?", seed=cfg.get("seed"),
                   params=info.get("params") or _params_from_checkpoint(e.path), flops=info.get("flops"),
                   epochs=res.get("epochs"), time=res.get("train_time_s"))
        vals[f"test {key} best"] = (res.get("test_best") or {}).get(key)
        vals[f"test {key} last"] = (res.get("test_last") or {}).get(key)
        if (e.path / "stages.json").is_file():
            row["kind"] = "staged"
    elif e.kind == "prune":
        r = e.data
        rec = r.get("recipe") or {}
        after = r.get("healed") or r.get("after") or {}
        key = "top1" if "top1" in after else "ppl" if "ppl" in after else next(iter(after), "")
        spec = rec.get("model") or rec.get("llm") or {}
        model = spec.get("model") or spec.get("name") if isinstance(spec, dict) else None
        sel = rec.get("selection") if isinstance(rec.get("selection"), dict) else {}
        row.update(method=f"prune {sel.get('method', '')}".strip(), model=model or rec.get("name", "?"),
                   seed=rec.get("seed"), params=after.get("params"), flops=after.get("flops"), epochs=None,
                   time=(r.get("timing_s") or {}).get("analysis_total"))
        vals[f"test {key} last"] = after.get(key)
    elif e.kind == "cil":
        m = e.data.get("metrics") or {}
        cfg = _config(e.path)
        row.update(method=f"cil {e.data.get('learner', '')}", model=(cfg.get("cil") or {}).get("model", "?")
                   if isinstance(cfg.get("cil"), dict) else "?", seed=cfg.get("seed"), params=None, flops=None,
                   epochs=None, time=sum(e.data.get("task_time_s") or []) or None)
        for k, v in m.items():
            if isinstance(v, int | float):
                vals[k] = v
    elif e.kind == "audio":
        cfg = _config(e.path)
        stages = e.data.get("stages") or {}
        fusion = e.data.get("fusion") or {}
        best = next((fusion[k]["test"] for k in ("searched", "published", "uniform")
                     if isinstance(fusion.get(k), dict) and "test" in fusion[k]), None)
        last = best or next(((v.get("test") or {}) for v in reversed(list(stages.values())) if isinstance(v, dict)), {})
        model = (cfg.get("model") or {}).get("model", "?") if isinstance(cfg.get("model"), dict) else "?"
        row.update(method="audio" + (" (fused)" if best else ""), model=model, seed=cfg.get("seed"), params=None,
                   flops=None, epochs=None, time=e.data.get("time_s"))
        for k in ("top1", "mca"):
            if k in last:
                vals[f"test {k} last"] = last[k]
    return row


def metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The metric columns of a table, in first-seen order (one per metric and checkpoint)."""
    cols: list[str] = []
    for r in rows:
        for k in r["values"]:
            if k not in cols:
                cols.append(k)
    return cols


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _header(col: str) -> str:
    """A metric column's heading: its name as a person reads it, with its unit (``average incremental
    accuracy (%)``, ``test top1 last (%)``)."""
    from kdforge.report.units import readable, unit

    metric = col.removeprefix("test ").rsplit(" ", 1)[0] if col.startswith("test ") else col
    u = unit(metric)
    name = col.replace(metric, readable(metric), 1) if metric in col else col
    return f"{name} ({u})" if u else name


_COLUMNS = [("run", "run"), ("kind", "kind"), ("method", "method"), ("model", "model"), ("seed", "seed"),
            ("params", "params"), ("flops", "FLOPs / sample")]
_TAIL = [("epochs", "epochs"), ("time", "time (s)")]


def _cell(k: str, v: Any) -> str:
    from kdforge.engine.callbacks import fmt_count

    if k in ("params", "flops"):
        txt, sv = (fmt_count(v), repr(v)) if isinstance(v, int | float) else ("—", "")
        return f'<td class="n" data-v="{sv}">{_e(txt)}</td>'
    if k in ("time", "epochs", "seed") or k.startswith("m:"):
        txt, sv = _num(v, 1 if k == "time" else 0 if k in ("epochs", "seed") else 2)
        return f'<td class="n" data-v="{_e(sv)}">{_e(txt)}</td>'
    if k == "run":
        return f'<td><a href="#{_anchor(str(v))}">{_e(v)}</a></td>'
    return f"<td>{_e(v if v is not None else '—')}</td>"


def runs_table(rows: list[dict[str, Any]]) -> str:
    """The sortable runs table: one column per metric (with its unit) and checkpoint."""
    metrics = metric_columns(rows)
    cols = [*_COLUMNS, *((f"m:{m}", _header(m)) for m in metrics), *_TAIL]
    head = "".join(f"<th>{_e(t)}</th>" for _, t in cols)
    body = []
    for r in rows:
        cells = [_cell(k, r["values"].get(k[2:]) if k.startswith("m:") else r.get(k)) for k, _ in cols]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table id="runs-table" class="sortable"><thead><tr>{head}</tr></thead><tbody>'
            + "\n".join(body) + "</tbody></table></div>")


def runs_csv(rows: list[dict[str, Any]]) -> str:
    """The runs table as CSV (numbers unformatted)."""
    import csv
    import io

    metrics = metric_columns(rows)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([*(k for k, _ in _COLUMNS), *map(_header, metrics), "epochs", "time_s"])
    for r in rows:
        w.writerow([*(r.get(k) for k, _ in _COLUMNS), *(r["values"].get(m) for m in metrics), r.get("epochs"),
                    r.get("time")])
    return buf.getvalue()


# -- groups: the same recipe over seeds, and the gain over a baseline ----------------------------

#: recipe keys that do not change what is trained (where and how a run ran), left out of a group's identity
_NOT_IDENTITY = {"train": ("device", "progress", "threads", "log_every", "save_checkpoints", "save_every_steps"),
                 "data": ("num_workers", "eval_batch_size")}


def group_identity(cfg: dict[str, Any]) -> str:
    """The recipe minus its seed and name (and the keys that only say where and how it ran), as a key."""
    d = {k: v for k, v in cfg.items() if k not in ("seed", "name")}
    for section, keys in _NOT_IDENTITY.items():
        if isinstance(d.get(section), dict):
            d[section] = {k: v for k, v in d[section].items() if k not in keys}
    return json.dumps(d, sort_keys=True, default=str)


def _student_spec(md: dict[str, Any]) -> str:
    spec = md.get("student") or md.get("model") or {}
    if not isinstance(spec, dict):
        return json.dumps(spec, sort_keys=True, default=str)
    return json.dumps({"model": spec.get("model"), "kwargs": spec.get("kwargs") or {}}, sort_keys=True, default=str)


def _is_plain(md: dict[str, Any]) -> bool:
    """Whether a method trains on the labels alone (supervised, or distill whose only term is ce)."""
    if md.get("name", "supervised") == "supervised":
        return not md.get("label_smoothing")
    terms = md.get("terms")
    return md.get("name") == "distill" and isinstance(terms, list) and bool(terms) and all(
        isinstance(t, dict) and t.get("loss") == "ce" for t in terms)


@dataclass
class Group:
    """Runs of one recipe that differ only in their seed."""

    name: str
    cfg: dict[str, Any]
    rows: list[dict[str, Any]]
    baseline: Group | None = None

    @property
    def seeds(self) -> dict[Any, dict[str, Any]]:
        return {r.get("seed"): r for r in self.rows}


def make_groups(entries: list[Entry], rows: list[dict[str, Any]]) -> list[Group]:
    """Group train runs by recipe identity minus the seed; attach each group's same-data baseline, if any."""
    by: dict[str, Group] = {}
    for e, r in zip(entries, rows, strict=True):
        if e.kind != "train" or not e.data:
            continue
        cfg = _config(e.path)
        if not cfg:
            continue
        g = by.setdefault(group_identity(cfg), Group(str(cfg.get("name") or e.name), cfg, []))
        g.rows.append(r)
    groups = list(by.values())
    for g in groups:
        md = g.cfg.get("method") if isinstance(g.cfg.get("method"), dict) else {}
        if _is_plain(md):
            continue
        cands = [b for b in groups if b is not g and _is_plain(b.cfg.get("method") or {})
                 and b.cfg.get("data") == g.cfg.get("data")
                 and _student_spec(b.cfg.get("method") or {}) == _student_spec(md)
                 and set(b.seeds) & set(g.seeds)]
        if cands:  # the one sharing the most seeds, then the same training length
            g.baseline = max(cands, key=lambda b: (len(set(b.seeds) & set(g.seeds)),
                                                   b.cfg.get("train") == g.cfg.get("train")))
    return groups


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    import statistics

    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def delta(g: Group, metric: str) -> dict[str, Any] | None:
    """The paired difference to the baseline over shared seeds (demo.paired_interval), or None."""
    if g.baseline is None:
        return None
    from kdforge.demo import paired_interval

    pairs = [(r["values"].get(metric), g.baseline.seeds[s]["values"].get(metric)) for s, r in g.seeds.items()
             if s in g.baseline.seeds]
    pairs = [(a, b) for a, b in pairs if isinstance(a, int | float) and isinstance(b, int | float)]
    return paired_interval([a for a, _ in pairs], [b for _, b in pairs]) if pairs else None


def _pm(mean: float, sd: float, n: int) -> str:
    return f"{mean:.2f} ± {sd:.2f} ({n})" if n > 1 else f"{mean:.2f} (1)"


def _signed(x: float) -> str:
    """``+1.25`` / ``−0.50`` (a real minus sign, as the benchmark pages print it)."""
    return f"{x:+.2f}".replace("-", "\u2212")


def _fmt_delta(p: dict[str, Any] | None) -> tuple[str, str, bool]:
    """(text, sort value, whether the interval excludes 0) of a Δ cell."""
    if p is None:
        return "—", "", False
    if p["n"] < 2:
        return f"{_signed(p['mean'])} (1 seed, no interval)", repr(p["mean"]), False
    return (f"{_signed(p['mean'])} [{_signed(p['lo'])}, {_signed(p['hi'])}] ({p['n']})", repr(p["mean"]),
            bool(p["excludes_zero"]))


def groups_table(groups: list[Group]) -> tuple[str, str]:
    """The groups table (mean ± sd (n) per metric, Δ vs baseline) as HTML, and the same as CSV."""
    import csv
    import io

    from kdforge.report.units import higher_is_better

    metrics = [m for m in metric_columns([r for g in groups for r in g.rows]) if m.endswith(" last")]
    head = ["group", "method", "model", "runs", *(_header(m) + " mean ± sd (n)" for m in metrics),
            *(f"Δ {m.removeprefix('test ').removesuffix(' last')} vs baseline [95 % CI] (n)" for m in metrics),
            "baseline"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["group", "method", "model", "runs", *(f"{m} mean" for m in metrics), *(f"{m} sd" for m in metrics),
                *(f"delta {m}" for m in metrics), *(f"delta {m} lo" for m in metrics),
                *(f"delta {m} hi" for m in metrics), "baseline"])
    body = []
    for g in groups:
        md = g.cfg.get("method") if isinstance(g.cfg.get("method"), dict) else {}
        r0 = g.rows[0]
        cells = [f"<td>{_e(g.name)}</td>", f"<td>{_e(r0.get('method'))}</td>", f"<td>{_e(r0.get('model'))}</td>",
                 f'<td class="n" data-v="{len(g.rows)}">{len(g.rows)}</td>']
        stats, ds = [], []
        for m in metrics:
            xs = [r["values"][m] for r in g.rows if isinstance(r["values"].get(m), int | float)]
            mean, sd = _mean_sd(xs) if xs else (float("nan"), float("nan"))
            stats.append((mean, sd))
            cells.append(f'<td class="n" data-v="{mean!r}">{_e(_pm(mean, sd, len(xs)) if xs else "—")}</td>')
        for m in metrics:
            p = delta(g, m)
            ds.append(p)
            txt, sv, sig = _fmt_delta(p)
            if sig and p is not None:
                txt += " better" if (p["mean"] > 0) == higher_is_better(m.split(" ")[1]) else " worse"
            cells.append(f'<td class="{"n sig" if sig else "n"}" data-v="{_e(sv)}">{_e(txt)}</td>')
        cells.append(f"<td>{_e(g.baseline.name) if g.baseline else ('(is one)' if _is_plain(md) else '—')}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
        w.writerow([g.name, r0.get("method"), r0.get("model"), len(g.rows), *(a for a, _ in stats),
                    *(b for _, b in stats), *((p or {}).get("mean") for p in ds), *((p or {}).get("lo") for p in ds),
                    *((p or {}).get("hi") for p in ds), g.baseline.name if g.baseline else ""])
    html_ = ('<div class="scroll"><table id="groups-table" class="sortable"><thead><tr>'
             + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead><tbody>" + "\n".join(body)
             + "</tbody></table></div>")
    return html_, buf.getvalue()


def groups_chart(site: Site, groups: list[Group]) -> str:
    """Mean ± sd of each group's last test metric as bars with error bars, the axis fitted to the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in metric_columns([r for g in groups for r in g.rows]) if m.endswith(" last")]
    out = []
    for m in metrics:
        pts = []
        for g in groups:
            xs = [r["values"][m] for r in g.rows if isinstance(r["values"].get(m), int | float)]
            if xs:
                mean, sd = _mean_sd(xs)
                pts.append((g.name, mean, 0.0 if sd != sd else sd, len(xs)))
        if len(pts) < 2:
            continue
        png, url = site.new_asset(f"groups-{m}")
        fig, ax = plt.subplots(figsize=(7.5, 0.4 * len(pts) + 1.2))
        ys = list(range(len(pts)))
        # points with error bars, not bars: a bar's length would read as distance from zero
        ax.errorbar([p[1] for p in pts], ys, xerr=[p[2] for p in pts], fmt="o", color="#4c78a8", capsize=4)
        ax.set_yticks(ys, [f"{p[0]} (n={p[3]})" for p in pts], fontsize=8)
        lo = min(p[1] - p[2] for p in pts)
        hi = max(p[1] + p[2] for p in pts)
        pad = max((hi - lo) * 0.15, 0.5)
        ax.set_xlim(lo - pad, hi + pad)  # the axis shows the differences, not the distance from zero
        ax.set_xlabel(_header(m) + ": mean ± sd over seeds (the axis does not start at 0)")
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        fig.savefig(png, dpi=100)
        plt.close(fig)
        out.append(site.fig(url, f"groups: {m} (mean ± sd over seeds)"))
    return "".join(out)


def _anchor(name: str) -> str:
    return "r-" + re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")


def _curves(site: Site, e: Entry) -> str:
    from kdforge.engine.run_dir import read_csv
    from kdforge.report.run_report import plot_curves

    parts = []
    if (e.path / "metrics.csv").is_file():
        png, url = site.new_asset(f"{e.name}-curves")
        try:
            plot_curves({e.name: read_csv(e.path / "metrics.csv")}, png, title=e.name,
                        monitor=e.data.get("monitor"))
            parts.append(site.fig(url, f"{e.name}: learning curves"))
        except KdforgeError as err:
            parts.append(f'<p class="muted">{_e(err)}</p>')
    elif (e.path / "curves.png").is_file():
        parts.append(site.fig(site.asset(e.path / "curves.png", f"{e.name}-curves"), f"{e.name}: learning curves"))
    elif stages := sorted((e.path / "stages").glob("*/metrics.csv")):  # a staged run: each stage's curves
        png, url = site.new_asset(f"{e.name}-stages")
        try:
            plot_curves({f.parent.name: read_csv(f) for f in stages}, png, title=f"{e.name}: stages",
                        monitor=e.data.get("monitor"))
            parts.append(site.fig(url, f"{e.name}: learning curves of each stage"))
        except KdforgeError as err:
            parts.append(f'<p class="muted">{_e(err)}</p>')
    for p in sorted([*e.path.glob("samples*.png"), *e.path.glob("samples/*.png")]):  # kdforge sample writes samples/
        parts.append(site.fig(site.asset(p, f"{e.name}-{p.stem}"), f"{e.name}: {p.relative_to(e.path)}", 600))
    return "".join(parts)


def _all_curves(site: Site, entries: list[Entry]) -> str:
    """One chart of every train run's validation metric, per metric (when there are two runs or more)."""
    from kdforge.engine.run_dir import read_csv
    from kdforge.report.run_report import plot_curves

    by_key: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for e in entries:
        if e.kind == "train" and (e.path / "metrics.csv").is_file():
            try:
                rows = upgrade_rows(read_csv(e.path / "metrics.csv"))
            except KdforgeError:
                continue
            by_key.setdefault(e.data.get("monitor", "top1"), {})[e.name] = rows
    out = []
    for key, runs in by_key.items():
        if len(runs) < 2:
            continue
        png, url = site.new_asset(f"all-runs-{key}")
        plot_curves(runs, png, title=f"all runs: {key}", monitor=key)
        out.append(site.fig(url, f"every run's curves (validation {key})"))
    return "".join(out)


def _heat(v: float | None, lo: float = 0.0, hi: float = 100.0) -> str:
    if v is None:
        return ""
    t = max(0.0, min(1.0, (v - lo) / max(hi - lo, 1e-9)))
    r, g, b = int(255 - 155 * t), int(255 - 60 * t), int(255 - 155 * t)
    return f' style="background:rgb({r},{g},{b})"'


def _cil_section(e: Entry) -> str:
    m = e.data.get("matrix") or []
    n = len(m)
    head = "<th>after task</th>" + "".join(f"<th>task {j + 1}</th>" for j in range(n))
    rows = []
    for t, row in enumerate(m):
        cells = "".join(f'<td class="h"{_heat(v)}>{"—" if v is None else f"{v:.2f}"}</td>' for v in row)
        rows.append(f"<tr><td>{t + 1}</td>{cells}</tr>")
    from kdforge.report.units import readable, unit

    metrics = ", ".join(f"{_e(readable(k))} {v:.2f}{(' ' + unit(k)) if unit(k) else ''}"
                        for k, v in (e.data.get("metrics") or {}).items() if isinstance(v, int | float))
    return (f'<h3 id="{_anchor(e.name)}">{_e(e.name)}</h3><p>learner <code>{_e(e.data.get("learner"))}</code>; '
            f"accuracy (%) on each task's test classes (columns) after learning task t (rows)</p>"
            f'<div class="scroll"><table class="matrix"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}'
            f'</tbody></table></div><p class="muted">{metrics}</p>')


def _audio_section(e: Entry) -> str:
    """An audio run: each stage's and each fusion's test metrics."""
    from kdforge.report.units import unit

    rows = []
    for label, d in [*((f"stage {k}", v) for k, v in (e.data.get("stages") or {}).items()),
                     *((f"fused ({k})", v) for k, v in (e.data.get("fusion") or {}).items())]:
        t = (d or {}).get("test") or {}
        rows.append((label, {k: v for k, v in t.items() if isinstance(v, int | float)}))
    keys = [k for k in ("top1", "top5", "mca", "ece") if any(k in r for _, r in rows)]
    head = "".join(f"<th>{_e(k)}{(' (' + unit(k) + ')') if unit(k) else ''}</th>" for k in keys)
    body = "".join(f"<tr><td>{_e(label)}</td>" + "".join(
        f'<td class="n">{_num(r.get(k))[0]}</td>' for k in keys) + "</tr>" for label, r in rows)
    return (f'<h3 id="{_anchor(e.name)}">{_e(e.name)}</h3><div class="scroll"><table class="sortable"><thead><tr>'
            f"<th>model</th>{head}</tr></thead><tbody>{body}</tbody></table></div>")


def _segment_map(res: dict[str, Any], path: Path) -> Path:
    """A strip of the pruned model's units: colour = segment, hatched grey = removed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = res.get("units") or []
    segs = (res.get("segmentation") or {}).get("segments") or []
    kept = set(res.get("kept_names") or [])
    n = len(units)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * n + 1.5), 1.9))
    cmap = plt.get_cmap("tab10")
    seg_of = {i: s for s, seg in enumerate(segs) for i in seg}
    for i, u in enumerate(units):
        on = u in kept
        ax.add_patch(plt.Rectangle((i, 0), 0.92, 1, color=cmap(seg_of.get(i, 0) % 10) if on else "#cccccc",
                                   hatch=None if on else "xx", ec="#888"))
    ax.set_xlim(0, max(n, 1))
    ax.set_ylim(0, 1)
    step = max(1, n // 24)
    ax.set_xticks([i + 0.46 for i in range(0, n, step)], [units[i] for i in range(0, n, step)], rotation=90,
                  fontsize=6)
    ax.set_yticks([])
    ax.set_title(f"segments ({len(segs)}; colour) and removed units (grey): {n - len(kept)} of {n} removed",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _prune_section(site: Site, e: Entry) -> str:
    from kdforge.engine.callbacks import fmt_count

    r = e.data
    parts = [f'<h3 id="{_anchor(e.name)}">{_e(e.name)}</h3>']
    rows = []
    for label in ("before", "after", "healed"):
        d = r.get(label)
        if isinstance(d, dict):
            cells = [fmt_count(v) if k in ("params", "flops") and isinstance(v, int | float) else _num(v)[0]
                     for k, v in d.items()]
            rows.append(f"<tr><td>{label}</td>" + "".join(f'<td class="n">{_e(c)}</td>' for c in cells) + "</tr>")
            keys = list(d)
    if rows:
        parts.append('<div class="scroll"><table><thead><tr><th></th>' + "".join(f"<th>{_e(k)}</th>" for k in keys)
                     + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>")
    if (e.path / "cka.png").is_file():
        parts.append(site.fig(site.asset(e.path / "cka.png", f"{e.name}-cka"),
                              "CKA between layers, segment boundaries drawn", 520))
    elif r.get("cka"):
        from kdforge.prune.report import plot_cka

        png, url = site.new_asset(f"{e.name}-cka")
        import numpy as np

        plot_cka(np.array(r["cka"]), (r.get("segmentation") or {}).get("segments") or [], png, r.get("units"))
        parts.append(site.fig(url, "CKA between layers, segment boundaries drawn", 520))
    if r.get("units"):
        png, url = site.new_asset(f"{e.name}-segments")
        _segment_map(r, png)
        parts.append(site.fig(url, "segment map"))
    for extra in ("importance.png", "tradeoff.png"):
        if (e.path / extra).is_file():
            parts.append(site.fig(site.asset(e.path / extra, f"{e.name}-{Path(extra).stem}"), extra))
    if (e.path / "heal" / "metrics.csv").is_file():
        parts.append(_curves(site, Entry("train", e.path / "heal", f"{e.name}/heal", {})))
    return "".join(parts)


def _bench_section(site: Site, e: Entry) -> str:
    import markdown

    md_path = e.path
    text = md_path.read_text()

    def image(m: re.Match[str]) -> str:
        alt, src = m.group(1), m.group(2).split()[0]
        p = (md_path.parent / src)
        if re.match(r"^[a-z]+:", src) or not p.is_file():
            return f"*[image not available: {alt or src}]*"
        url = site.asset(p, f"{e.name}-{p.stem}")
        return f"[![{alt}]({url})]({url})"  # a tap opens the chart full size

    def link(m: re.Match[str]) -> str:
        label, href = m.group(1), m.group(2)
        if re.match(r"^([a-z]+:|#)", href):
            return m.group(0)
        target = (md_path.parent / href.split("#")[0]).resolve()
        if not target.exists():
            return label
        return f"[{label}]({os.path.relpath(target, site.out.resolve())})"

    text = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", image, text)
    text = re.sub(r"(?<!!)\[([^\]]+)\]\(([^)\s]+)\)", link, text)
    body = markdown.markdown(text, extensions=["tables", "fenced_code", "sane_lists"])
    body = body.replace("<table>", '<div class="scroll"><table class="sortable">').replace("</table>", "</table></div>")
    h1 = re.search(r"^#\s+(.+)$", md_path.read_text(), re.M)
    title = h1.group(1).strip() if h1 else e.name
    title_html = re.sub(r"`([^`]+)`", r"<code>\1</code>", _e(title))
    return (f'<details class="bench" id="{_anchor(e.name)}"><summary><b>{title_html}</b> '
            f'<span class="muted">{_e(md_path)}</span></summary>{body}</details>')


def build_site(roots: list[Path], out: Path, title: str = "kdforge report") -> Path:
    """Write ``out/index.html`` (and ``out/assets/``) over the run folders and benchmark pages under ``roots``."""
    from kdforge.engine.run_dir import check_writable_dir

    entries = discover(roots)
    if not entries:
        raise KdforgeError("found no run folders or benchmark pages under " + ", ".join(repr(str(r)) for r in roots)
                           + " (a run folder holds metrics.csv or results.json; a bench folder NAME.md and NAME.json)")
    check_writable_dir(out, "report folder")
    if (out / "index.html").is_file() and not (out / ".kdforge-site").is_file():
        raise KdforgeError(f"{str(out / 'index.html')!r} exists and was not written by 'kdforge report'; "
                           "choose another -o folder")
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "assets", ignore_errors=True)
    site = Site(out)
    runs = [e for e in entries if e.kind in ("train", "prune", "cil", "audio")]
    benches = [e for e in entries if e.kind == "bench"]
    skipped = [e for e in entries if e.kind == "skipped"]
    sections: list[tuple[str, str, str]] = []
    rows = [run_row(e) for e in runs]
    groups = make_groups(runs, rows)
    if any(len(g.rows) > 1 or g.baseline is not None for g in groups):
        table, csv_text = groups_table(groups)
        (out / "groups.csv").write_text(csv_text)
        sections.append(("groups", "Who beat whom", table
                         + '<p class="muted">One row per recipe: runs that differ only in their seed (and in where '
                           "they ran) are one group; each metric is its mean ± sample sd (n runs). Δ vs baseline: "
                           "the mean of the per-seed differences to the group that trains the same model on the "
                           "same data with cross-entropy alone, with its 95 % t-interval; bold where the interval "
                           'excludes 0. <a href="groups.csv">CSV</a></p>' + groups_chart(site, groups)))
    if runs:
        (out / "runs.csv").write_text(runs_csv(rows))
        sections.append(("runs", "Runs", runs_table(rows)
                         + '<p class="muted">Click a column to sort. best: the test metric of the checkpoint that '
                           "was best on validation; last: of the last epoch (units in the headers). "
                           '<a href="runs.csv">Download the table as CSV</a>.</p>'))
    trains = [e for e in runs if e.kind == "train"]
    if trains:
        body = _all_curves(site, trains) + "".join(
            f'<h3 id="{_anchor(e.name)}">{_e(e.name)}</h3>{_curves(site, e)}' for e in trains)
        sections.append(("curves", "Learning curves", body))
    prunes = [e for e in runs if e.kind == "prune"]
    if prunes:
        sections.append(("pruning", "Pruning", "".join(_prune_section(site, e) for e in prunes)))
    cils = [e for e in runs if e.kind == "cil"]
    if cils:
        sections.append(("continual", "Continual learning", "".join(_cil_section(e) for e in cils)))
    audios = [e for e in runs if e.kind == "audio"]
    if audios:
        sections.append(("audio", "Audio", "".join(_audio_section(e) for e in audios)))
    grids = [e for e in entries if e.kind == "samples"]
    if grids:
        sections.append(("samples", "Samples", "".join(
            f'<h3 id="{_anchor(e.name)}">{_e(e.name)}</h3>' + "".join(
                site.fig(site.asset(Path(p), f"{e.name}-{Path(p).stem}"), Path(p).name, 600)
                for p in e.data["grids"]) for e in grids)))
    if benches:
        sections.append(("benchmarks", "Benchmarks", "".join(_bench_section(site, e) for e in benches)))
    if skipped:
        sections.append(("not-shown", "Not shown", "<p>Folders under the given paths that the report could not "
                         "read:</p><ul>" + "".join(f"<li><code>{_e(e.path)}</code>: {_e(e.data.get('why'))}</li>"
                                                   for e in skipped) + "</ul>"))
    nav = " ".join(f'<a href="#{k}">{_e(t)}</a>' for k, t, _ in sections)
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    from kdforge import __version__

    srcs = ", ".join(f"<code>{_e(r)}</code>" for r in roots)
    counts = f"{_plural(len(runs), 'run')}, {_plural(len(benches), 'benchmark page')} from {srcs}"
    unread = f" ({_plural(len(skipped), 'folder')} not readable: see <a href=\"#not-shown\">Not shown</a>)"
    page = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{_e(title)}</h1><p class=\"muted\">{counts}"
            + (unread if skipped else "")
            + "; "
            f"kdforge {_e(__version__)}, {stamp}</p><nav>{nav}</nav>"
            + "".join(f'<h2 id="{k}">{_e(t)}</h2>{b}' for k, t, b in sections)
            + f"<script>{_JS}</script></body></html>\n")
    (out / ".kdforge-site").write_text("written by 'kdforge report -o'; a rerun replaces index.html and assets/\n")
    (out / "index.html").write_text(page)
    return out / "index.html"
