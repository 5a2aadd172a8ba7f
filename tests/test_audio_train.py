"""Audio recipe: loss identities, step-decay values, freezing, fusion, metrics, EPIC-SOUNDS files, a staged run."""

from __future__ import annotations

import json
import math
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdforge.audio.fusion import PUBLISHED_WEIGHTS, fuse, search_weights, simplex_grid
from kdforge.audio.losses import focal_loss, ls_focal_loss
from kdforge.audio.metrics import (
    all_metrics,
    expected_calibration_error,
    mean_auc,
    mean_average_precision,
    mean_class_accuracy,
    nll,
    redact,
    topk_accuracy,
)
from kdforge.audio.models import AudioSlowFast, audio_slowfast_lite, freeze_backbone
from kdforge.config import SchedConfig
from kdforge.engine.schedule import lr_factor
from kdforge.errors import KdforgeError

# -- loss ---------------------------------------------------------------------------------------------


def test_loss_identities() -> None:
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(64, 44, generator=g) * 3, torch.randint(0, 44, (64,), generator=g)
    assert abs(float(ls_focal_loss(logits, y, 0.0, 0.0) - F.cross_entropy(logits, y))) < 1e-6
    small = logits / 3  # no probability below the 1e-7 clamp: LS equals torch's label smoothing
    assert abs(float(ls_focal_loss(small, y, 0.06, 0.0) - F.cross_entropy(small, y, label_smoothing=0.06))) < 1e-5
    for eps in (0.0, 0.06, 0.5):
        assert abs(float(ls_focal_loss(torch.zeros(4, 44), y[:4], eps, 0.0)) - math.log(44)) < 1e-6
    per_ls = ls_focal_loss(logits, y, 0.06, 0.0, reduction="none")
    per_focal = ls_focal_loss(logits, y, 0.06, 0.3, reduction="none")
    assert torch.all(per_focal <= per_ls) and torch.all(per_focal < per_ls)
    # the focal factor weighs every class term of the smoothed target, not only the true class
    p = logits.softmax(-1).clamp(1e-7, 1 - 1e-7)
    tgt = F.one_hot(y, 44) * 0.94 + 0.06 / 44
    assert torch.allclose(per_focal, -(tgt * (1 - p) ** 0.3 * p.log()).sum(-1))
    assert abs(float(focal_loss(logits, y, 0.0) - F.cross_entropy(logits, y))) < 1e-5


def test_loss_gradients_finite_for_extreme_logits() -> None:
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 50.0]], requires_grad=True)
    y = torch.tensor([1, 0])
    for loss in (ls_focal_loss(logits, y, 0.06, 0.3), focal_loss(logits, y, 2.0)):
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


# -- schedule ------------------------------------------------------------------------------------------


def test_relative_step_decay_values() -> None:
    cfg = SchedConfig(name="relative", relative=[(0, 1), (2, 0.7), (4, 0.5), (6, 0.3), (8, 0.1)])
    lr = lambda epoch: 1e-4 * lr_factor(round(epoch * 100), cfg, 100, 1000, 1e-4)  # 100 steps per epoch
    # the official get_step_index: the last step <= e; so lr(3.5) is 0.7 x base (the spec's list says 5e-5,
    # which its own formula and the code give only from epoch 4)
    assert lr(1.99) == pytest.approx(1e-4) and lr(3.5) == pytest.approx(7e-5) and lr(9.9) == pytest.approx(1e-5)
    assert lr(2.0) == pytest.approx(7e-5) and lr(4.5) == pytest.approx(5e-5) and lr(0.0) == pytest.approx(1e-4)
    m1 = SchedConfig(name="relative", relative=[(0, 1), (25, 0.1)])
    assert lr_factor(2499, m1, 100, 3000, 1e-3) == 1.0 and lr_factor(2500, m1, 100, 3000, 1e-3) == 0.1


# -- freezing ------------------------------------------------------------------------------------------


