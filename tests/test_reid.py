"""kdforge.reid (PDM): module properties, loss zeros/signs/hand values, sampler layout, metrics, fusion, engine."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kdforge as kd
from kdforge.config import DataConfig
from kdforge.data import load_data
from kdforge.errors import KdforgeError
from kdforge.method import DataInfo, build_method
from kdforge.reid.data import CrossModalPKSampler, render_pedestrians
from kdforge.reid.losses import block_labels, ch_loss, cpm_loss, dcs_loss, ort_loss, triplet_loss
from kdforge.reid.metrics import (
    Setting,
    eval_ranking,
    evaluate_protocol,
    evaluate_setting,
    sample_gallery,
)
from kdforge.reid.model import build_reid, load_resnet50_weights
from kdforge.reid.modules import MFGM, PLM, PNL, phase_only, sna

pytestmark = pytest.mark.usefixtures("one_thread")


# -- modules ---------------------------------------------------------------------------------------
def test_sna_keeps_shape_has_no_parameters_and_maps_a_constant_channel_to_x_sigmoid_half() -> None:
    x = torch.randn(2, 3, 6, 5)
    x[0, 1] = 2.5
    y = sna(x)
    assert y.shape == x.shape
    assert torch.allclose(y[0, 1], torch.full((6, 5), 2.5 * torch.sigmoid(torch.tensor(0.5)).item()))
    assert not list(kd.reid.modules.SNA().parameters())
    assert torch.all(torch.sigmoid(torch.tensor(0.5)) <= y[x > 0] / x[x > 0] + 1e-6)  # gain in [σ(½), 1)


def test_phase_only_is_real_has_unit_spectrum_and_ignores_positive_scale() -> None:
    x = torch.randn(2, 3, 8, 6)
    ph = phase_only(x)
    assert not ph.is_complex() and ph.shape == x.shape
    assert torch.allclose(torch.fft.fft2(ph).abs(), torch.ones(2, 3, 8, 6), atol=1e-4)
    assert torch.allclose(phase_only(3.7 * x), ph, atol=1e-5)


def test_mfgm_triples_the_batch_and_passes_the_input_through_first_in_eval() -> None:
    m = MFGM(16, kernel=7).eval()
    x = torch.randn(3, 16, 4, 2)
    y = m(x)
    assert y.shape == (9, 16, 4, 2)
    assert torch.equal(y[:3], x)
    assert not torch.allclose(y[3:6], y[6:])  # two independent generators


def test_plm_shapes_range_and_hand_computed_pooling() -> None:
    torch.manual_seed(0)
    plm = PLM(c=3, hw=4, prototypes=2)
    f = torch.randn(2, 3, 2, 2)
    z, s = plm(f)
    assert s.shape == (2, 2, 4) and z.shape == (2, 6)
    assert torch.all((s > 0) & (s < 1))
    x = f[1].flatten(1).T                                     # [HW, C]
    s_hand = torch.sigmoid(plm.q @ (x + plm.pos).T)          # [P, HW]
    assert torch.allclose(s[1], s_hand, atol=1e-6)
    assert torch.allclose(z[1], (s_hand @ x / 4).flatten(), atol=1e-6)
    with pytest.raises(ValueError, match="positional embedding fixes the input size"):
        plm(torch.randn(1, 3, 3, 2))


def test_pnl_raw_reshape_quirk_changes_values_not_shapes() -> None:
    torch.manual_seed(0)
    clean, raw = PNL(8, 8), PNL(8, 8, raw_reshape=True)
    raw.load_state_dict(clean.state_dict())
    for m in (clean, raw):
        torch.nn.init.ones_(m.w[1].weight)  # a non-zero residual branch, so the attention shows
    z, low = torch.randn(2, 8, 4, 2), torch.randn(2, 8, 4, 2)
    a, b = clean(z, low), raw(z, low)
    assert a.shape == b.shape == z.shape and not torch.allclose(a, b)
    assert torch.equal(PNL(8, 8)(z, low), z)  # zero-initialised BN: the block starts as the identity


# -- losses ----------------------------------------------------------------------------------------
def test_ch_loss_zero_for_equal_maps_bounded_and_its_gradient_pushes_maps_apart() -> None:
    same = torch.full((3, 4, 10), 0.3)
    assert ch_loss(same).item() == pytest.approx(0.0, abs=1e-6)
    assert ch_loss(same, "cosine").item() == pytest.approx(0.0, abs=1e-6)
    maps = torch.rand(5, 4, 10, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    v = ch_loss(maps)
    assert -0.5 <= v.item() <= 0.0
    assert ch_loss(torch.stack([torch.zeros(4, 10), torch.ones(4, 10)], 1)).item() == pytest.approx(-0.5)
    v.backward()
    moved = (maps - 0.1 * maps.grad).detach()
    assert ch_loss(moved).item() < v.item()
    # the code's hard-coded 288 divides the same squared distance
    assert ch_loss(maps.detach(), hw=288).item() == pytest.approx(v.item() * math.sqrt(10 / 288), rel=1e-5)


def _runs(centres: torch.Tensor, k: int) -> torch.Tensor:
    return centres.repeat_interleave(k, 0)


def test_cpm_is_zero_when_generated_centres_sit_on_the_other_modality_and_positive_when_swapped() -> None:
    k = 2
    cv = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    ci = cv + torch.tensor([1.0, 0.0])
    v, i = _runs(cv, k), _runs(ci, k)
    assert cpm_loss(v, i, i.clone(), v.clone(), k).item() == pytest.approx(0.0, abs=1e-6)
    assert cpm_loss(v, i, v.clone(), i.clone(), k).item() > 0.2  # generated = own modality: pulled pair farther


def test_cpm_stop_gradient_blocks_the_pushed_pair() -> None:
    k = 2
    cv = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    ci = torch.tensor([[0.0, 3.0], [10.0, 3.0]])
    v = _runs(cv, k).requires_grad_(True)
    gv = _runs(cv + torch.tensor([0.0, 1.0]), k)  # d(I, G·V) = 2 > d(V, G·V) − m = 0.8: the first term is active
    loss = cpm_loss(v, _runs(ci, k), gv, _runs(cv, k), k)
    assert loss.item() > 0
    loss.backward()
    assert v.grad is None or torch.count_nonzero(v.grad) == 0


def test_ort_is_the_raw_inner_product_sum_over_6b_and_zero_for_orthogonal() -> None:
    g1, g2 = torch.rand(4, 5), torch.rand(4, 5)
    assert ort_loss(g1, g2, 12).item() == pytest.approx(float((g1 * g2).sum() / 12), rel=1e-6)
    assert ort_loss(torch.eye(4)[:2], torch.eye(4)[2:], 6).item() == 0.0


def test_dcs_zero_on_centres_far_apart_and_hand_value_otherwise() -> None:
    y = torch.tensor([0, 0, 1, 1])
    f = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    assert dcs_loss(f, y, k=2).item() == pytest.approx(0.0, abs=1e-5)
    g = torch.tensor([[0.0, 0.0], [0.0, 0.2], [0.5, 0.0], [0.5, 0.0]])
    # intra: |0.1 − 0.01| twice over 4; centres (0, 0.1), (0.5, 0): inter = 0.7 − √0.26 for both anchors
    want = (2 * 0.09) / 4 + (0.7 - math.sqrt(0.26))
    assert dcs_loss(g, y, k=2).item() == pytest.approx(want, rel=1e-4)


def test_triplet_zero_when_classes_separated_by_more_than_the_margin_else_hand_value() -> None:
    y = torch.tensor([0, 0, 1, 1])
    x = torch.tensor([[0.0], [0.1], [5.0], [5.1]])
    assert triplet_loss(x, y).item() == 0.0
    x2 = torch.tensor([[0.0], [0.5], [0.6], [1.0]])
    # anchors: 0.3 + (0.5) − 0.6, 0.3 + 0.5 − 0.1, 0.3 + 0.4 − 0.1, 0.3 + 0.4 − 0.5
    want = (0.2 + 0.7 + 0.6 + 0.2) / 4
    assert triplet_loss(x2, y).item() == pytest.approx(want, rel=1e-5)


def test_block_labels_follow_the_feature_order_for_any_labels() -> None:
    yv, yi = torch.tensor([1, 1, 2, 2]), torch.tensor([7, 7, 9, 9])
    lab = block_labels(yv, yi, 6)
    assert lab.view(6, 4).tolist() == [yv.tolist(), yi.tolist()] * 3
    assert block_labels(yv, yi, 2).tolist() == yv.tolist() + yi.tolist()
    assert block_labels(yv, yi, 6, code_layout=True).view(6, 4).tolist() == [yv.tolist()] * 3 + [yi.tolist()] * 3


# -- sampler ---------------------------------------------------------------------------------------
def test_pk_sampler_layout_identical_order_contiguous_runs_and_sharding() -> None:
    vis = np.repeat(np.arange(6), 5)
    ir = np.repeat(np.arange(6), 3)
    p, k = 3, 2
    s = CrossModalPKSampler(vis, ir, p, k, seed=1)
    codes = list(s)
    assert len(codes) == len(s) == (30 // 6) * 6
    v, i = np.divmod(np.array(codes), len(ir))
    for b in range(len(codes) // (p * k)):
        lv, li = vis[v[b * 6:(b + 1) * 6]], ir[i[b * 6:(b + 1) * 6]]
        assert lv.tolist() == li.tolist()
        runs = lv.reshape(p, k)
        assert (runs == runs[:, :1]).all() and len(set(runs[:, 0])) == p
    assert list(CrossModalPKSampler(vis, ir, p, k, seed=1)) == codes
    s.set_epoch(1)
    assert list(s) != codes
    shards = [list(CrossModalPKSampler(vis, ir, p, k, seed=1, rank=r, world=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) and shards[0] != shards[1]
    assert CrossModalPKSampler(vis, ir, p, k, limit=12).__len__() == 12
    with pytest.raises(KdforgeError, match="ids_per_batch"):
        CrossModalPKSampler(vis, ir, 7, k)


# -- metrics ---------------------------------------------------------------------------------------
def test_metrics_on_a_hand_built_similarity_matrix() -> None:
    g_pids = np.array([1, 2, 1, 3, 2])
    g_cams = np.array([1, 1, 2, 4, 5])
    sim = np.array([[0.9, 0.8, 0.1, 0.7, 0.3],    # query id 1: positives at ranks 1 and 5
                    [0.9, 0.1, 0.2, 0.3, 0.8]])   # query id 2: ranking 1,2(cam5),3,1,2 → positives at 2 and 5
    r = eval_ranking(sim, np.array([1, 2]), g_pids, np.array([6, 6]), g_cams)
    ap1 = (1 / 1 + 2 / 5) / 2
    ap2 = (1 / 2 + 2 / 5) / 2
    assert r["mAP"] == pytest.approx(100 * (ap1 + ap2) / 2)
    assert r["mINP"] == pytest.approx(100 * (2 / 5 + 2 / 5) / 2)
    assert r["rank1"] == pytest.approx(50.0) and r["rank5"] == pytest.approx(100.0)


def test_cmc_is_deduplicated_by_identity() -> None:
    g_pids = np.array([5, 5, 5, 1])
    sim = np.array([[0.9, 0.8, 0.7, 0.1]])
    r = eval_ranking(sim, np.array([1]), g_pids, np.array([3]), np.array([1, 1, 1, 1]))
    assert r["rank1"] == 0.0 and r["rank5"] == 100.0   # the 4th image is the 2nd distinct identity
    assert r["mAP"] == pytest.approx(25.0)              # AP on the raw ranking: 1/4


def test_sysu_rule_drops_cam2_for_cam3_queries_and_queries_without_positives_are_skipped() -> None:
    g_pids = np.array([1, 1, 2])
    g_cams = np.array([2, 4, 1])
    sim = np.array([[0.9, 0.1, 0.5], [0.9, 0.1, 0.5], [0.2, 0.3, 0.4]])
    q_pids, q_cams = np.array([1, 1, 9]), np.array([3, 6, 3])
    r = eval_ranking(sim, q_pids, g_pids, q_cams, g_cams, rule="sysu")
    # cam-3 query: its cam-2 positive is removed → ranked [2, 1]; cam-6 query keeps it → rank 1; id 9 skipped
    assert r["queries"] == 2
    assert r["rank1"] == pytest.approx(50.0)
    assert r["mAP"] == pytest.approx(100 * (0.5 + (1 + 2 / 3) / 2) / 2)
    only = eval_ranking(sim[:1, :1], q_pids[:1], g_pids[:1], q_cams[:1], g_cams[:1], rule="sysu")
    assert only["queries"] == 0 and math.isnan(only["mAP"])
    llcm = eval_ranking(sim[:1], np.array([1]), g_pids, np.array([4]), g_cams, rule="same_cam")
    assert llcm["rank1"] == 100.0 and llcm["mAP"] == pytest.approx(100.0)  # same id+cam (index 1) removed


def test_gallery_trials_sample_one_per_identity_camera_and_average() -> None:
    pids = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    cams = np.array([1, 1, 2, 1, 2, 2, 3, 3])
    modal = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    g = sample_gallery(pids[:6], cams[:6], 1, seed=0)
    assert len(g) == 4 and len({(pids[i], cams[i]) for i in g}) == 4
    assert not all(np.array_equal(sample_gallery(pids[:6], cams[:6], 1, t), g) for t in range(1, 10))
    feats = np.random.default_rng(0).standard_normal((8, 4))
    s = Setting("", 1, 0, None, 1, 10, "none")
    got = evaluate_setting(feats, pids, cams, modal, s)
    runs = []
    for t in range(10):
        gi = sample_gallery(pids[:6], cams[:6], 1, t)
        runs.append(eval_ranking(feats[6:] @ feats[gi].T, pids[6:], pids[gi], cams[6:], cams[gi])["mAP"])
    assert got["mAP"] == pytest.approx(float(np.mean(runs)))


# -- inference -------------------------------------------------------------------------------------
def _six_dot_products(net: torch.nn.Module, q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The official fused similarity from the raw head outputs: Σ over 3 branches of ⟨f, f'⟩ + ⟨s, s'⟩."""
    with torch.no_grad():
        oq, og = net._heads(net._trunk(net.stem_i(q))), net._heads(net._trunk(net.stem_v(g)))
    total = torch.zeros(len(q), len(g))
    for b in range(3):
        for key in ("f", "bn_feats"):
            a = F.normalize(oq[key][b * len(q):(b + 1) * len(q)], dim=1)
            c = F.normalize(og[key][b * len(g):(b + 1) * len(g)], dim=1)
            total += a @ c.T
    return total


