"""``kdforge report DIR... -o SITE``: one offline HTML page over runs and benchmarks, checked in a real browser.

The browser test drives Debian's Chromium through its chromedriver (``/usr/bin/chromedriver``; Selenium
downloads nothing), headless and, as root, without the sandbox. It checks that the page loads with no
console errors, that clicking a column sorts the runs table (both ways), and that every image on the
page (benchmark pages opened) has loaded (``naturalWidth > 0``); its screenshot is copied to
``runs/test-output/report-site.png``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

import kdforge as kd
from kdforge.cli import main
from tests.conftest import digits_recipe

ROOT = Path(__file__).parents[1]
CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def _png(path: Path, seed: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.imsave(path, np.random.default_rng(seed).random((32, 48, 3)))
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two trained runs (one with diffusion-style sample grids), a prune result, a cil result, a bench folder."""
    root = tmp_path_factory.mktemp("sources")
    runs = root / "runs"
    for name, method, epochs in (("kd", {"name": "distill", "teacher": {"model": "mlp"},
                                         "student": {"model": "mlp", "kwargs": {"hidden": [32]}},
                                         "terms": [{"loss": "ce"}, {"loss": "kd", "weight": 0.5, "T": 2}]}, 2),
                                 ("alone", {"name": "supervised", "model": {"model": "mlp"}}, 3)):
        kd.train(kd.Recipe.from_dict(digits_recipe(method, epochs=epochs, name=name)), runs / name)
    _png(runs / "alone" / "samples.png", 0)
    # the same student over two seeds, with KD and alone (its baseline): one group each, and a paired delta
    student = {"model": "mlp", "kwargs": {"hidden": [16]}}
    for seed in (0, 1):
        kd.train(kd.Recipe.from_dict(digits_recipe(
            {"name": "distill", "teacher": {"model": "mlp", "weights": "random"}, "student": student,
             "terms": [{"loss": "ce"}, {"loss": "kd", "weight": 0.5, "T": 2}]}, epochs=2, name="g-kd", seed=seed)),
            runs / f"g-kd-seed{seed}")
        kd.train(kd.Recipe.from_dict(digits_recipe({"name": "supervised", "model": student}, epochs=2,
                                                    name="g-base", seed=seed)), runs / f"g-base-seed{seed}")
    (runs / "alone" / "samples").mkdir()  # where `kdforge sample` writes by default
    _png(runs / "alone" / "samples" / "samples-8steps-seed0-n16.png", 2)
    grid = root / "mysamples"  # `kdforge sample -o mysamples`
    grid.mkdir()
    _png(grid / "samples-8steps-seed1-n16.png", 3)
    np.savez(grid / "samples-8steps-seed1-n16.npz", x=np.zeros(1))
    (runs / "audio-toy").mkdir()
    (runs / "audio-toy" / "stages.json").write_text("{}")
    (runs / "audio-toy" / "result.json").write_text(json.dumps({
        "stages": {"slowfast": {"test": {"top1": 41.5, "mca": 30.25}}},
        "fusion": {"uniform": {"weights": [1.0], "test": {"top1": 44.75, "mca": 33.5}}}, "time_s": 12.0}))
    (runs / "broken").mkdir()
    (runs / "broken" / "results.json").write_text("{not json")
    prune = runs / "prune" / "sglp-toy"
    prune.mkdir(parents=True)
    cka = np.eye(6) * 0.5 + 0.5
    (prune / "results.json").write_text(json.dumps({
        "name": "sglp-toy", "units": [f"layer{i}" for i in range(6)], "cka": cka.tolist(),
        "segmentation": {"segments": [[0, 1, 2], [3, 4, 5]]}, "kept_names": ["layer0", "layer3", "layer4"],
        "before": {"top1": 91.5, "params": 270000}, "after": {"top1": 80.25, "params": 140000},
        "healed": {"top1": 89.0, "params": 140000}, "timing_s": {"analysis_total": 3.5},
        "recipe": {"name": "sglp-toy", "model": {"model": "resnet20"}, "selection": {"method": "sglp"}}}))
    (prune / "heal").mkdir()
    shutil.copyfile(runs / "kd" / "metrics.csv", prune / "heal" / "metrics.csv")
    staged = runs / "staged"  # a multi-stage run: results at the top, per-stage metrics below
    for stage in ("00-init", "01-main"):
        (staged / "stages" / stage).mkdir(parents=True)
        shutil.copyfile(runs / "alone" / "metrics.csv", staged / "stages" / stage / "metrics.csv")
    shutil.copyfile(runs / "alone" / "results.json", staged / "results.json")
    (staged / "stages.json").write_text("{}")
    cil = runs / "cil-toy"
    cil.mkdir()
    (cil / "config.yaml").write_text(yaml.safe_dump({"cil": {"model": "cnn_small"}}))
    (cil / "stages.json").write_text("{}")
    (cil / "result.json").write_text(json.dumps({
        "learner": "ir", "matrix": [[90.0, None], [70.5, 60.0]], "test_sizes": [100, 100],
        "metrics": {"avg_inc_acc": 77.6, "last_acc": 65.25}, "task_time_s": [1.0, 2.0]}))
    bench = root / "bench" / "toy"
    bench.mkdir(parents=True)
    _png(bench / "toy.png", 1)
    (bench / "toy.json").write_text("{}")
    (bench / "toy.md").write_text("# Toy bench\n\n| method | top-1 | Δ vs KD | latency |\n| --- | --- | --- | --- |\n"
                                  "| KD | 71.50 | 0.00 | 146.7 ms |\n| DKD | 72.00 | +0.50 | 12.0 ms |\n"
                                  "| FitNet | 69.25 | −2.25 | 9.5 ms |\n| AT | — | — | 1,024 ms |\n\n"
                                  "![chart](toy.png)\n\n"
                                  "See [the data](toy.json) and [elsewhere](https://example.org).\n")
    return root