def _one_step(freeze_bn_stats: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], AudioSlowFast]:
    from kdforge.audio.data import SpectrogramSet
    from kdforge.audio.method import AudioStage
    from kdforge.config import Recipe
    from kdforge.data import DataBundle
    from kdforge.engine.trainer import Trainer

    torch.manual_seed(0)
    model = audio_slowfast_lite(3)
    specs = [torch.randn(40, 16) for _ in range(8)]
    train = SpectrogramSet(specs, [0, 1, 2, 0, 1, 2, 0, 1], 40, train=True, split="train")
    test = SpectrogramSet(specs[:3], [0, 1, 2], 40, train=False, views=2, split="test")
    method = AudioStage(model, "ls", 0.06, 0.0, freeze_backbone_=True, freeze_bn=True,
                        freeze_bn_stats=freeze_bn_stats)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = Recipe.from_dict({"data": {"batch_size": 8, "val_fraction": 0.0}, "optim": {"lr": 0.5, "weight_decay": 0.1},
                          "sched": {"name": "constant"},
                          "train": {"max_steps": 1, "device": "cpu", "progress": "silent"}})
    Trainer(method, DataBundle(train, None, test, 3, 1, 0, []), r).fit()
    return before, model.state_dict(), model


def test_freezing_trains_only_the_head_and_keeps_eval_bns() -> None:
    model = audio_slowfast_lite(5)
    trained = freeze_backbone(model)
    assert trained and all("head" in n for n in trained)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trained
    before, after, model = _one_step(freeze_bn_stats=False)
    adapting = {n for n, m in model.named_modules() if any(m is a for a in model.adapting_bn)}
    assert adapting == {"slow_stem_bn", "fast_stem_bn", "fuse.0.bn"}
    for k, v in after.items():
        if "head" in k:
            assert not torch.equal(v, before[k]), k
        elif k.rsplit(".", 1)[0] in adapting and k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert not torch.equal(v, before[k]), k  # the official quirk: stem/fusion stats keep adapting
        else:
            assert torch.equal(v, before[k]), k  # every other parameter and every eval-mode BN: bit-identical
    before, after, _ = _one_step(freeze_bn_stats=True)
    assert all(torch.equal(v, before[k]) for k, v in after.items() if "head" not in k)


def test_timm_backbone_freezes_its_classifier_only() -> None:
    from kdforge.models import create_model

    net = create_model("timm:resnet10t", num_classes=4, in_chans=1)
    trained = freeze_backbone(net)
    assert trained == ["fc.weight", "fc.bias"]
    assert net(torch.randn(2, 1, 64, 32)).shape == (2, 4)


# -- fusion --------------------------------------------------------------------------------------------


def _scores(seed: int, n: int = 40, k: int = 6) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.ones(k), size=n) * 5  # sums of 5 view probabilities


def test_fusion_properties() -> None:
    s = [_scores(i) for i in range(4)]
    one = fuse(s, (1, 0, 0, 0))
    assert np.array_equal(np.argsort(-one, 1, kind="stable"), np.argsort(-s[0], 1, kind="stable"))
    pub = fuse(s, PUBLISHED_WEIGHTS)
    assert np.array_equal(fuse(s, PUBLISHED_WEIGHTS, scale=0.25).argmax(1), pub.argmax(1))
    assert np.array_equal((7.3 * pub).argmax(1), pub.argmax(1))
    same = fuse([s[1]] * 4, (0.1, 0.4, 0.25, 0.25))
    assert np.array_equal(np.argsort(-same, 1, kind="stable"), np.argsort(-s[1], 1, kind="stable"))
    with pytest.raises(KdforgeError, match="one weight per model"):
        fuse(s, (0.5, 0.5))


def test_fusion_search_equals_a_brute_force_over_the_simplex() -> None:
    grid = list(simplex_grid(4, 0.25))
    assert len(grid) == math.comb(4 + 3, 3) and all(abs(sum(w) - 1) < 1e-12 for w in grid)
    rng = np.random.default_rng(9)
    for trial in range(3):
        y = rng.integers(0, 6, 60)
        s = [_scores(10 * trial + i, 60) + 0.8 * np.eye(6)[np.where(rng.random(60) < 0.3 + 0.1 * i, y,
                                                                       rng.integers(0, 6, 60))] for i in range(3)]
        # an independent search: every multiple of 0.1 per weight, accuracy by hand, ties by mCA then by distance
        # to uniform, as documented
        keys = {}
        for a in range(11):
            for b in range(11 - a):
                w = (a / 10, b / 10, (10 - a - b) / 10)
                pred = sum(wi * si for wi, si in zip(w, s, strict=True)).argmax(1)
                top1 = round(100 * float(np.mean(pred == y)), 9)
                mca = round(100 * float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)])), 9)
                keys[w] = (top1, mca, round(-sum(abs(wi - 1 / 3) for wi in w), 9))
        best = max(keys.values())
        w, val = search_weights(s, y, 0.1)
        assert val == pytest.approx(best[0])
        got = next(v for k, v in keys.items() if np.allclose(k, w))
        assert got == best, (trial, w, got, best)  # the same optimum, tie-breaks included


