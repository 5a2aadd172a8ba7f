"""The prune pipeline and recipe: CNN and LLM runs end to end, calibration source, the CLI body, quick benches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from kdforge.errors import KdforgeError
from kdforge.prune.sglp import CalibrationConfig, PruneRecipe, cnn_calibration, load_recipe, run_prune
from kdforge.prune.surgery import load_pruned

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "prune"


def _cnn_recipe(**extra: object) -> dict:
    r = {"name": "t", "model": {"model": "resnet20"}, "data": {"name": "digits", "batch_size": 64,
                                                               "limit_train": 192},
         "calibration": {"n_samples": 128, "batch_size": 64, "score_batch_size": 32, "score_batches": 1},
         "analysis": {"k_max": 3}, "eval": {"latency_batch_sizes": [1, 8], "latency_repeats": 1}}
    r.update(extra)
    return r


def test_recipe_validation(tmp_path: Path) -> None:
    with pytest.raises(KdforgeError, match="exactly one"):
        _validate({"name": "x"})
    with pytest.raises(KdforgeError, match="unknown key"):
        _validate(_cnn_recipe(selection={"method": "sglp", "mode": "x"}))
    with pytest.raises(KdforgeError, match="keep_per_segment"):
        _validate(_cnn_recipe(selection={"method": "random"}, budget={"keep_per_segment": [1, 2]}))
    for f in sorted(RECIPES.glob("*.yaml")):
        data = yaml.safe_load(f.read_text())
        if "method" in data:  # a training recipe for the model to prune
            from kdforge.config import Recipe

            Recipe.from_dict(data)
        else:
            load_recipe(f)
    r = load_recipe(RECIPES / "sglp-tiny-llama.yaml", ["budget.keep_ratio=0.5"])
    assert r.budget.keep_ratio == 0.5 and r.is_llm


def test_recipe_errors_are_one_line_and_shared_sections() -> None:
    with pytest.raises(KdforgeError, match=r"^unknown key 'optim.lrr'.*did you mean 'lr'") as e:
        PruneRecipe.from_dict(_cnn_recipe(optim={"lrr": 0.1}))
    assert "\n" not in str(e.value)
    with pytest.raises(KdforgeError, match=r"^bad value for 'train.epochs'"):
        PruneRecipe.from_dict(_cnn_recipe(), ["train.epochs=two"])
    with pytest.raises(KdforgeError, match=r"^bad value for 'train.max_steps'"):
        PruneRecipe.from_dict(_cnn_recipe(), ["train.max_steps=1.5"])
    with pytest.raises(KdforgeError, match=r"^recipe key 'heal.lr' moved to optim.lr"):
        PruneRecipe.from_dict(_cnn_recipe(heal={"mode": "kd", "lr": 0.1}))
    with pytest.raises(KdforgeError, match=r"^recipe key 'device' moved to train.device"):
        PruneRecipe.from_dict(_cnn_recipe(device="cpu"))
    cnn = PruneRecipe.from_dict(_cnn_recipe(optim={"lr": 0.05}))
    assert (cnn.optim.name, cnn.optim.weight_decay, cnn.sched.name, cnn.train.epochs) == ("sgd", 5e-4, "cosine", 1)
    llm = load_recipe(RECIPES / "sglp-tiny-llama.yaml", ["optim.lr=0.01"])
    assert (llm.optim.name, llm.optim.lr, llm.train.max_steps, llm.train.grad_clip) == ("adamw", 0.01, 5, 1.0)
    assert llm.heal_recipe("llm-kd", 2).data.batch_size == 2


def test_fsdp_heal_setting_the_cpu_cannot_run_is_one_line_before_any_work(tmp_path: Path) -> None:
    r = load_recipe(RECIPES / "sglp-tiny-llama.yaml", ["train.distributed=fsdp", "train.fsdp.shard_teacher=true",
                                                       "train.fsdp.cpu_offload=true", "train.device=cpu"])
    assert r.train.fsdp is not None and r.train.fsdp.shard_teacher
    with pytest.raises(KdforgeError, match=r"^train.fsdp.cpu_offload moves GPU shards to the CPU") as e:
        run_prune(r, tmp_path / "run", verbose=False)
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


def _validate(d: dict) -> PruneRecipe:
    from kdforge.config import validate

    return validate(PruneRecipe, d)


def test_calibration_uses_training_data_only() -> None:
    from kdforge.config import DataConfig
    from kdforge.data import load_data

    bundle = load_data(DataConfig(name="digits", val_fraction=0.1))

    class NoTest(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 10

        def __getitem__(self, i: int) -> None:
            raise AssertionError("the test split must not be used for calibration")

    bundle.test = NoTest()
    cka_b, score_b = cnn_calibration(bundle, CalibrationConfig(n_samples=100, batch_size=50, score_batch_size=16))
    assert [len(b[0]) for b in cka_b] == [50, 50] and [len(b[0]) for b in score_b] == [16, 16]
    train_x = bundle.train.dataset.x
    for x in cka_b[0][0][:5]:
        assert any(torch.equal(x, t) for t in train_x)


def test_cnn_pipeline_end_to_end(tmp_path: Path) -> None:
    r = _validate(_cnn_recipe(heal={"mode": "kd"}, optim={"lr": 0.05}, train={"epochs": 1, "progress": "silent"}))
    res = run_prune(r, tmp_path / "run", verbose=False)
    out = tmp_path / "run"
    for f in ("report.md", "results.json", "cka.png", "importance.png", "pruned/model.safetensors",
              "pruned/pruned.yaml", "config.yaml", "heal/metrics.csv", "heal/checkpoints/last.safetensors"):
        assert (out / f).is_file(), f
    assert res.after["params"] < res.before["params"] and res.after["flops"] < res.before["flops"]
    assert res.healed is not None and "top1" in res.healed
    assert 0 in res.selection.kept and len(res.selection.kept) == sum(res.keep_per_segment)
    m = load_pruned(out / "pruned")
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(m(x), res.model.eval()(x))
    assert "Before / after" in (out / "report.md").read_text()
    with pytest.raises(KdforgeError, match="already exists"):
        run_prune(r, out, verbose=False)


def test_cnn_pipeline_keep_per_segment_and_baseline(tmp_path: Path) -> None:
    r = _validate(_cnn_recipe(analysis={"n_segments": 3}, budget={"keep_per_segment": [2, 2, 1]}, save=False))
    res = run_prune(r, None, verbose=False)
    assert res.keep_per_segment == [2, 2, 1] and res.analysis.segmentation.k == 3
    r = _validate(_cnn_recipe(selection={"method": "last_n"}, budget={"keep_ratio": 0.6}))
    res = run_prune(r, None, verbose=False)
    assert len(res.selection.kept) == 6
    with pytest.raises(KdforgeError, match="keep_per_segment"):
        run_prune(_validate(_cnn_recipe(analysis={"n_segments": 2}, budget={"keep_per_segment": [1, 1, 1]})),
                  None, verbose=False)


def test_llm_pipeline_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from kdforge.prune.cli import prune_command

    out = tmp_path / "llm"
    prune_command(RECIPES / "sglp-tiny-llama.yaml", out, ["train.max_steps=2"], False)
    text = capsys.readouterr().out
    assert "kept 6/8" in text and "ppl" in text
    reloaded = AutoModelForCausalLM.from_pretrained(out / "pruned").eval()
    assert reloaded.config.num_hidden_layers == 6
    import json

    res = json.loads((out / "results.json").read_text())
    assert res["healed"]["ppl"] > 1 and len(res["selection"]["kept"]) == 6
    ids = torch.randint(0, 256, (1, 10))
    assert reloaded.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 13)
    prune_command(RECIPES / "sglp-tiny-llama.yaml", out, ["heal.mode=none", "selection.method=block_influence"], True)


@pytest.mark.slow
def test_quick_llm_bench(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from kdforge.bench import load_benches

    res = load_benches().get("sglp-llm")(out=tmp_path, quick=True)
    assert (tmp_path / "sglp-llm.md").is_file() and (tmp_path / "sglp-llm-cka.png").is_file()
    labels = {(r["label"], r["n_removed"]) for r in res["rows"]}
    assert {("SLEB (KL to unpruned)", 2), ("SLEB (KL to unpruned) + KD heal", 3), ("block influence (ShortGPT)", 3),
            ("SGLP + KL score (CKA per sample)", 2)} <= labels
    sleb = {r["n_removed"]: set(r["removed"]) for r in res["rows"] if r["label"] == "SLEB (KL to unpruned)"}
    assert sleb[2] < sleb[3] and len(sleb[3]) == 3  # one greedy search: the smaller choice is its prefix


@pytest.mark.slow
def test_quick_cnn_bench(tmp_path: Path) -> None:
    from kdforge.bench import load_benches

    res = load_benches().get("sglp-cnn")(out=tmp_path, quick=True)
    assert (tmp_path / "sglp-cnn.md").is_file() and (tmp_path / "sglp-cnn-tradeoff.png").is_file()
    assert len([r for r in res["rows"] if r["method"] == "random"]) == 2
