"""The CLI reference page (``docs/cli.md``), generated from the ``kdforge`` command itself.

``python -m kdforge.report.cli_doc > docs/cli.md`` (``make docs-cli``) rewrites it; a test checks that the
page matches the command.
"""

from __future__ import annotations

from typing import Any

HEADER = """# Command-line reference

Generated from the `kdforge` command by `make docs-cli` (`python -m kdforge.report.cli_doc > docs/cli.md`);
a test checks that it matches `kdforge --help`. Every command prints its own help with `--help`.
Bad input stops with one line on stderr naming what is wrong and what is valid, exit code 2.

`kdforge --version` prints the version; `kdforge` alone prints the list of commands.
"""


def _md(text: str) -> str:
    """Help text safe inside a Markdown table cell (``<name>`` would read as an HTML tag)."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")


def _usage(path: str, cmd: Any) -> str:
    args = []
    for p in cmd.params:
        if p.param_type_name == "argument":
            name = p.name.upper().rstrip("_")
            name = f"{name}..." if p.nargs == -1 else name
            args.append(name if p.required else f"[{name}]")
    return " ".join([path, *args, "[OPTIONS]"] if any(p.param_type_name == "option" for p in cmd.params)
                    else [path, *args])


def _param_row(p: Any) -> str:
    if p.param_type_name == "argument":
        name = p.name.upper().rstrip("_")
        default = ""
    else:
        name = ", ".join(p.opts) + (f" / {', '.join(p.secondary_opts)}" if p.secondary_opts else "")
        if not getattr(p, "is_flag", False) and p.metavar is None:
            name += " " + p.name.upper().rstrip("_")
        d = p.default
        default = "" if d is None or d is False or d == () or callable(d) else f"`{d}`"
    help_ = _md(getattr(p, "help", None) or "")
    return f"| `{name}` | {help_} | {default} |"


def _command(path: str, cmd: Any, level: int) -> list[str]:
    import click

    out = [f"{'#' * level} `{path}`", "", _md((cmd.help or "").strip().split("\n\n")[0]), "",
           "```", _usage(path, cmd), "```", ""]
    params = [p for p in cmd.params if not (p.param_type_name == "option" and p.name == "help")]
    if params:
        out += ["| argument / option | what | default |", "| --- | --- | --- |", *map(_param_row, params), ""]
    if isinstance(cmd, click.Group):
        ctx = click.Context(cmd, info_name=path)
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                out += _command(f"{path} {name}", sub, level + 1)
    return out


def cli_markdown() -> str:
    """The CLI reference as Markdown."""
    import click
    import typer

    from kdforge.cli import app

    group = typer.main.get_command(app)
    ctx = click.Context(group, info_name="kdforge")
    lines = [HEADER, "| command | what |", "| --- | --- |"]
    names = [n for n in group.list_commands(ctx) if not group.get_command(ctx, n).hidden]  # type: ignore[union-attr]
    for n in names:
        cmd = group.get_command(ctx, n)
        first = (cmd.help or "").strip().split("\n")[0] if cmd is not None else ""
        lines.append(f"| [`{n}`](#kdforge-{n}) | {_md(first)} |")
    lines.append("")
    for n in names:
        lines += _command(f"kdforge {n}", group.get_command(ctx, n), 2)
    return "\n".join(lines).rstrip("\n") + "\n"


def command_names() -> set[str]:
    """Every command and sub-command path, e.g. ``{"train", "cache build", ...}``."""
    import click
    import typer

    from kdforge.cli import app

    out: set[str] = set()

    def walk(prefix: str, grp: Any) -> None:
        ctx = click.Context(grp)
        for n in grp.list_commands(ctx):
            c = grp.get_command(ctx, n)
            if c is None or c.hidden:
                continue
            out.add(f"{prefix}{n}")
            if isinstance(c, click.Group):
                walk(f"{prefix}{n} ", c)

    walk("", typer.main.get_command(app))
    return out


if __name__ == "__main__":
    print(cli_markdown(), end="")