def test_fusion_weights_come_from_validation_not_test() -> None:
    # model 0 is right on validation and wrong on test, model 1 the other way round: a search that peeked at the
    # test labels would pick model 1
    y_val, y_test = np.arange(30) % 5, np.arange(30) % 5
    wrong = (np.arange(30) + 1) % 5
    val = [np.eye(5)[y_val], np.eye(5)[wrong]]
    test = [np.eye(5)[wrong], np.eye(5)[y_test]]
    from kdforge.audio.recipe import AudioRecipe, fuse_stages

    recipe = AudioRecipe.from_dict({"stages": [{"name": "a"}, {"name": "b"}], "fusion": {"step": 0.5,
                                                                                        "published": [0.5, 0.5]}})
    scores = {n: {"val": (val[i], y_val), "test": (test[i], y_test)} for i, n in enumerate(("a", "b"))}
    out = fuse_stages(recipe, scores, [])
    assert out["searched"]["weights"] == [1.0, 0.0]
    assert out["searched"]["val"]["top1"] == 100.0 and out["searched"]["test"]["top1"] == 0.0


# -- metrics -------------------------------------------------------------------------------------------


def test_metrics_on_a_toy_confusion_matrix() -> None:
    # labels 0 x4, 1 x2, 2 x2; predictions: class 0 all right, class 1 half, class 2 none (predicted 0)
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 0, 0, 1, 0, 0, 0])
    s = np.full((8, 4), 0.1)
    s[np.arange(8), pred] = 0.7  # class 3 is never a label: skipped by mCA/mAP/mAUC
    s[[6, 7], 2] = 0.2  # the true class second for class-2 rows
    assert topk_accuracy(s, y, 1) == 62.5 and topk_accuracy(s, y, 2) == 100.0
    assert mean_class_accuracy(s, y) == pytest.approx((100 + 50 + 0) / 3)
    assert mean_average_precision(np.eye(4)[y], y) == 100.0 and mean_auc(np.eye(4)[y], y) == 1.0
    from sklearn.metrics import average_precision_score, roc_auc_score

    assert mean_average_precision(s, y) == pytest.approx(100 * np.mean(
        [average_precision_score(y == c, s[:, c]) for c in (0, 1, 2)]))
    assert mean_auc(s, y) == pytest.approx(np.mean([roc_auc_score(y == c, s[:, c]) for c in (0, 1, 2)]))
    rs, ry = redact(s, y, [2])
    assert rs.shape == (6, 4) and len(ry) == 6 and 2 not in ry
    assert all_metrics(s, y, [2])["top1"] == pytest.approx(100 * 5 / 6)


def test_calibration_values() -> None:
    y = np.array([0, 1, 0, 1])
    certain = np.array([[1.0, 0.0]] * 4)  # confidence 1, half right
    assert expected_calibration_error(certain, y) == pytest.approx(50.0)
    half = np.full((4, 2), 0.5)
    assert expected_calibration_error(half, y) == pytest.approx(0.0) and nll(half, y) == pytest.approx(math.log(2))
    assert nll(5 * half, y) == pytest.approx(math.log(2))  # scores are normalised first


# -- EPIC-SOUNDS files ---------------------------------------------------------------------------------