def test_fused_similarity_is_the_sum_of_six_dot_products_and_flip_fusion_adds_the_mirror_images() -> None:
    torch.manual_seed(0)
    net = build_reid(5, image_size=(32, 16), width=4, prototypes=2).eval()
    q, g = torch.randn(3, 3, 32, 16), torch.randn(4, 3, 32, 16)
    assert torch.allclose(net.embed(q, 1) @ net.embed(g, 0).T, _six_dot_products(net, q, g), atol=1e-5)
    # flip fusion: (e(q) + e(q_mirror)) · (e(g) + e(g_mirror)), mirrors built by reversing the columns
    cols = torch.arange(15, -1, -1)
    qm, gm = q[..., cols], g[..., cols]
    want = sum(_six_dot_products(net, a, b) for a in (q, qm) for b in (g, gm))
    with torch.no_grad():
        got = net.embed_flip(q, 1) @ net.embed_flip(g, 0).T
        upside_down = net.embed_flip(q.flip(-2), 1) @ net.embed_flip(g.flip(-2), 0).T
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(upside_down, want, atol=1e-2)  # a wrong flip axis would be caught
    with torch.no_grad():  # summed, not re-normalised: 6 unit parts per view, two views that differ
        norms = net.embed_flip(q, 1).norm(dim=1)
    assert (norms > 6**0.5 + 1e-3).all() and (norms <= 2 * 6**0.5 + 1e-4).all()