@pytest.fixture(scope="module")
def site(sources: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site") / "site"
    assert main(["report", str(sources / "runs"), str(sources / "bench" / "toy"), str(sources / "mysamples"),
                 "-o", str(out)]) == 0
    return out


def test_page_holds_every_run_and_section(site: Path, sources: Path) -> None:
    page = (site / "index.html").read_text()
    body = page.split('<table id="runs-table"', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr>(.*?)</tr>", body.split("<tbody>", 1)[1])
    assert len(rows) == 10  # a heading row is in <thead>
    names = {re.search(r'href="#[^"]+">([^<]+)</a>', r).group(1) for r in rows}  # type: ignore[union-attr]
    assert names == {"runs/kd", "runs/alone", "runs/staged", "runs/prune/sglp-toy", "runs/cil-toy", "runs/audio-toy",
                     *(f"runs/g-{m}-seed{s}" for m in ("kd", "base") for s in (0, 1))}
    assert "<td>staged</td>" in next(r for r in rows if ">runs/staged<" in r)
    kd_row = next(r for r in rows if ">runs/kd<" in r)
    results = json.loads((sources / "runs" / "kd" / "results.json").read_text())
    assert "distill" in kd_row and f">{results['test_last']['top1']:,.2f}<" in kd_row
    # one column per metric, named as a person reads it, with its unit
    assert "<th>test top1 last (%)</th>" in body and "<th>average incremental accuracy (%)</th>" in body
    assert "10 runs, 1 benchmark page from" in page and "(1 folder not readable" in page  # not "1 pages"
    # every chart opens full size on a tap (a wide chart is shrunk to a phone's width)
    imgs = re.findall(r'<img src="([^"]+)"', page)
    assert imgs and all(f'<a href="{src}"><img src="{src}"' in page for src in imgs), imgs
    assert f'data-v="{results["info"]["params"]!r}"' in kd_row
    for heading in ("Who beat whom", "Runs", "Learning curves", "Pruning", "Continual learning", "Audio", "Samples",
                    "Benchmarks", "Not shown"):
        assert f">{heading}</h2>" in page
    assert "after learning task t (rows)" in page and "70.50" in page  # the accuracy matrix
    assert "Toy bench" in page and "<td>72.00</td>" in page  # the bench page's table
    imgs = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert all(src.startswith("assets/") and (site / src).is_file() for src in imgs)
    names = " ".join(imgs)
    for part in ("kd-curves", "alone-curves", "alone-samples", "sglp-toy-cka", "sglp-toy-segments", "toy-toy",
                 "all-runs-top1", "staged-stages", "sglp-toy-heal-curves", "samples-8steps-seed0-n16",
                 "mysamples-samples-8steps-seed1-n16", "groups-test-top1-last"):
        assert part in names, (part, names)
    # offline: nothing is loaded from elsewhere (links may point out, sources may not)
    assert not re.search(r'(src|href)="(https?:)?//', page.replace('href="https://example.org"', ""))
    assert "<link" not in page and "@import" not in page
    assert 'href="https://example.org"' in page


def test_groups_mean_sd_and_paired_delta(site: Path, sources: Path) -> None:
    """Seeds of one recipe are one group; its delta to the same-data baseline is a paired t-interval."""
    import statistics

    from scipy.stats import t

    last = {(m, s): json.loads((sources / "runs" / f"g-{m}-seed{s}" / "results.json").read_text())["test_last"]["top1"]
            for m in ("kd", "base") for s in (0, 1)}
    page = (site / "index.html").read_text()
    table = page.split('<table id="groups-table"', 1)[1].split("</table>", 1)[0]
    row = next(r for r in re.findall(r"<tr>(.*?)</tr>", table) if "<td>g-kd</td>" in r)
    kd_runs = [last["kd", 0], last["kd", 1]]
    assert f"{statistics.fmean(kd_runs):.2f} ± {statistics.stdev(kd_runs):.2f} (2)" in row
    d = [last["kd", s] - last["base", s] for s in (0, 1)]
    half = t.ppf(0.975, 1) * statistics.stdev(d) / 2**0.5
    mean = statistics.fmean(d)

    def signed(x: float) -> str:
        return f"{x:+.2f}".replace("-", "\u2212")
    assert f"{signed(mean)} [{signed(mean - half)}, {signed(mean + half)}] (2)" in row and "<td>g-base</td>" in row
    # the CSV exports hold the same numbers, unformatted
    runs_csv = (site / "runs.csv").read_text().splitlines()
    assert runs_csv[0].startswith("run,kind,method,model,seed,params,flops,") and len(runs_csv) == 11
    groups_csv = (site / "groups.csv").read_text()
    assert "g-kd,distill" in groups_csv and repr(statistics.fmean(kd_runs))[:8] in groups_csv
    # unreadable folders are listed with the reason; the audio run shows its stages and fusion
    assert "runs/broken" in page.split('id="not-shown"', 1)[1] and "unreadable" in page
    assert "fused (uniform)" in page and "44.75" in page


def test_report_folder_safety(sources: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "index.html").write_text("my page")
    assert main(["report", str(sources / "runs"), "-o", str(foreign)]) == 2
    assert "not made by kdforge" in capsys.readouterr().err  # the run-folder layer's refusal
    assert (foreign / "index.html").read_text() == "my page"
    assert main(["report", str(tmp_path / "nothing-here"), "-o", str(tmp_path / "s")]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty), "-o", str(tmp_path / "s")]) == 2
    assert "found no run folders" in capsys.readouterr().err