def test_epic_sounds_loader_and_submission(tmp_path) -> None:
    h5py = pytest.importorskip("h5py")
    from kdforge.audio.data import EpicSounds, write_submission

    with h5py.File(tmp_path / "audio.hdf5", "w") as f:
        f["P01_01"] = (np.random.default_rng(0).standard_normal(24000 * 4) * 0.1).astype(np.float32)
    csv = tmp_path / "val.csv"
    csv.write_text("annotation_id,participant_id,video_id,start_timestamp,stop_timestamp,start_sample,stop_sample,"
                   "description,class,class_id\n"
                   "P01_01_0,P01,P01_01,0,0,1000,13000,tap,background,13\n"
                   "P01_01_1,P01,P01_01,0,0,5000,90000,clang,metal-only collision,0\n")
    train = EpicSounds(tmp_path / "audio.hdf5", csv, train=True)
    x, y = train[1]
    assert x.shape == (1, 400, 128) and y == 0
    views, y = EpicSounds(tmp_path / "audio.hdf5", csv)[0]
    assert views.shape == (5, 1, 400, 128) and y == 13
    assert torch.equal(views[0], views[4])  # a short segment: identical views
    assert train.class_names()[13] == "background"
    with pytest.raises(KdforgeError, match="EPIC-SOUNDS audio not found"):
        EpicSounds(tmp_path / "missing.hdf5", csv)
    with pytest.raises(KdforgeError, match="annotation file not found"):
        EpicSounds(tmp_path / "audio.hdf5", tmp_path / "none.csv")
    path = write_submission(tmp_path / "sub.zip", np.ones((2, 44)), ["P01_01_0", "P01_01_1"])
    sub = json.loads(zipfile.ZipFile(path).read("test.json"))
    assert sub["challenge"] == "audio_based_interaction_recognition" and len(sub["results"]["P01_01_1"]
                                                                              ["interaction"]) == 44
    with pytest.raises(KdforgeError, match="scores"):
        write_submission(tmp_path / "bad.zip", np.ones((2, 43)), ["a", "b"])


def test_spoken_words_optional() -> None:
    pytest.importorskip("espeakng_loader")
    from kdforge.audio.data import spoken_words

    clips = spoken_words(words=("yes", "stop"), voices=("en",), rates=(175,), pitches=(50,), sample_rate=16000)
    assert [w for _, w, _ in clips] == [0, 1]
    assert all(0.15 < len(a) / 16000 < 2.0 and np.abs(a).max() <= 1.0 for a, _, _ in clips)


# -- a staged run end to end ---------------------------------------------------------------------------

TINY = ["data.most=12", "data.least=3", "data.val_per_class=2", "data.test_most=6", "data.test_least=2",
        "data.pretrain_per_class=4", "data.cache=null", "fusion.step=0.25"]


@pytest.fixture(scope="module")
def audio_run(tmp_path_factory):
    from kdforge.audio.recipe import AudioRecipe, run
    from kdforge.config import load_yaml
    from kdforge.recipe_files import packaged

    d = load_yaml(packaged("audio/synthetic_quick.yaml"))
    for s in d["stages"]:
        s["epochs"] = 1
    recipe = AudioRecipe.from_dict(d, TINY)
    root = tmp_path_factory.mktemp("audio") / "run"
    return recipe, root, run(recipe, root, resume=False)


def test_staged_run_fusion_and_resume(audio_run) -> None:
    from kdforge.audio.recipe import run

    recipe, root, res = audio_run
    assert list(res.stages) == ["pretrain", "m1", "m2", "m3", "m4"]
    assert res.stages["m3"]["trainable_params"] < res.stages["m1"]["trainable_params"]
    assert set(res.fusion) >= {"uniform", "published", "searched"} and res.fusion["models"] == ["m1", "m2", "m3", "m4"]
    assert abs(sum(res.fusion["searched"]["weights"]) - 1) < 1e-9
    assert (root / "stages.json").is_file() and (root / "stages" / "02-m2" / "results.json").is_file()
    stamp = {p: p.stat().st_mtime_ns for p in root.glob("stages/*/model.safetensors")}
    again = run(recipe, root, resume=True)  # every stage finished: loaded, not retrained
    assert {p: p.stat().st_mtime_ns for p in root.glob("stages/*/model.safetensors")} == stamp
    # independent of the stored JSON: re-score M4's saved weights on the test split and recompute the metrics
    from safetensors.torch import load_file

    from kdforge.audio.method import view_scores
    from kdforge.audio.recipe import build_data
    from kdforge.data import make_loader

    data = build_data(recipe.data)
    net = audio_slowfast_lite(data.num_classes)
    net.load_state_dict(load_file(str(root / "stages" / "04-m4" / "model.safetensors")))
    s, y = view_scores(net, make_loader(data.test, 16, False))
    assert again.stages["m4"]["test"]["top1"] == pytest.approx(100 * float(np.mean(s.argmax(1) == y)))
    z = np.load(root / "stages" / "04-m4" / "scores.npz")
    np.testing.assert_allclose(z["test_s"], s, rtol=1e-5, atol=1e-6)
    w = again.fusion["searched"]["weights"]
    stored = [np.load(next(root.glob(f"stages/*-{n}")) / "scores.npz")["test_s"] for n in ("m1", "m2", "m3", "m4")]
    fused = sum(wi * si for wi, si in zip(w, stored, strict=True))
    assert again.fusion["searched"]["test"]["top1"] == pytest.approx(100 * float(np.mean(fused.argmax(1) == y)))