def _official_eval_regdb(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, max_rank: int = 20
                         ) -> tuple[np.ndarray, float, float]:
    """A transcription of the official RegDB evaluation (DDAG/AGW/DEEN ``eval_regdb``): raw-ranking CMC."""
    indices = np.argsort(distmat, axis=1, kind="stable")
    matches = (g_pids[indices] == q_pids[:, None]).astype(np.int32)
    all_cmc, all_ap, all_inp = [], [], []
    for qi in range(len(q_pids)):
        raw_cmc = matches[qi]  # RegDB: query cam 1, gallery cam 2, nothing removed
        if not raw_cmc.any():
            continue
        cmc = raw_cmc.cumsum()
        pos_max = np.max(np.where(raw_cmc == 1))
        all_inp.append(cmc[pos_max] / (pos_max + 1.0))
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        tmp = np.asarray([x / (i + 1.0) for i, x in enumerate(raw_cmc.cumsum())]) * raw_cmc
        all_ap.append(tmp.sum() / raw_cmc.sum())
    return np.asarray(all_cmc).astype(np.float32).mean(0), float(np.mean(all_ap)), float(np.mean(all_inp))


def test_regdb_cmc_is_the_official_raw_ranking_and_other_protocols_stay_deduplicated() -> None:
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(30), 10)  # RegDB: 10 images per identity per modality
    feats = rng.standard_normal((600, 16)) + 0.4 * rng.standard_normal((30, 16))[np.r_[ids, ids]]
    pids, modal = np.r_[ids, ids], np.r_[np.zeros(300), np.ones(300)].astype(int)
    cams = np.where(modal == 0, 1, 2)
    r = evaluate_protocol(feats, pids, cams, modal, "regdb")
    for key, (qm, gm) in (("", (0, 1)), ("i2v_", (1, 0))):
        q, g = feats[modal == qm], feats[modal == gm]
        cmc, m_ap, m_inp = _official_eval_regdb(-(q @ g.T), ids, ids)
        for k in (1, 5, 10, 20):
            assert r[f"{key}rank{k}"] == pytest.approx(100 * cmc[k - 1], abs=1e-4)
        assert r[f"{key}mAP"] == pytest.approx(100 * m_ap) and r[f"{key}mINP"] == pytest.approx(100 * m_inp)
    # the de-duplicated CMC of the SYSU/LLCM code ranks identities, not images: higher at rank 5 on this set
    q, g = feats[modal == 0], feats[modal == 1]
    dedup = eval_ranking(q @ g.T, ids, ids, np.ones(300), np.full(300, 2))
    assert dedup["rank5"] > r["rank5"] + 1 and dedup["rank1"] == pytest.approx(r["rank1"])


