"""The clip / clip_kd Methods (teacher frozen, scales clamped, MFD masking) and the pair data sets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import kdforge as kd
from kdforge.clip.data import clip_csv, clip_folder
from kdforge.clip.method import ClipKD
from kdforge.clip.model import build_clip
from kdforge.config import DataConfig
from kdforge.data import load_data
from kdforge.errors import KdforgeError

TINY_TEXT = {"model": "small", "kwargs": {"width": 16, "depth": 1, "heads": 2}}
TEACHER = {"embed_dim": 16, "image": {"model": "cnn_small", "kwargs": {"width": 4}}, "text": TINY_TEXT}
STUDENT = {"embed_dim": 8, "image": {"model": "vit", "kwargs": {"patch": 7, "width": 16, "depth": 1, "heads": 2}},
           "text": TINY_TEXT}
CAPTIONS = ["a red circle", "a blue square", "a green cross", "a white triangle"]


def _kd(weights: dict[str, float], **kw: object) -> ClipKD:
    torch.manual_seed(0)
    m = ClipKD(build_clip(STUDENT), build_clip(TEACHER), weights, **kw)
    m.set_text_data(CAPTIONS, [[c] for c in CAPTIONS])
    return m


def _step(m: ClipKD, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    x, ids = torch.randn(8, 1, 28, 28), torch.arange(8) % 4
    out = m.training_step((x, ids), 0)
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    return out


def test_clip_kd_teacher_frozen_scales_clamped_projection_trained() -> None:
    m = _kd({"task": 1, "crd": 1, "fd": 2000, "icl": 1}).train()
    assert not m.teacher.training
    before = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    params = [p for p in m.parameters() if p.requires_grad]
    assert all(not p.requires_grad for p in m.teacher.parameters())
    assert any(p is m.kd.proj_v.weight for p in params) and any(p is m.kd.cross_scale.theta for p in params)
    with torch.no_grad():
        m.student.logit_scale.theta.fill_(7.0)
    opt = torch.optim.AdamW(params, lr=1e-2)
    w0 = m.kd.proj_v.weight.clone()
    out = _step(m, opt)
    assert set(out) == {"task", "crd", "fd", "icl", "loss"}
    assert m.student.logit_scale.theta.item() <= math.log(100) + 1e-2  # clamped before use, one step of drift
    _step(m, opt)
    assert not torch.equal(w0, m.kd.proj_v.weight)
    assert all(torch.equal(before[k], v) for k, v in m.teacher.state_dict().items())
    assert not m.teacher.training and m.student.training
    assert all(not k.startswith("teacher.") for k in m.resumable_state())


def test_mfd_masks_for_real_compat_is_fd_and_cnn_refuses() -> None:
    assert _kd({"mfd": 2000}).mask_ratio == 0.75 and _kd({"mfd": 2000}).kd.w["fd"] == 2000
    assert _kd({"mfd": 2000}, mfd_compat=True).mask_ratio == 0.0
    with pytest.raises(KdforgeError, match="valid: task, crd, fd, gd, icl, afd, mfd"):
        _kd({"kl": 1.0})
    cnn = ClipKD(build_clip({**STUDENT, "image": {"model": "cnn_small", "kwargs": {"width": 4}}}), build_clip(TEACHER),
                 {"mfd": 1.0})
    cnn.set_text_data(CAPTIONS, None)
    with pytest.raises(KdforgeError, match="needs a ViT"):
        cnn.training_step((torch.randn(4, 1, 28, 28), torch.arange(4)), 0)


def test_train_teacher_then_distil_through_the_engine(tmp_path: Path) -> None:
    base = {"seed": 0, "data": {"name": "clip_fashion", "batch_size": 64, "limit_train": 128, "augment": False},
            "optim": {"name": "adamw", "lr": 1e-3}, "train": {"epochs": 1, "progress": "silent", "threads": 1}}
    res = kd.train(kd.Recipe.from_dict({**base, "name": "t", "method": {"name": "clip", "model": TEACHER}}),
                   tmp_path / "teacher")
    assert 0 <= res.test_last["top1"] <= 100 and "val_top1" in res.history[0]
    ckpt = tmp_path / "teacher" / "checkpoints" / "last.safetensors"
    method = {"name": "clip_kd", "teacher": {**TEACHER, "checkpoint": str(ckpt)}, "student": STUDENT,
              "weights": {"task": 1, "fd": 2000}}
    res = kd.train(kd.Recipe.from_dict({**base, "name": "s", "method": method}), None)
    assert {"train_fd", "train_task"} <= set(res.history[0])
    with pytest.raises(KdforgeError, match="needs a 'checkpoint'"):
        kd.train(kd.Recipe.from_dict({**base, "method": {**method, "teacher": TEACHER}}), None)
    with pytest.raises(KdforgeError, match="needs an image–text pair data set"):
        kd.train(kd.Recipe.from_dict({**base, "data": {"name": "fashion_mnist_subset", "limit_train": 64},
                                           "method": method}), None)


def test_fashion_pairs_captions_held_out_prompts() -> None:
    b = load_data(name="clip_fashion")
    tr = b.train.dataset if hasattr(b.train, "dataset") else b.train
    assert len(tr.captions) == 80 and b.num_classes == 10
    x, cid = tr[0]
    assert x.shape == (1, 28, 28) and tr.captions[int(cid)] in [tr.captions[i] for i in tr.options[0]]
    prompts = {p for ps in b.test.prompts for p in ps}
    assert not prompts & set(tr.captions)  # zero-shot prompts are held out of the training captions
    assert b.test.pair_captions[0] in b.test.prompts[int(b.test[0][1])]


def _png(path: Path, v: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), v, np.uint8)).save(path)


def test_csv_and_folder_pairs_and_bad_csv(tmp_path: Path) -> None:
    for i in range(4):
        _png(tmp_path / "img" / f"{i}.png", 60 * i)
        (tmp_path / "img" / f"{i}.txt").write_text(f"caption {i}\n")
    (tmp_path / "pairs.tsv").write_text("filepath\ttitle\n" + "".join(f"img/{i}.png\tcaption {i}\n" for i in range(4)))
    cfg = DataConfig(root=str(tmp_path / "pairs.tsv"), resize=8, val_fraction=0.25, augment=False)
    b = clip_csv(cfg)
    assert len(b.train) == 2 and len(b.val) == 1 and len(b.test) == 1 and b.train[0][0].shape == (3, 8, 8)
    assert b.test.prompts == [[b.test.pair_captions[0]]]
    # validation is held out of the training pairs, never the test split; no classes: retrieval only
    held = set(b.val.pair_captions) | set(b.test.pair_captions) | set(b.train.captions)
    assert len(held) == 4 and not set(b.val.pair_captions) & set(b.test.pair_captions)
    assert b.val.zero_shot is False and b.test.zero_shot is False
    assert len(clip_csv(cfg.model_copy(update={"val_fraction": 0.0})).train) == 3
    f = clip_folder(cfg.model_copy(update={"root": str(tmp_path / "img")}))
    assert len(f.train) + len(f.val) + len(f.test) == 4
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.csv").write_text("filepath,label\nimg/0.png,3\n")
    with pytest.raises(KdforgeError, match=r"no caption column \(columns: filepath, label; valid caption columns"):
        clip_csv(cfg.model_copy(update={"root": str(tmp_path / "bad.csv")}))
    with pytest.raises(KdforgeError, match="no image/caption pairs"):
        clip_folder(cfg.model_copy(update={"root": str(tmp_path / "empty")}))


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("recipes/clip/*.yaml")), ids=lambda p: p.stem)
def test_clip_recipes_validate(path: Path) -> None:
    r = kd.Recipe.from_yaml(path)
    cls = {"clip": "ClipConfig", "clip_kd": "ClipKDConfig"}[r.method.name]
    import kdforge.clip.method as m

    getattr(m, cls).model_validate(r.method.model_dump())


def _clip_recipe(data: dict, method: dict, **train: object) -> kd.Recipe:
    return kd.Recipe.from_dict({"name": "c", "seed": 0, "data": data, "method": method,
                                "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.1, "eps": 1e-6},
                                "train": {"epochs": 1, "progress": "silent", "threads": 1, **train}})


def test_clip_kd_optimizer_groups_follow_the_spec() -> None:
    r = _clip_recipe({"name": "clip_fashion", "batch_size": 32, "limit_train": 64, "augment": False},
                     {"name": "clip_kd", "teacher": {**TEACHER, "checkpoint": "unused"}, "student": STUDENT})
    m = _kd({"task": 1, "crd": 1, "fd": 2000, "icl": 1})
    t = kd.Trainer(m, kd.load_data(r.data), r)
    assert set(t.optimizers) == {"main", "loss"}
    main, loss = t.optimizers["main"].opt.param_groups, t.optimizers["loss"].opt.param_groups
    assert [g["weight_decay"] for g in main] == [0.1, 0.0] and all(g["eps"] == 1e-6 for g in main + loss)
    plain = {id(p) for p in main[1]["params"]}
    norms = [p for mod in m.student.modules() if isinstance(mod, nn.LayerNorm) for p in mod.parameters()]
    biases = [p for n, p in m.student.named_parameters() if n.endswith(".bias")]
    assert id(m.student.logit_scale.theta) in plain and all(id(p) in plain for p in norms + biases)
    assert all(p.ndim >= 2 for p in main[0]["params"])  # decay only on weight matrices and tensors
    # the loss module (projections, cross scale): AdamW's default decay 0.01, as the released code
    assert [g["weight_decay"] for g in loss] == [0.01]
    own = {id(p) for p in loss[0]["params"]}
    assert id(m.kd.proj_v.weight) in own and id(m.kd.cross_scale.theta) in own
    assert own == {id(p) for p in m.kd.parameters()} and not own & {id(p) for g in main for p in g["params"]}
    before = m.kd.proj_v.weight.detach().clone()
    t.train_steps(1)
    assert not torch.equal(before, m.kd.proj_v.weight)


def test_clip_evaluation_zero_shot_and_recall_and_rebuild_from_spec(tmp_path: Path) -> None:
    r = _clip_recipe({"name": "clip_fashion", "batch_size": 32, "limit_train": 64, "augment": False,
                      "eval_batch_size": 128}, {"name": "clip", "model": TEACHER})
    res = kd.train(r, tmp_path / "run")
    assert res.monitor == "top1"
    assert {"top1", "top5", "loss", "i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5"} <= set(res.test_last)
    assert "val_i2t_R@1" in res.history[0]
    model, meta = kd.load_deployable(tmp_path / "run", "last")
    spec = json.loads(meta["kdforge_spec"])
    assert spec == {"builder": "clip", "spec": TEACHER, "in_chans": 1, "image_size": 28}
    from kdforge.clip.method import evaluate_clip

    data = kd.load_data(r.data)
    got = evaluate_clip(model, torch.utils.data.DataLoader(data.test, batch_size=128))
    assert got == pytest.approx(res.test_last)
    # retrieval by brute force: image k's caption among the most similar distinct captions
    from kdforge.clip.zeroshot import unique_captions

    with torch.no_grad():
        img = F.normalize(model.encode_image(torch.stack([data.test[i][0] for i in range(len(data.test))])), dim=-1)
        unique, pos = unique_captions(data.test.pair_captions)
        txt = F.normalize(model.encode_text(unique), dim=-1)
    hits = pos[torch.arange(len(img)), (img @ txt.T).argmax(1)]
    assert got["i2t_R@1"] == pytest.approx(100 * float(hits.float().mean()))


def test_csv_pairs_select_on_recall_not_on_the_test_split(tmp_path: Path) -> None:
    for i in range(12):
        _png(tmp_path / "img" / f"{i}.png", 20 * i)
    (tmp_path / "pairs.csv").write_text("filepath,title\n" + "".join(f"img/{i}.png,caption {i}\n" for i in range(12)))
    r = _clip_recipe({"name": "clip_csv", "root": str(tmp_path / "pairs.csv"), "resize": 28, "val_fraction": 0.25,
                      "batch_size": 4, "augment": False}, {"name": "clip", "model": {**TEACHER, "image": {
                          "model": "cnn_small", "kwargs": {"width": 4}}}}, epochs=2)
    data = kd.load_data(r.data)
    assert not set(data.val.pair_captions) & set(data.test.pair_captions)
    res = kd.train(r, tmp_path / "run")
    assert res.monitor == "i2t_R@1" and res.best_epoch >= 0 and res.best_value is not None
    assert "top1" not in res.test_last and {"i2t_R@1", "t2i_R@1"} <= set(res.test_last)
    assert "val_i2t_R@1" in res.history[0] and "val_top1" not in res.history[0]


def test_clip_model_specs_are_typed() -> None:
    from kdforge.clip.method import ClipConfig
    from kdforge.config import validate
    from kdforge.errors import KdforgeError

    with pytest.raises(KdforgeError, match=r"unknown key 'method.model.image.modle'"):
        validate(ClipConfig, {"model": {"image": {"model": "vit", "modle": 1}}}, prefix="method")
    with pytest.raises(KdforgeError, match=r"method.model.embed_dim"):
        validate(ClipConfig, {"model": {"embed_dim": "wide"}}, prefix="method")
    with pytest.raises(KdforgeError, match=r"either open_clip"):
        validate(ClipConfig, {"model": {"open_clip": "ViT-B-16", "embed_dim": 32}}, prefix="method")
    c = validate(ClipConfig, {"model": {"embed_dim": 32, "image": {"model": "cnn_small", "kwargs": {"width": 8}}}},
                 prefix="method")
    assert c.model.build_spec() == {"embed_dim": 32, "image": {"model": "cnn_small", "kwargs": {"width": 8}},
                                    "text": {"model": "small", "kwargs": {}}}