def test_cli_audio_predict_and_errors(audio_run, tmp_path, capsys) -> None:
    from kdforge.audio.frontend import write_wav
    from kdforge.cli import main

    _, root, res = audio_run
    wav = tmp_path / "mine.wav"
    write_wav(wav, 0.3 * np.sin(2 * np.pi * 2000 * np.arange(44100) / 44100), 44100)  # a 44.1 kHz "beep"
    assert main(["audio-predict", str(root), str(wav), "--top", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(line.split("  ", 1)[1] in res.class_names for line in lines)
    assert main(["audio-predict", str(root), str(wav), "--stage", "pretrain"]) == 2
    assert "not a stage" in capsys.readouterr().err
    assert main(["audio", "src/kdforge/recipes/audio/synthetic_quick.yaml", "--set", "stages.0.loss=hinge"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "loss" in err and len(err.strip().splitlines()) == 1


def test_epic_sounds_recipe_writes_the_submission(tmp_path) -> None:
    h5py = pytest.importorskip("h5py")
    from kdforge.audio.recipe import AudioRecipe, run

    rng = np.random.default_rng(0)
    with h5py.File(tmp_path / "a.hdf5", "w") as f:
        for v in ("P01_01", "P02_03"):
            f[v] = (rng.standard_normal(16000 * 6) * 0.1).astype(np.float32)
    head = "annotation_id,participant_id,video_id,start_timestamp,stop_timestamp,start_sample,stop_sample"

    def rows(n: int, labelled: bool) -> str:
        out = [head + (",description,class,class_id" if labelled else "")]
        for i in range(n):
            c = (0, 1, 13)[i % 3]
            s = int(rng.integers(0, 16000 * 4))
            out.append(f"P01_01_{i},P01,{('P01_01', 'P02_03')[i % 2]},0,0,{s},{s + 8000 + 4000 * (i % 4)}"
                       + (f",x,{'background' if c == 13 else f'c{c}'},{c}" if labelled else ""))
        return "\n".join(out) + "\n"

    for name, n, lab in (("train", 12, True), ("val", 6, True), ("test", 4, False)):
        (tmp_path / f"{name}.csv").write_text(rows(n, lab).replace("P01_01_", f"{name}_"))
    stage = {"loss": "ls", "epsilon": 0.06, "lr": 0.01, "epochs": 1}
    recipe = AudioRecipe.from_dict({
        "data": {"kind": "epic_sounds", "hdf5": str(tmp_path / "a.hdf5"), "train_csv": str(tmp_path / "train.csv"),
                 "val_csv": str(tmp_path / "val.csv"), "test_csv": str(tmp_path / "test.csv"),
                 "redact_background": True, "batch_size": 4, "views": 2,
                 "frontend": {"sample_rate": 16000, "win_ms": 20, "hop_ms": 10, "n_fft": 512, "n_mels": 32}},
        "model": {"model": "cnn_tiny"}, "fusion": {"step": 0.5, "published": [0.5, 0.5]},
        "stages": [{"name": "m1", **stage}, {"name": "m2", "init": "stage:m1", **stage}]})
    from kdforge.audio.recipe import build_data

    data = build_data(recipe.data)
    val_videos = {r.video_id for r in data.val.records}
    test_videos = {r.video_id for r in data.test.records}
    assert val_videos and test_videos and not val_videos & test_videos  # whole videos: fusion search vs report
    assert len(data.val) + len(data.test) == 6 and all(r.label >= 0 for r in data.test.records)
    res = run(recipe, tmp_path / "run", resume=False)
    assert res.stages["m1"]["test"]["top1"] >= 0 and res.fusion["searched"]["test"]  # reported on the labelled hold-out
    assert set(res.fusion["searched"]["weights"]) <= {0.0, 0.5, 1.0}
    sub = json.loads(zipfile.ZipFile(tmp_path / "run" / "submission.zip").read("test.json"))
    assert sorted(sub["results"]) == [f"test_{i}" for i in range(4)]  # the recognition test CSV's ids



# -- the official Auditory SlowFast ----------------------------------------------------------------------

# Feature-map sizes (channels, time, frequency) of the official ASF (ResNet-50, alpha 4, beta 1/8, fusion ratio 2)
# for the baseline's 400 x 128 input: the stem's conv stride 2x2 and 3x3/2 max-pool take the slow 100 frames to 25
# and the fast 400 to 100; the head's average pools are [NUM_FRAMES // ALPHA // 4, NUM_FREQ // 32] = [25, 4] and
# [NUM_FRAMES // 4, NUM_FREQ // 32] = [100, 4]; the stages halve frequency from res3 on.
OFFICIAL_SIZES = {
    "stem": [(64, 25, 32), (8, 100, 32)], "fuse1": [(80, 25, 32)],
    "slow2": [(256, 25, 32)], "fast2": [(32, 100, 32)], "fuse2": [(320, 25, 32)],
    "slow3": [(512, 25, 16)], "fast3": [(64, 100, 16)], "fuse3": [(640, 25, 16)],
    "slow4": [(1024, 25, 8)], "fast4": [(128, 100, 8)], "fuse4": [(1280, 25, 8)],
    "slow5": [(2048, 25, 4)], "fast5": [(256, 100, 4)],
}


def test_every_stage_has_the_official_feature_map_size() -> None:
    from kdforge.audio.models import audio_slowfast

    with torch.device("meta"):
        model = audio_slowfast(44)
    seen: dict[str, list[tuple[int, ...]]] = {}

    def hook(name: str):
        return lambda mod, inp, out: seen.setdefault(name, []).append(tuple(out.shape[1:]))

    model.pool.register_forward_hook(hook("stem"))  # one pool module, called for the slow then the fast stem
    for i, (s, f) in enumerate(zip(model.slow_stages, model.fast_stages, strict=True)):
        s.register_forward_hook(hook(f"slow{i + 2}"))
        f.register_forward_hook(hook(f"fast{i + 2}"))
    for k, fu in enumerate(model.fuse):
        fu.register_forward_hook(hook(f"fuse{k + 1}"))
    assert tuple(model.features(torch.empty(2, 1, 400, 128, device="meta")).shape) == (2, 2048 + 256)
    assert seen == OFFICIAL_SIZES


def _official_state(num_classes: int = 44) -> dict[str, torch.Tensor]:
    """The official ASF-50 state dict's names and shapes, written from its module layout (not from kdforge)."""
    out: dict[str, torch.Tensor] = {}

    def bn(prefix: str, c: int) -> None:
        for k in ("weight", "bias", "running_mean", "running_var"):
            out[f"{prefix}.{k}"] = torch.empty(c)
        out[f"{prefix}.num_batches_tracked"] = torch.tensor(0)

    out["s1.pathway0_stem.conv.weight"] = torch.empty(64, 1, 1, 7)
    out["s1.pathway1_stem.conv.weight"] = torch.empty(8, 1, 5, 7)
    bn("s1.pathway0_stem.bn", 64)
    bn("s1.pathway1_stem.bn", 8)
    slow_in, fast_in = 64 + 16, 8
    for st, (blocks, inner, tk) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), (1, 1, 3, 3), strict=True)):
        s = st + 2
        fuse_c = 32 * 2 ** (st - 1) if st else 8  # the fast channels entering the fusion before this stage
        out[f"s{s - 1}_fuse.conv_f2s.weight"] = torch.empty(2 * fuse_c, fuse_c, 7, 1)
        bn(f"s{s - 1}_fuse.bn", 2 * fuse_c)
        for p, (cin, inn, cout, k) in enumerate(((slow_in, inner, 4 * inner, tk),
                                                 (fast_in, inner // 8, inner // 2, 3))):
            for b in range(blocks):
                pre = f"s{s}.pathway{p}_res{b}"
                c0 = cin if b == 0 else cout
                if b == 0:
                    out[f"{pre}.branch1.weight"] = torch.empty(cout, c0, 1, 1)
                    bn(f"{pre}.branch1_bn", cout)
                out[f"{pre}.branch2.a.weight"] = torch.empty(inn, c0, k, 1)
                bn(f"{pre}.branch2.a_bn", inn)
                out[f"{pre}.branch2.b.weight"] = torch.empty(inn, inn, 1, 3)
                bn(f"{pre}.branch2.b_bn", inn)
                out[f"{pre}.branch2.c.weight"] = torch.empty(cout, inn, 1, 1)
                bn(f"{pre}.branch2.c_bn", cout)
        slow_in, fast_in = 4 * inner + (inner if st < 3 else 0), inner // 2
    out["head.projection.weight"] = torch.empty(num_classes, 2048 + 256)
    out["head.projection.bias"] = torch.empty(num_classes)
    g = torch.Generator().manual_seed(0)
    return {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in out.items()}


def test_official_checkpoint_names_convert_and_load_exactly(tmp_path) -> None:
    from kdforge.audio.models import audio_slowfast, convert_official
    from kdforge.audio.recipe import load_backbone

    official = _official_state()
    model = audio_slowfast(44)
    model.load_state_dict(convert_official(official), strict=True)  # every name and shape has its place
    sd = model.state_dict()
    for theirs, ours in (("s1.pathway1_stem.conv.weight", "fast_stem.weight"),
                         ("s1_fuse.conv_f2s.weight", "fuse.0.conv.weight"),
                         ("s4_fuse.bn.running_var", "fuse.3.bn.running_var"),
                         ("s3.pathway1_res0.branch1.weight", "fast_stages.1.0.short.0.weight"),
                         ("s5.pathway0_res2.branch2.b_bn.bias", "slow_stages.3.2.b_bn.bias"),
                         ("head.projection.weight", "head.projection.weight")):
        assert torch.equal(sd[ours], official[theirs]), theirs
    # a .pyth file as the official code saves it (model_state beside the epoch and optimiser), with a DDP prefix
    vgg = {("module." + k): v for k, v in _official_state(309).items()}
    torch.save({"epoch": 50, "model_state": vgg, "optimizer_state": {}, "cfg": "..."}, tmp_path / "VGG.pyth")
    fresh = audio_slowfast(44)
    skipped = load_backbone(fresh, tmp_path / "VGG.pyth")
    assert skipped == ["head.projection.bias", "head.projection.weight"]  # VGG-Sound's 309-class head stays new
    assert torch.equal(fresh.state_dict()["slow_stages.2.5.c.weight"], vgg["module.s4.pathway0_res5.branch2.c.weight"])
    with pytest.raises(KdforgeError, match="not a tensor of the official"):
        convert_official({"s9.pathway0_res0.branch2.a.weight": torch.zeros(1)})


def test_precise_bn_is_estimated_once_and_only_for_adapting_bns() -> None:
    from kdforge.audio.data import SpectrogramSet
    from kdforge.audio.method import AudioStage
    from kdforge.data import make_loader
    from kdforge.models import create_model

    torch.manual_seed(0)
    specs = [torch.randn(40, 16) * (1 + i) for i in range(8)]
    train = make_loader(SpectrogramSet(specs, [0, 1, 2] * 2 + [0, 1], 40, train=True, split="train"), 4, True)
    test = make_loader(SpectrogramSet(specs[:3], [0, 1, 2], 40, train=False, views=2, split="test"), 4, False)

    class T:  # what evaluate() reads from the trainer
        train_loader, global_step = train, 7

    net = create_model("timm:resnet10t", num_classes=3, in_chans=1)
    method = AudioStage(net, freeze_bn=True, precise_bn_batches=2)
    bns = [n for n, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    first = method.evaluate(test, T(), net)
    after = {k: v.clone() for k, v in net.state_dict().items()}
    changed = {k.rsplit(".", 1)[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {bns[0]}  # the stem BN only: the other BNs are frozen by the official policy
    again = method.evaluate(test, T(), net)  # same weights, same step: no second estimate
    assert all(torch.equal(v, after[k]) for k, v in net.state_dict().items()) and again == first
    T.global_step = 8  # a training step changed the weights: estimated again
    with torch.no_grad():
        next(net.parameters()).mul_(2.0)  # the stem convolution, before the stem BN
    method.evaluate(test, T(), net)
    assert not torch.equal(net.state_dict()[bns[0] + ".running_mean"], after[bns[0] + ".running_mean"])


def test_paper_recipe_reads_official_checkpoints_and_the_recognition_test_csv() -> None:
    from kdforge.audio.recipe import AudioRecipe
    from kdforge.recipe_files import packaged

    r = AudioRecipe.from_yaml(packaged("audio/epic_sounds_paper.yaml"))
    assert r.data.test_csv != r.data.val_csv and "recognition_test" in r.data.test_csv
    assert 0 < r.data.report_fraction < 1 and all(s.init.endswith(".pyth") for s in r.stages)
