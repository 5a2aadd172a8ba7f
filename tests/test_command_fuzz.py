"""Property-based fuzz of every command's recipe sections (cil, prune, audio, cache, rl, diffusion, reid): each
mutated recipe loads, or is refused with one KdforgeError line; never another exception (a traceback)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kdforge.errors import KdforgeError

RECIPES = Path(__file__).resolve().parents[1] / "src" / "kdforge" / "recipes"


def _train_with_method(data: dict[str, Any], overrides: list[str]) -> Any:
    """What `kdforge train` checks before building anything: the recipe, then the method's own schema."""
    import kdforge  # noqa: F401 - registers every method
    from kdforge.config import Recipe, validate
    from kdforge.registry import METHODS

    r = Recipe.from_dict(data, overrides)
    m = r.method.model_dump()
    cfg = getattr(METHODS.get(m["name"]), "Config", None)
    return validate(cfg, m, prefix="method") if cfg is not None else r


def _cache(data: dict[str, Any], overrides: list[str]) -> Any:
    from kdforge.cache.build import distill_parts
    from kdforge.config import Recipe

    return distill_parts(Recipe.from_dict(data, overrides))


def _loader(kind: str) -> Callable[[dict[str, Any], list[str]], Any]:
    if kind == "cil":
        from kdforge.continual.recipe import CilRecipe

        return CilRecipe.from_dict
    if kind == "prune":
        from kdforge.prune.sglp import PruneRecipe

        return PruneRecipe.from_dict
    if kind == "audio":
        from kdforge.audio.recipe import AudioRecipe

        return AudioRecipe.from_dict
    return _cache if kind == "cache" else _train_with_method


BASES = {"cil": "continual/etag-fashion-quick.yaml", "prune": "prune/sglp-digits-resnet20.yaml",
         "audio": "audio/synthetic_quick.yaml", "cache": "cache/demo-kd.yaml", "rl": "rl/cartpole-ppo-opd-da.yaml",
         "diffusion": "diffusion/digits-rdd.yaml", "reid": "reid/pdm_synthetic.yaml"}

TEXT = ["1e-3", "abc", "", "3", "true", "[1, 2]", "{a: 1}", "null", ".nan", "-1", "0", "1e400", "cpu", "-.inf"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 100), st.sampled_from([2**40, -2**63, 2**70]),
                    st.floats(width=32), st.sampled_from(TEXT), st.text(max_size=5))
values = st.one_of(scalars, st.lists(scalars, max_size=4), st.dictionaries(st.sampled_from(["a", "x", "name"]),
                                                                           scalars, max_size=2))


def _leaves(d: Any, prefix: str = "") -> list[str]:
    """Dotted paths of a recipe's keys (dict keys all the way down; lists are leaves)."""
    out = []
    if isinstance(d, dict):
        for k, v in d.items():
            p = f"{prefix}{k}"
            out.append(p)
            out += _leaves(v, p + ".")
    return out


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    *parents, last = key.split(".")
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[last] = value


def _as_set(key: str, value: Any) -> str:
    text = value if isinstance(value, str) and value in TEXT else yaml.safe_dump(value, default_flow_style=True)
    return f"{key}={text.strip().removesuffix('...').strip()}"


@st.composite
def mutation(draw: st.DrawFn, keys: list[str]) -> tuple[str, Any]:
    key = draw(st.sampled_from(keys))
    how = draw(st.sampled_from(["value"] * 6 + ["typo", "unknown"]))
    if how == "typo" and len(key.rsplit(".", 1)[-1]) > 2:
        *head, last = key.split(".")
        i = draw(st.integers(0, len(last) - 1))
        key = ".".join([*head, last[:i] + last[i + 1:]])
    elif how == "unknown":
        key = key.rsplit(".", 1)[0] + ".zzz" if "." in key else "zzz"
    return key, draw(values)


def _check(kind: str, base: dict[str, Any], in_file: list[tuple[str, Any]], as_set: list[tuple[str, Any]]) -> str:
    data = yaml.safe_load(yaml.safe_dump(base))
    for k, v in in_file:
        _set(data, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _loader(kind)(data, [_as_set(k, v) for k, v in as_set])
            event("loads")
            return "loads"
        except KdforgeError as e:
            event("refused")
            assert "\n" not in str(e).strip() and str(e).strip(), (kind, data, as_set, str(e))
            return "refused"


COMMON = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
EXAMPLES = int(os.environ.get("KDFORGE_COMMAND_FUZZ_EXAMPLES", "500"))


@pytest.mark.parametrize("kind", list(BASES))
def test_fuzz_command_recipes_load_or_one_line(kind: str) -> None:
    base = yaml.safe_load((RECIPES / BASES[kind]).read_text())
    keys = _leaves(base)
    _loader(kind)(yaml.safe_load(yaml.safe_dump(base)), [])  # the unmutated recipe loads: the fuzz starts valid

    seen = {"loads": 0, "refused": 0}

    @settings(max_examples=EXAMPLES, **COMMON)
    @given(in_file=st.lists(mutation(keys), max_size=2), as_set=st.lists(mutation(keys), max_size=2))
    def run(in_file: list, as_set: list) -> None:
        seen[_check(kind, base, in_file, as_set)] += 1

    run()
    print(f"fuzz {kind}: {sum(seen.values())} cases, {seen['loads']} loaded, {seen['refused']} refused in one line")
    assert sum(seen.values()) >= EXAMPLES  # the cases really ran (none skipped as invalid)