def test_synthetic_pedestrians_share_shape_but_not_colour_across_modalities() -> None:
    x, _, cams, modal = render_pedestrians(4, 3, per_cam=2)
    assert x.shape == (4 * 6 * 2, 3, 64, 32) and x.dtype == np.uint8
    ir = x[modal == 1]
    assert (ir[:, 0] == ir[:, 1]).all() and (ir[:, 1] == ir[:, 2]).all()  # grey
    assert set(cams[modal == 1]) == {3, 6} and set(cams[modal == 0]) == {1, 2, 4, 5}
    assert np.array_equal(render_pedestrians(4, 3, per_cam=2)[0], x)


# -- method and engine -----------------------------------------------------------------------------
def _recipe(**method: object) -> kd.Recipe:
    return kd.Recipe.from_dict({
        "seed": 0, "data": {"name": "reid_synthetic", "resize": 32, "batch_size": 8, "limit_train": 16,
                            "val_fraction": 0.1},
        "method": {"name": "pdm", "ids_per_batch": 2, "num_pos": 4, "model": {"width": 4, "prototypes": 2},
                   **method},
        "optim": {"lr": 0.05}, "sched": {"name": "constant"},
        "train": {"epochs": 1, "progress": "silent", "threads": 1, "eval_every": 1}})


