"""The documentation: the CLI reference matches the command, every link resolves inside the repository,
every method page is reachable from the guide, and the MkDocs site builds offline with ``--strict``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kdforge.report.cli_doc import cli_markdown, command_names
from kdforge.report.recipe_doc import recipe_markdown, schema_keys

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def test_cli_reference_matches_the_command() -> None:
    page = (DOCS / "cli.md").read_text()
    assert page == cli_markdown(), "docs/cli.md is out of date with the kdforge command: run 'make docs-cli'"
    for name in command_names():
        assert f"## `kdforge {name}`" in page or f"### `kdforge {name}`" in page, name


def test_recipe_key_reference_matches_the_schemas() -> None:
    page = (DOCS / "recipe-keys.md").read_text()
    assert page == recipe_markdown(), "docs/recipe-keys.md is out of date with the schemas: run 'make docs-cli'"
    # every key of every section of a train recipe has its row, under its section's heading
    for section, keys in schema_keys().items():
        part = page.split(f"\n### {section}\n", 1)[1].split("\n#", 1)[0]
        for key in keys:
            assert f"| `{key}` |" in part, (section, key)
    for method in ("distill", "supervised", "dml", "mixskd"):
        assert f"### method `{method}`" in page
    assert "| `dkd` | `alpha` (1.0), `beta` (8.0), `T` (4.0), `warmup` (20) |" in page


def _links(md: Path) -> list[str]:
    text = FENCE.sub("", md.read_text())
    text = re.sub(r"`[^`]*`", "", text)
    return [a or b for a, b in LINK.findall(text)]


def test_every_relative_link_resolves_inside_the_repository() -> None:
    bad = []
    for md in sorted(DOCS.rglob("*.md")):
        for link in _links(md):
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", link) or link.startswith("#"):
                continue
            target = Path(os.path.normpath(md.parent / link.split("#")[0]))
            if not target.is_relative_to(ROOT) or not target.exists():
                bad.append(f"{md.relative_to(ROOT)} -> {link}")
    assert bad == [], "broken or out-of-repository links:\n" + "\n".join(bad)


def test_the_guide_reaches_every_page() -> None:
    index = DOCS / "index.md"
    linked = {os.path.normpath(DOCS / link.split("#")[0]) for link in _links(index) if not link.startswith("#")}
    for page in sorted((DOCS / "methods").glob("*.md")):
        assert str(page) in linked, f"docs/index.md does not link {page.relative_to(ROOT)}"
    # a benchmark page is linked from the guide or from its method's page
    from_methods = {os.path.normpath(p.parent / link.split("#")[0]) for p in (DOCS / "methods").glob("*.md")
                    for link in _links(p)}
    for page in sorted((DOCS / "benchmarks").glob("*.md")):
        assert str(page) in linked | from_methods, f"nothing in the guide links {page.relative_to(ROOT)}"
    text = index.read_text()
    for section in ("## Install", "## Quick start", "## Recipes", "## What a run prints and writes", "## Reports",
                    "## Several GPUs or processes", "## Python API", "accelerate launch", "make docs"):
        assert section in text, section


def test_mkdocs_hooks_escape_math_brackets_outside_code() -> None:
    sys.path.insert(0, str(ROOT / "src" / "kdforge" / "report"))
    try:
        from mkdocs_hooks import _plain_brackets
    finally:
        sys.path.pop(0)
    md = "A[t][j] and `A[t][j]` and [x][kdforge.Trainer] and [y][ref]\n\n[ref]: a.md\n```\nA[t][k]\n```\n"
    assert _plain_brackets(md) == md.replace("A[t][j] and", "A[t]\\[j] and", 1)


@pytest.mark.skipif(shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None,
                    reason="mkdocs is not installed: pip install -e '.[docs]' (the dev extra has it)")
def test_site_builds_strict_and_offline(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "no_proxy": "*", "HTTP_PROXY": "http://0.0.0.0:9",
           "HTTPS_PROXY": "http://0.0.0.0:9"}  # any attempt to fetch fails instead of hanging
    done = subprocess.run([str(Path(sys.executable).parent / "mkdocs"), "build", "--strict", "-d", str(site)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    index = (site / "index.html").read_text()
    assert "kdforge user guide" in index
    api = (site / "api.html").read_text()
    assert "kdforge.Trainer" in api and "fit" in api  # rendered from the docstrings
    assert (site / "cli.html").is_file() and "kdforge train" in (site / "cli.html").read_text()
    # links to repository files are copied into the site, and nothing is loaded from the network
    assert (site / "_repo" / "src" / "kdforge" / "recipes" / "demo" / "kd.yaml").is_file()
    assert 'href="_repo/src/kdforge/recipes/demo/kd.yaml"' in index
    for page in site.rglob("*.html"):
        text = page.read_text()
        assert not re.search(r'<(script|link|img)[^>]+(src|href)="(https?:)?//', text), page
    # search from file://: the index inlined as a script, the worker shim shipped with the site (not a CDN's)
    assert (site / "search" / "search_index.js").read_text().startswith("var __index = ")
    assert '<script src="javascripts/iframe-worker-shim.js">' in index
    # math renders as MathML, with no script: on every method page, with no formula left as dollars, no LaTeX
    # command the converter did not know (it would show as text), and the lists around display math intact
    assert '<math xmlns="http://www.w3.org/1998/Math/MathML" display="block"' in (site / "compare.html").read_text()
    methods = sorted((site / "methods").glob("*.html"))
    assert len(methods) == len(list((DOCS / "methods").glob("*.md"))) >= 9
    for page in methods:
        html = page.read_text()
        maths = re.findall(r"<math .*?</math>", html, re.S)
        prose = re.sub(r"<code>.*?</code>|<pre.*?</pre>|<script.*?</script>|<math .*?</math>", "", html, flags=re.S)
        assert len(maths) >= 10 and "$" not in prose and "KDFORGEMATH" not in html, page.name
        assert not [m for m in maths if "\\" in re.sub(r"<[^>]+>", "", m)], page.name
    assert re.search(r"<li>Carried between tasks: <math", (site / "methods" / "continual.html").read_text())
    # the task-ordered navigation: install, first run, your data, compare, deploy
    pos = [index.find(t) for t in ("Install and first run", "Your data and your model", "Compare runs", "Deploy")]
    assert -1 not in pos and pos == sorted(pos), pos


#: what a user's text must not hold: the team's internal specs and issues, section signs into them, to-dos
INTERNAL = re.compile(r"shared/|\bspecs?/|§|\bTODO\b|/work/|\bspec(?:'s|s')|\bthe spec\b(?! that)|\bspec defaults\b"
                      r"|\(spec\b|\bissue \d+|\bthe issue\b|\bissue's\b")
#: a path into the repository: meaningless in a terminal outside a checkout
REPO_PATH = re.compile(r"\b(?:src/kdforge|tests|docs|shared)/[\w./-]+")


def _terminal_texts() -> dict[str, str]:
    """What ``kdforge list`` and ``kdforge recipes`` show, with the whole docstring and comment block."""
    import kdforge  # noqa: F401 - registers everything
    from kdforge.bench import load_benches
    from kdforge.recipe_files import all_recipes
    from kdforge.registry import DATASETS, LOSSES, METHODS, MODELS

    out = {}
    for kind, reg in (("model", MODELS), ("dataset", DATASETS), ("method", METHODS), ("loss", LOSSES),
                      ("bench", load_benches())):
        for name in reg.names():
            out[f"{kind} {name}"] = getattr(reg.get(name), "__doc__", None) or ""
    for r in all_recipes():
        out[f"recipe {r.name}"] = "\n".join(line for line in r.path.read_text().splitlines()
                                            if line.lstrip().startswith("#"))
    return out


def test_user_facing_descriptions_hold_no_internal_references() -> None:
    texts = _terminal_texts()
    assert len(texts) > 150 and "shared/specs" not in texts["loss kd"]
    for page in [*sorted((DOCS / "methods").glob("*.md")), *sorted((DOCS / "benchmarks").glob("*.md")),
                 DOCS / "recipe-keys.md"]:
        texts[str(page.relative_to(ROOT))] = page.read_text()
    bad = [f"{k}: {m.group(0)!r}" for k, t in texts.items() for m in INTERNAL.finditer(t)]
    bad += [f"{k}: {m.group(0)!r}" for k, t in _terminal_texts().items() for m in REPO_PATH.finditer(t)]
    assert bad == [], "internal references in what users read:\n" + "\n".join(bad)


def test_the_internal_reference_check_catches_the_old_leaks() -> None:
    # the recipe summary that leaked before, and the section references of the method pages
    old = "MixSKD on CIFAR-100 with the spec's defaults (shared/specs/mixskd.md §5, SKL's main_mixskd_cifar.py):"
    assert [m.group(0) for m in INTERNAL.finditer(old)] == ["the spec", "shared/", "specs/", "§"]
    assert REPO_PATH.search(old).group(0) == "shared/specs/mixskd.md"
    assert INTERNAL.search("No AGW baselines (spec §9)") and not INTERNAL.search("the spec that rebuilds it")
    assert not INTERNAL.search("a model spec; the specification of a ResNet")


def test_math_becomes_mathml_without_breaking_the_list_around_it() -> None:
    pytest.importorskip("latex2mathml", reason="latex2mathml is in the docs extra")
    markdown = pytest.importorskip("markdown", reason="markdown comes with mkdocs (docs extra)")
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT / "src" / "kdforge" / "report"))
    try:
        from mkdocs_hooks import on_page_content, render_math
    finally:
        sys.path.pop(0)
    store: list[str] = []
    md = "- a $x^2$ and `$not math$`\n  $$\\frac{1}{2}$$\n  after\n- b\n"
    text = render_math(md, store)
    assert text == "- a KDFORGEMATH0END and `$not math$`\n  KDFORGEMATH1END\n  after\n- b\n"
    html = on_page_content(markdown.markdown(text), SimpleNamespace(kdforge_math=store), None, None)
    assert html.count("<li>") == 2 and "<msup><mi>x</mi><mn>2</mn></msup>" in html
    assert '<math xmlns="http://www.w3.org/1998/Math/MathML" display="block"><mrow><mfrac>' in html
