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
    (bench / "toy.md").write_text("# Toy bench\n\n| method | top-1 |\n| --- | --- |\n| KD | 71.50 |\n"
                                  "| DKD | 72.00 |\n\n![chart](toy.png)\n\n"
                                  "See [the data](toy.json) and [elsewhere](https://example.org).\n")
    return root


@pytest.fixture(scope="module")
def site(sources: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site") / "site"
    assert main(["report", str(sources / "runs"), str(sources / "bench" / "toy"), "-o", str(out)]) == 0
    return out


def test_page_holds_every_run_and_section(site: Path, sources: Path) -> None:
    page = (site / "index.html").read_text()
    body = page.split('<table id="runs-table"', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr>(.*?)</tr>", body.split("<tbody>", 1)[1])
    assert len(rows) == 5  # kd, alone, staged, the prune run and the cil run (a heading row is in <thead>)
    names = {re.search(r'href="#[^"]+">([^<]+)</a>', r).group(1) for r in rows}  # type: ignore[union-attr]
    assert names == {"runs/kd", "runs/alone", "runs/staged", "runs/prune/sglp-toy", "runs/cil-toy"}
    assert "<td>staged</td>" in next(r for r in rows if ">runs/staged<" in r)
    kd_row = next(r for r in rows if ">runs/kd<" in r)
    results = json.loads((sources / "runs" / "kd" / "results.json").read_text())
    assert "distill" in kd_row and "test top1" in kd_row and f">{results['test_last']['top1']:,.2f}<" in kd_row
    assert f'data-v="{results["info"]["params"]!r}"' in kd_row
    for heading in ("Runs", "Learning curves", "Pruning", "Continual learning", "Benchmarks"):
        assert f">{heading}</h2>" in page
    assert "after learning task t (rows)" in page and "70.50" in page  # the accuracy matrix
    assert "Toy bench" in page and "<td>72.00</td>" in page  # the bench page's table
    imgs = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert all(src.startswith("assets/") and (site / src).is_file() for src in imgs)
    names = " ".join(imgs)
    for part in ("kd-curves", "alone-curves", "alone-samples", "sglp-toy-cka", "sglp-toy-segments", "toy-toy",
                 "all-runs-top1", "staged-stages", "sglp-toy-heal-curves"):
        assert part in names, (part, names)
    # offline: nothing is loaded from elsewhere (links may point out, sources may not)
    assert not re.search(r'(src|href)="(https?:)?//', page.replace('href="https://example.org"', ""))
    assert "<link" not in page and "@import" not in page
    assert 'href="https://example.org"' in page


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
        last = names.index("last")
        heads[last].click()
        up = [float(v) for v in _column(d, last)]
        assert up == sorted(up) and len(up) == 5
        heads[last].click()
        down = [float(v) for v in _column(d, last)]
        assert down == sorted(up, reverse=True)
        run = names.index("run")
        heads[run].click()
        assert _column(d, run) == sorted(_column(d, run), key=str.lower)
        d.execute_script("document.querySelectorAll('details').forEach(x => x.open = true)")
        d.execute_script("window.scrollTo(0, document.body.scrollHeight)")
        images = d.execute_script(
            "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
        assert len(images) >= 7
        assert all(ok and w > 0 for _, ok, w in images), images
        assert [e for e in d.get_log("browser") if e["level"] == "SEVERE"] == []
        d.execute_script("window.scrollTo(0, 0)")
        shot = tmp_path / "report-site.png"
        assert d.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    finally:
        d.quit()
    keep = ROOT / "runs" / "test-output"
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, keep / "report-site.png")
    print(f"screenshot: {keep / 'report-site.png'}")
