"""MkDocs hooks for kdforge's documentation site (``mkdocs.yml``): links from a page in ``docs/`` to a file
elsewhere in the repository (a recipe, a script) work on GitHub; in the built site the file is copied to
``_repo/<its path>`` and the link pointed there, so ``mkdocs build --strict`` still checks every link.
A link that leaves the repository or names a missing file stays as it is, and the strict build fails on it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

_LINK = re.compile(r"(\]\()([^)\s#]+)(#[^)\s]*)?(\s+\"[^\"]*\")?(\))")


def _target(page_uri: str, link: str, docs: Path, repo: Path) -> Path | None:
    """The repository file outside ``docs/`` that a relative link names, if any."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", link) or link.startswith("/"):
        return None
    path = Path(os.path.normpath(docs / Path(page_uri).parent / link))
    if path.is_relative_to(docs) or not path.is_relative_to(repo):
        return None
    return path if path.is_file() else None


def _uri(path: Path, repo: Path) -> str:
    return "_repo/" + path.relative_to(repo).as_posix()


def on_files(files: Any, config: Any) -> Any:
    """Add the repository files that pages link to as files of the site."""
    from mkdocs.structure.files import File

    docs = Path(config["docs_dir"]).resolve()
    repo = docs.parent
    for f in list(files.documentation_pages()):
        for m in _LINK.finditer(Path(f.abs_src_path).read_text(encoding="utf-8")):
            path = _target(f.src_uri, m.group(2), docs, repo)
            if path is not None and files.get_file_from_path(_uri(path, repo)) is None:
                files.append(File.generated(config, _uri(path, repo), abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Point links to repository files at their copies in ``_repo/``."""
    docs = Path(config["docs_dir"]).resolve()
    repo = docs.parent

    def sub(m: re.Match[str]) -> str:
        path = _target(page.file.src_uri, m.group(2), docs, repo)
        if path is None:
            return m.group(0)
        new = os.path.relpath(docs / _uri(path, repo), docs / Path(page.file.src_uri).parent)
        return f"{m.group(1)}{Path(new).as_posix()}{m.group(3) or ''}{m.group(4) or ''}{m.group(5)}"

    page.kdforge_math = []  # the MathML of the page's formulas, put in place by on_page_content
    # math first (A[t][j] inside $…$ stays math), as placeholders: Markdown would take a line that starts
    # with <math> for an HTML block and end the list or paragraph around it
    return _plain_brackets(render_math(_LINK.sub(sub, markdown), page.kdforge_math))


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    """Put each formula's MathML where its placeholder ended up in the page's HTML."""
    store = getattr(page, "kdforge_math", None) or []
    return _TOKEN.sub(lambda m: store[int(m.group(1))], html) if store else html


_DISPLAY = re.compile(r"\$\$(.+?)\$\$", re.S)
_INLINE = re.compile(r"(?<![\\$\w])\$(?=\S)([^$\n]+?)(?<=\S)\$(?![\w$])")
_TOKEN = re.compile(r"KDFORGEMATH(\d+)END")


def render_math(markdown: str, store: list[str] | None = None) -> str:
    """``$…$`` and ``$$…$$`` outside code become MathML, which browsers render with no script or network
    (GitHub renders the same dollars itself). With ``store``, each formula is appended to it and its place
    holds a ``KDFORGEMATH<i>END`` token instead. Without the ``latex2mathml`` package the text stays as it is."""
    try:
        from latex2mathml.converter import convert
    except ImportError:
        return markdown

    def put(mathml: str) -> str:
        if store is None:
            return mathml
        store.append(mathml)
        return f"KDFORGEMATH{len(store) - 1}END"

    def display(m: re.Match[str]) -> str:
        return put(convert(" ".join(m.group(1).split()), display="block"))

    def inline(m: re.Match[str]) -> str:
        return put(convert(m.group(1)))

    def prose(text: str) -> str:
        parts, last = [], 0
        for m in _CODE.finditer(text):
            parts += [_INLINE.sub(inline, _DISPLAY.sub(display, text[last:m.start()])), m.group(0)]
            last = m.end()
        return "".join([*parts, _INLINE.sub(inline, _DISPLAY.sub(display, text[last:]))])

    out, last = [], 0
    for m in _FENCE.finditer(markdown):
        out += [prose(markdown[last:m.start()]), m.group(0)]
        last = m.end()
    return "".join([*out, prose(markdown[last:])])


_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
_CODE = re.compile(r"(`+)[^`]*?\1")
_REF = re.compile(r"\]\[([^\]]+)\]")


def _plain_brackets(markdown: str) -> str:
    """``A[t][j]`` in prose is math, not a reference link: escape it unless the page defines the label
    (GitHub shows undefined references as text; mkdocs-autorefs would report them as broken)."""
    defined = {m.group(1).lower() for m in re.finditer(r"^\s{0,3}\[([^\]]+)\]:", markdown, re.M)}

    def prose(text: str) -> str:
        parts, last = [], 0
        for m in _CODE.finditer(text):
            parts += [_REF.sub(esc, text[last:m.start()]), m.group(0)]
            last = m.end()
        return "".join([*parts, _REF.sub(esc, text[last:])])

    def esc(m: re.Match[str]) -> str:
        label = m.group(1)
        return m.group(0) if label.lower() in defined or "." in label else f"]\\[{label}]"

    out, last = [], 0
    for m in _FENCE.finditer(markdown):
        out += [prose(markdown[last:m.start()]), m.group(0)]
        last = m.end()
    return "".join([*out, prose(markdown[last:])])
