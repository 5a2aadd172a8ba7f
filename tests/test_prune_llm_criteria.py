"""LLM layer-removal criteria: KL to the unpruned model, loss-scored SGLP candidates, SLEB's order, CKA per token."""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("transformers")

from kdforge.llm import prune_decoder_layers, tiny_llama
from kdforge.prune.cka import cka, token_rows
from kdforge.prune.importance import causal_lm_kl_task, select_baseline, sglp_select, with_reference
from kdforge.prune.surgery import find_units


def _kl_independent(model, kept, ids) -> float:
    from torch.distributions import Categorical, kl_divergence

    with torch.no_grad():
        ref = model(input_ids=ids).logits
        out = prune_decoder_layers(model, kept)(input_ids=ids).logits
    return float(kl_divergence(Categorical(logits=ref), Categorical(logits=out)).mean())


def test_loss_scored_sglp_picks_the_lowest_kl_subset() -> None:
    model = tiny_llama(6, seed=2)
    units = find_units(model)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    batches = with_reference(model, [ids])
    segments = [[0, 1, 2], [3, 4, 5]]
    sel = sglp_select(model, units, segments, [2, 1], batches, causal_lm_kl_task(), set(), "subnet", "min",
                      score_by="loss")
    # brute force per segment, the other segment untouched, KL from torch.distributions
    want = []
    for seg, r in zip(segments, [2, 1], strict=True):
        others = [i for i in range(6) if i not in seg]
        best = min(itertools.combinations(seg, r), key=lambda c: _kl_independent(model, sorted([*others, *c]), ids))
        want += best
    assert sel.kept == sorted(want)


def test_sleb_order_is_greedy_in_kl() -> None:
    model = tiny_llama(5, seed=3)
    units = find_units(model)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    sel = select_baseline("sleb", model, units, 3, with_reference(model, [ids]), causal_lm_kl_task(), set())
    cur = list(range(5))
    for step in range(2):  # each removal is the one with the lowest KL given the earlier ones
        best = min(cur, key=lambda i: _kl_independent(model, [j for j in cur if j != i], ids))
        assert sel.details["order"][step] == best
        cur.remove(best)
    assert sel.kept == cur


def test_sleb_pick_keeps_the_candidate_with_the_lower_kl_on_the_held_apart_rows() -> None:
    """SLEB searches on the first batch; the choice between its set and block influence's uses the others only."""
    from kdforge.prune.importance import block_influence

    model = tiny_llama(6, seed=4)
    units = find_units(model)
    g = torch.Generator().manual_seed(2)
    search, held = torch.randint(0, 256, (2, 12), generator=g), torch.randint(0, 256, (3, 12), generator=g)
    batches = with_reference(model, [search, held])
    sel = select_baseline("sleb_pick", model, units, 4, batches, causal_lm_kl_task(), set())
    sleb = select_baseline("sleb", model, units, 4, batches[:1], causal_lm_kl_task(), set())
    bi = block_influence(model, units, batches[1:], causal_lm_kl_task())
    bi_kept = sorted(sorted(range(6), key=lambda i: (-bi[i], i))[:4])
    cands = {"sleb": sleb.kept, "block_influence": bi_kept}
    kls = {c: _kl_independent(model, kept, held) for c, kept in cands.items()}
    assert sel.details["candidates"] == {c: [i for i in range(6) if i not in k] for c, k in cands.items()}
    assert sel.details["pick_losses"] == pytest.approx(kls, rel=1e-4)
    assert sel.kept == cands[min(kls, key=kls.get)]
    with pytest.raises(Exception, match="at least 2 calibration batches"):
        select_baseline("sleb_pick", model, units, 4, batches[:1], causal_lm_kl_task(), set())


def test_token_rows_drop_the_first_token_and_match_cka() -> None:
    x = torch.randn(3, 10, 8, dtype=torch.float64)
    y = x @ torch.randn(8, 8, dtype=torch.float64)
    rows = token_rows(x, max_rows=1000)
    assert rows.shape == (27, 8) and torch.equal(rows[:9], x[0, 1:])
    assert token_rows(x, max_rows=5).shape == (5, 8)
    assert float(cka(token_rows(x), token_rows(x * 3.0))) == pytest.approx(1.0)  # CKA ignores scale
    assert float(cka(token_rows(x), token_rows(y))) < 1.0


def test_llm_recipes_default_to_the_recommended_criterion() -> None:
    from kdforge.prune.sglp import LLM_RECOMMENDED_SELECTION, PruneRecipe

    r = PruneRecipe.from_dict({"llm": {"source": "tiny"}, "budget": {"keep_ratio": 0.75}})
    assert r.selection.method == LLM_RECOMMENDED_SELECTION["method"]
    assert r.selection.llm_loss == LLM_RECOMMENDED_SELECTION.get("llm_loss", "ce")
    explicit = PruneRecipe.from_dict({"llm": {"source": "tiny"}, "selection": {"method": "sglp"}})
    assert explicit.selection.method == "sglp" and explicit.selection.llm_loss == "ce"
    cnn = PruneRecipe.from_dict({"model": {"model": "resnet20"}})
    assert cnn.selection.method == "sglp"


@pytest.mark.slow
def test_quick_sleb_pick_bench(tmp_path) -> None:
    from kdforge.bench import load_benches
    from kdforge.bench.sglp import PICK

    res = load_benches().get("sglp-llm-pick")(out=tmp_path, quick=True)
    for k in res["settings"]["removals"]:
        rows = {r["label"]: r for r in res["rows"] if r["n_removed"] == k}
        pick = rows[PICK]
        chosen = {"sleb": "SLEB (KL to unpruned)", "block_influence": "block influence on the pick rows (KL task)"}
        assert pick["removed"] == rows[chosen[pick["picked"]]]["removed"]
        assert pick["picked"] == min(pick["pick_kl"], key=pick["pick_kl"].get)
    for k in res["settings"]["heal_at"]:  # the healed row heals the pick's own set, and the heal moved the weights
        rows = {r["label"]: r for r in res["rows"] if r["n_removed"] == k}
        healed = rows[f"{PICK} + KD heal"]
        assert healed["removed"] == rows[PICK]["removed"] and healed["ppl"] != rows[PICK]["ppl"]
        assert res["heal"][str(k)]["seconds"] > 0
    text = (tmp_path / "sglp-llm-pick.md").read_text()
    assert "sglp-llm-pick" in text and "+ KD heal" in text