def _trainer(recipe: kd.Recipe) -> kd.Trainer:
    kd.engine.trainer.seed_everything(recipe.seed)
    data = load_data(recipe.data)
    method = build_method(recipe.method.model_dump(), DataInfo(data.num_classes, 3, data.image_size))
    return kd.Trainer(method, data, recipe)


def test_first_step_loss_is_deterministic_and_every_term_is_logged() -> None:
    a = _trainer(_recipe()).train_steps(1)
    b = _trainer(_recipe()).train_steps(1)
    assert a == b
    assert {"loss", "id", "tri", "cpm", "ort", "ch", "dcs"} <= set(a)
    base = _trainer(_recipe(model={"width": 4, "mfgm": False, "plm": False})).train_steps(1)
    assert {"id", "tri"} <= set(base) and not {"cpm", "ch", "dcs"} & set(base)


def test_backbone_lr_scales_the_main_optimizer_only() -> None:
    t = _trainer(_recipe(backbone_lr=0.1))
    t.train_steps(1)
    assert t.optimizers["main"].lr == pytest.approx(0.005) and t.optimizers["head"].lr == pytest.approx(0.05)
    head = {id(p) for p in t.method.net.head.parameters()} | {id(p) for p in t.method.net.head_s.parameters()}
    assert {id(p) for p in t.optimizers["head"].params} <= head