def _driver():  # type: ignore[no-untyped-def]
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,2000"):
        opts.add_argument(a)
    if os.geteuid() == 0:
        opts.add_argument("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    opts.binary_location = str(CHROMIUM)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=str(DRIVER)), options=opts)


def _column(d, i: int) -> list[str]:  # type: ignore[no-untyped-def]
    return d.execute_script(
        f"return Array.from(document.querySelectorAll('#runs-table tbody tr'))"
        f".map(r => r.cells[{i}].textContent.trim())")


@pytest.mark.skipif(not (CHROMIUM.is_file() and DRIVER.is_file()),
                    reason="no browser: install Debian's chromium and chromium-driver (.ci/run does as root)")
def test_page_in_a_headless_browser(site: Path, tmp_path: Path) -> None:
    pytest.importorskip("selenium", reason="selenium is in the dev extra: pip install -e '.[dev]'")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not try to download a driver
    d = _driver()
    try:
        d.get((site / "index.html").as_uri())
        assert d.title == "kdforge report"
        errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors
        heads = d.find_elements("css selector", "#runs-table thead th")
        names = [h.text.strip() for h in heads]
        last = names.index("test top1 last (%)")
        heads[last].click()
        shown = _column(d, last)
        up = [float(v) for v in shown if v != "—"]
        assert up == sorted(up) and len(up) == 9 and shown[-1] == "—"  # numbers first, the blank (cil) last
        heads[last].click()
        down = [float(v) for v in _column(d, last) if v != "—"]
        assert down == sorted(up, reverse=True)
        run = names.index("run")
        heads[run].click()
        assert _column(d, run) == sorted(_column(d, run), key=str.lower)
        d.execute_script("document.querySelectorAll('details').forEach(x => x.open = true)")
        # a benchmark page's own table sorts by the number each cell starts with: a Unicode minus is a minus,
        # "146.7 ms" is 146.7, "1,024 ms" is 1024, and a dash goes last
        bench = d.find_element("css selector", "details.bench table")
        bheads = bench.find_elements("css selector", "thead th")
        col = lambda i: d.execute_script(
            "return Array.from(arguments[0].tBodies[0].rows).map(r => r.cells[arguments[1]].textContent.trim())",
            bench, i)
        bheads[2].click()
        assert col(2) == ["−2.25", "0.00", "+0.50", "—"]
        bheads[3].click()
        assert col(3) == ["9.5 ms", "12.0 ms", "146.7 ms", "1,024 ms"]
        # grouping: the seeds of one recipe are one row, with its paired gain over the baseline
        groups = d.execute_script("return Array.from(document.querySelectorAll('#groups-table tbody tr'))"
                                  ".map(r => [r.cells[0].textContent, r.cells[3].textContent])")
        assert ["g-kd", "2"] in groups and ["g-base", "2"] in groups and len(groups) == 4
        d.execute_script("window.scrollTo(0, document.body.scrollHeight)")
        images = d.execute_script(
            "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
        assert len(images) >= 7
        assert all(ok and w > 0 for _, ok, w in images), images
        assert [e for e in d.get_log("browser") if e["level"] == "SEVERE"] == []
        d.execute_script("window.scrollTo(0, 0)")
        shot = tmp_path / "report-site.png"
        assert d.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        # at a desktop's and a phone's width the page never scrolls sideways: wide tables scroll in their box
        for width in (1400, 400):
            d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": width, "height": 1200,
                                                                     "deviceScaleFactor": 1, "mobile": width < 600})
            d.get((site / "index.html").as_uri())
            d.execute_script("document.querySelectorAll('details').forEach(x => x.open = true)")
            sw, cw = d.execute_script("return [document.documentElement.scrollWidth, "
                                      "document.documentElement.clientWidth]")
            assert width - 20 <= cw <= width and sw <= cw, (width, sw, cw)  # cw: less a scrollbar
            d.save_screenshot(str(tmp_path / f"report-site-{width}.png"))
    finally:
        d.quit()
    keep = ROOT / "runs" / "test-output"
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, keep / "report-site.png")
    for width in (1400, 400):
        shutil.copyfile(tmp_path / f"report-site-{width}.png", keep / f"report-site-{width}.png")
    print(f"screenshot: {keep / 'report-site.png'}")
