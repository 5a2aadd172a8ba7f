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