def test_fit_reports_reid_metrics_on_validation_identities() -> None:
    res = _trainer(_recipe()).fit()
    assert {"rank1", "rank5", "rank10", "rank20", "mAP", "mINP", "indoor_rank1"} <= set(res.test_last)
    assert "val_mAP" in res.history[-1] and res.monitor == "mAP"
    data = load_data(_recipe().data)
    val_ids, train_ids = set(data.val.pids.tolist()), {int(n) for n in data.class_names}
    assert val_ids and not val_ids & set(data.test.pids.tolist()) and not val_ids & train_ids


def test_bad_input_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(KdforgeError, match=r"batch_size must be method\.ids_per_batch"):
        _trainer(_recipe(ids_per_batch=3))
    with pytest.raises(KdforgeError, match="compat must be one of"):
        _trainer(_recipe(compat="nope"))
    for name in ("sysu_mm01", "regdb", "llcm"):
        with pytest.raises(KdforgeError, match=r"set data\.root"):
            load_data(DataConfig(name=name, root=str(tmp_path / "missing")))
    with pytest.raises(KdforgeError, match="ResNet-50 weights not found"):
        load_resnet50_weights(str(tmp_path / "r50.pth"))
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(KdforgeError, match="cannot read ResNet-50 weights"):
        load_resnet50_weights(str(tmp_path / "bad.pth"))
    with pytest.raises(KdforgeError, match="two-modality ReID data set"):
        kd.Trainer(build_method({"name": "pdm"}, DataInfo(10, 1, 8)), load_data(DataConfig(name="digits")),
                   kd.Recipe.from_dict({"data": {"name": "digits"}, "method": {"name": "pdm"}}))


def test_sysu_layout_loader(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "SYSU-MM01"
    (root / "exp").mkdir(parents=True)
    (root / "exp" / "train_id.txt").write_text("1,2,3")
    (root / "exp" / "val_id.txt").write_text("4")
    (root / "exp" / "test_id.txt").write_text("5,6")
    for cam in range(1, 7):
        for pid in range(1, 7):
            d = root / f"cam{cam}" / f"{pid:04d}"
            d.mkdir(parents=True)
            for j in range(2):
                Image.fromarray(np.full((20, 10, 3), pid * 20, np.uint8)).save(d / f"{j:04d}.jpg")
    data = load_data(DataConfig(name="sysu_mm01", root=str(root), resize=16, val_fraction=0.25))
    assert data.num_classes == 3 and data.image_size == 16
    assert set(data.test.pids) == {5, 6} and set(data.test.cams[data.test.modal == 1]) == {3, 6}
    x, _ = data.test[0]
    assert x.shape == (3, 16, 8)
    assert data.val is not None and len(set(data.val.pids)) == 1


def test_resnet50_backbone_loads_local_weights_with_stride_one_layer4(tmp_path: Path) -> None:
    from torchvision.models import resnet50

    src = resnet50(weights=None)
    torch.save(src.state_dict(), tmp_path / "r50.pth")
    net = build_reid(3, image_size=(64, 32), backbone="resnet50", pretrained=str(tmp_path / "r50.pth"),
                     prototypes=2, mfgm=False, mfa=False)
    assert torch.equal(net.stem_v[0].weight, src.conv1.weight) and torch.equal(net.stem_i[0].weight, src.conv1.weight)
    assert torch.equal(net.layers[3][2].conv3.weight, src.layer4[2].conv3.weight)
    assert net.map_hw == (4, 2)  # 64×32 / 16: layer4 keeps stride 1
    assert "pretrained" not in net.kdforge_spec["kwargs"]


def test_compat_official_turns_on_every_code_quirk() -> None:
    info = DataInfo(6, 3, 32)
    paper = build_method({"name": "pdm", "model": {"width": 4}}, info)
    code = build_method({"name": "pdm", "model": {"width": 4}, "compat": "official"}, info)
    assert paper.quirks == frozenset() and code.quirks == {"pnl", "lch", "labels", "partlr"}
    assert all(m.pnl.raw for m in code.net.mfa) and not any(m.pnl.raw for m in paper.net.mfa)
    assert build_method({"name": "pdm", "compat": ["lch"]}, info).quirks == {"lch"}
    n_head = lambda m: len(m.configure_optimizers()[1].params)
    assert n_head(paper) == 4 and n_head(code) == 2  # partlr: the part BNNeck joins the backbone's group
    yv, yi = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 1])
    torch.manual_seed(0)
    out = code.net.forward_train(torch.randn(4, 3, 32, 16), torch.randn(4, 3, 32, 16))
    a, b = paper.losses(out, yv, yi), code.losses(out, yv, yi)
    assert a["ch"].item() == pytest.approx(b["ch"].item() / math.sqrt(8 / 288), rel=1e-5)  # HW = 4×2
    assert a["id"].item() == pytest.approx(b["id"].item())  # y_V == y_I: both label layouts agree


