"""Compressing a causal LM: the exported HF folder reloads without kdforge and gives the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("transformers")

from kdforge.cli import main
from kdforge.compress.llm import check_loads_hf, dequantized, export_hf
from kdforge.llm.loading import ByteTokenizer, tiny_llama
from kdforge.llm.surgery import prune_decoder_layers


def test_pruned_tiny_llama_reloads_without_kdforge_with_identical_logits(tmp_path):
    model = tiny_llama(6)
    pruned = prune_decoder_layers(model, [0, 2, 5])
    folder = export_hf(pruned, ByteTokenizer(), tmp_path / "hf")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3
    for key in ("layer_types",):  # per-layer lists follow the surgery
        if key in cfg:
            assert len(cfg[key]) == 3
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    check, y, facts = check_loads_hf(folder, ids)
    assert check.ok, check.detail
    assert facts["layers"] == 3 and not facts["kdforge_imported"]
    with torch.no_grad():
        ref = pruned(input_ids=ids, use_cache=False).logits
    assert torch.equal(torch.from_numpy(y), ref)  # same weights, same kernels: bit-identical
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
    assert not torch.allclose(full, ref)  # the reloaded folder is the pruned model, not the original


def test_a_dequantized_gguf_model_saves_as_a_plain_float_folder(tmp_path):
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    from kdforge.errors import KdforgeError

    model = tiny_llama(2)
    # what transformers leaves on a model it dequantized from a GGUF file: the quantizer and its config
    model.hf_quantizer = GgufHfQuantizer(GgufConfig())
    model.config.quantization_config = GgufConfig()
    with pytest.raises(ValueError, match="not serializable"):  # the failure SmolLM2's export met
        export_hf(model, ByteTokenizer(), tmp_path / "before")
    folder = export_hf(dequantized(model, "tiny"), ByteTokenizer(), tmp_path / "hf")
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    assert getattr(again, "hf_quantizer", None) is None  # a plain float model, not sent to the GGUF loader
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, use_cache=False).logits, model(input_ids=ids, use_cache=False).logits)
    packed = tiny_llama(2)
    packed.hf_quantizer = GgufHfQuantizer(GgufConfig())
    packed.hf_quantizer.packed_modules = {"model.layers.0.mlp.up_proj": object()}  # weights still in GGUF blocks
    with pytest.raises(KdforgeError, match="quantized GGUF blocks"):
        dequantized(packed, "tiny")


@pytest.mark.slow
def test_compress_tiny_llama_end_to_end(tmp_path, capsys):
    r = {"name": "lm", "llm": {"source": "tiny:6"},
         "text": {"calib": "pydoc", "eval": "pydoc", "seq_len": 32, "max_tokens": 20000, "eval_sequences": 8,
                  "calib_sequences": 16},
         "budget": {"metric": "layers", "fraction": 0.5, "max_ppl_ratio": 1.5},
         "candidates": {"families": ["uniform", "block_influence"]},
         "train": {"max_steps": 2, "progress": "never", "save_checkpoints": False},
         "llm_gate": {"batch": 2, "new_tokens": 4}}
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(r))
    out = tmp_path / "out"
    code = main(["compress", str(p), "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    data = json.loads((out / "compress.json").read_text())
    assert code in (0, 1), err[-1:]
    for c in data["candidates"]:
        assert c["layers"] == 3 and len(c["kept_layers"]) == 3
        cfg = json.loads((Path(c["folder"]) / "config.json").read_text())
        assert cfg["num_hidden_layers"] == 3 and cfg["kdforge_pruned"]["kept"] == c["kept_layers"]
        assert c["gate"]["loads"]["ok"] and c["gate"]["matches"]["ok"]
        assert c["gate"]["smaller"]["ok"] and c["params"] < data["original"]["params"]
        assert set(c["gate"]["faster"]["values"]["tokens_per_s"]) == {"prefill_b1", "prefill_b2", "decode_b1"}
    if code == 0:
        assert (out / "model" / "config.json").is_file() and data["chosen"]
    else:
        assert err[-1].startswith("error: gate check '") and data["chosen"] is None


def _lm_recipe(families, fraction, **text):
    from kdforge.compress.recipe import CompressRecipe

    return CompressRecipe.from_dict({"llm": {"source": "tiny:6"}, "candidates": {"families": families},
                                     "budget": {"metric": "layers", "fraction": fraction},
                                     "text": {"seq_len": 16, **text}, "train": {"max_steps": 2}})


def test_sleb_pick_family_keeps_what_prune_selection_keeps_and_reuses_the_greedy_order():
    from kdforge.compress.llm import PICK_ROWS, SLEB_ROWS, LMSource, search_lm
    from kdforge.prune.importance import causal_lm_kl_task, select_baseline, with_reference
    from kdforge.prune.surgery import find_units

    model = tiny_llama(6)
    calib = torch.randint(0, 256, (24, 16), generator=torch.Generator().manual_seed(1))
    src = LMSource(model, ByteTokenizer(), calib, calib[:2], "tiny")
    units = find_units(model)
    rest = calib[SLEB_ROWS: SLEB_ROWS + PICK_ROWS]
    batches = with_reference(model, [calib[:SLEB_ROWS], *(rest[i: i + 4] for i in range(0, len(rest), 4))])
    memo: dict = {}
    for fraction, n_keep in ((2 / 6, 2), (4 / 6, 4)):  # the longer search first, its prefix reused by the second
        _, cands, _ = search_lm(src, _lm_recipe(["sleb_pick"], fraction), log=lambda _m: None, memo=memo)
        # kdforge prune's own sleb_pick on the same rows: SLEB on the first batch, the pick on the rest
        want = select_baseline("sleb_pick", model, units, n_keep, batches, causal_lm_kl_task())
        (c,) = cands
        assert c.info["kept_layers"] == want.kept and c.family == "sleb_pick"
        assert c.info["pick"]["picked"] == want.details["picked"]
        assert c.info["pick"]["pick_kl"] == pytest.approx(want.details["pick_losses"])
    (order,) = memo.values()
    assert len(order) == 4  # one greedy search of 4 removals served both budgets


def test_llm_recipes_default_to_the_depth_families_led_by_sleb_pick():
    from kdforge.compress.recipe import CompressRecipe

    r = CompressRecipe.from_dict({"llm": {"source": "tiny:6"}})
    assert r.candidates.families[0] == "sleb_pick" and "width" not in r.candidates.families


@pytest.mark.parametrize(("text", "shared"), [
    ({"eval": "austen", "heal": "austen:emma,persuasion"}, "austen:persuasion"),
    ({"eval": "austen:persuasion", "calib": "austen"}, "austen:persuasion"),
    ({"eval": "held.txt", "heal": "held.txt"}, "held.txt"),
])
def test_heal_or_calibration_text_that_reads_the_held_out_book_is_refused(text, shared):
    from kdforge.errors import KdforgeError

    with pytest.raises(KdforgeError, match=f"share {shared}: the held-out text"):
        _lm_recipe(["uniform"], 0.5, **text)


def test_heal_text_other_than_the_held_out_one_is_accepted():
    r = _lm_recipe(["uniform"], 0.5, eval="austen", heal="austen:emma,mansfieldpark", calib="pydoc")
    assert r.text.heal == "austen:emma,mansfieldpark"
    r = _lm_recipe(["uniform"], 0.5, eval="pydoc", calib="pydoc", heal="pydoc")  # heals on the calibration split
    assert r.text.heal == "pydoc"


def test_heal_rows_come_from_the_heal_text_spread_over_all_of_it(tmp_path):
    from kdforge.compress.llm import heal_lm, load_lm_source

    (tmp_path / "calib.txt").write_text("c" * 16 * 6)
    (tmp_path / "eval.txt").write_text("e" * 16 * 4)
    # ten blocks of 16 bytes, block i all letter A+i: rows 0, 3, 6 and 9 are the evenly spread four
    (tmp_path / "heal.txt").write_text("".join(chr(65 + i) * 16 for i in range(10)))
    text = {"calib": str(tmp_path / "calib.txt"), "eval": str(tmp_path / "eval.txt"), "calib_sequences": 6}
    src = load_lm_source(_lm_recipe(["uniform"], 0.5, **text, heal=str(tmp_path / "heal.txt"), heal_sequences=4))
    assert [chr(int(row[0])) for row in src.heal] == ["A", "D", "G", "J"]
    assert all(len(set(row.tolist())) == 1 for row in src.heal)
    plain = load_lm_source(_lm_recipe(["uniform"], 0.5, **text))
    assert plain.heal is None and set(plain.calib.flatten().tolist()) == {ord("c")}
    # healing reads the heal rows: the same seed on the calibration rows gives other weights
    r = _lm_recipe(["uniform"], 0.5, **text)
    a, info = heal_lm(tiny_llama(3), src, r)
    b, _ = heal_lm(tiny_llama(3), plain, r)
    assert info["rows"] == 4 and info["text"] == str(tmp_path / "heal.txt")
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, b.model.layers[0].mlp.up_proj.weight)
    src.heal = plain.calib  # the same rows through the heal field: the same weights (a deterministic heal)
    c, _ = heal_lm(tiny_llama(3), src, r)
    assert torch.equal(b.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)


def test_an_encoder_folder_is_refused_naming_its_architecture(tmp_path, capsys):
    """A BERT folder would load through AutoModelForCausalLM as a decoder with a fresh head; compress refuses it."""
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(tmp_path / "bert")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"name": "b", "llm": {"source": str(tmp_path / "bert")},
                                                     "budget": {"metric": "layers", "fraction": 0.5}}))
    capsys.readouterr()
    assert main(["compress", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "BertForMaskedLM (model_type bert), not a causal LM" in err[0]
    assert not (tmp_path / "out").exists()


def test_a_model_the_surgery_cannot_cut_is_refused_naming_its_module_types():
    from kdforge.errors import KdforgeError
    from kdforge.prune.surgery import find_units

    model = torch.nn.Sequential()
    model.add_module("embed", torch.nn.Embedding(8, 4))
    model.add_module("mixer", torch.nn.GRU(4, 4))
    with pytest.raises(KdforgeError, match=r"its modules: embed \(Embedding\), mixer \(GRU\)"):
        find_units(model)