def _regdb_folder(root: Path, trials: tuple[int, ...]) -> None:
    """A RegDB-layout folder of synthetic pedestrians: 8 identities, 4 images per modality; trial t tests ids
    (2t, 2t+1) mod 8 and trains on the rest."""
    from PIL import Image

    x, pids, cams, _ = render_pedestrians(8, 1, per_cam=4, size=(32, 16))
    for sub in ("Visible", "Thermal", "idx"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    names: dict[str, list[tuple[str, int]]] = {"visible": [], "thermal": []}
    for i, (p, c) in enumerate(zip(pids, cams, strict=True)):
        if c in (1, 3):  # one visible and one thermal camera
            mod = "visible" if c == 1 else "thermal"
            rel = f"{mod.title()}/{i:04d}.png"
            Image.fromarray(x[i].transpose(1, 2, 0)).save(root / rel)
            names[mod].append((rel, int(p)))
    for t in trials:
        test_ids = {(2 * t) % 8, (2 * t + 1) % 8}
        for mod, items in names.items():
            for split, keep in (("train", False), ("test", True)):
                lines = [f"{rel} {p}" for rel, p in items if (p in test_ids) == keep]
                (root / "idx" / f"{split}_{mod}_{t}.txt").write_text("\n".join(lines) + "\n")


def test_regdb_driver_trains_each_split_and_averages_both_directions(tmp_path: Path, monkeypatch: Any) -> None:
    import json

    from kdforge.cli import main
    from kdforge.reid import regdb as driver

    _regdb_folder(tmp_path / "RegDB", (1, 2))
    recipe = kd.Recipe.from_dict({
        "name": "regdb-tiny", "seed": 0,
        "data": {"name": "regdb", "root": str(tmp_path / "RegDB"), "resize": 32, "batch_size": 8,
                 "val_fraction": 0.0, "split_seed": 1},
        "method": {"name": "pdm", "ids_per_batch": 2, "num_pos": 4, "model": {"width": 4, "prototypes": 2}},
        "optim": {"lr": 0.05}, "sched": {"name": "constant"},
        "train": {"epochs": 1, "max_steps": 1, "progress": "never", "threads": 1, "save_checkpoints": False}})
    out = tmp_path / "runs"
    summary = driver.run_trials(recipe, out, (1, 2))
    per = {t: json.loads((out / f"trial-{t}" / "results.json").read_text())["test_last"] for t in (1, 2)}
    for t in (1, 2):  # each trial trained and tested on its own split, both directions
        cfg = (out / f"trial-{t}" / "config.yaml").read_text()
        assert f"split_seed: {t}" in cfg and {"rank1", "i2v_rank1", "mAP", "i2v_mAP"} <= set(per[t])
    for key in ("rank1", "mAP", "i2v_rank1", "i2v_mINP"):
        vals = [per[1][key], per[2][key]]
        assert summary["mean"][key]["mean"] == pytest.approx(sum(vals) / 2)
        assert summary["mean"][key]["std"] == pytest.approx(abs(vals[0] - vals[1]) / 2**0.5)
    assert "thermal → visible" in (out / "regdb.md").read_text()
    # a finished trial is reused, not retrained
    monkeypatch.setattr("kdforge.run.train", lambda *a, **k: pytest.fail("retrained a finished trial"))
    assert driver.run_trials(recipe, out, (1, 2))["mean"] == summary["mean"]
    assert main(["regdb", "x.yaml", "--trials", "0-3"]) == 2
    with pytest.raises(KdforgeError, match=r"needs a recipe with data\.name: regdb"):
        driver.trial_recipe(kd.Recipe.from_dict({"data": {"name": "digits"}}), 1)
