"""Teacher-output cache: replayed views, cached = live KD, stale caches refused, resumable and DDP-sharded builds."""

from __future__ import annotations

import copy
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import kdforge as kd
from kdforge.cache import StaleCache, TeacherCacheConfig, build_from_recipe, compress_topk, expand_topk
from kdforge.cache.store import chunk_path
from kdforge.cli import main as cli_main
from kdforge.data.replay import NotReplayable, ReplaySpec, ReplayViews, replay_views, view_of
from kdforge.errors import KdforgeError
from kdforge.method import DataInfo, build_method
from tests.test_ddp import NEEDS_ACCELERATE

TERMS = [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9, "T": 4}]


@pytest.fixture(scope="module")
def teacher_ck(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised cnn_small (width 4) teacher's weights (its identity is all a cache needs)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    kd.save_weights(kd.create_model("cnn_small", 10, 1, width=4), path)
    return path


def recipe(teacher: Path, cache_dir: Path, **over: Any) -> dict[str, Any]:
    """KD on 200 Fashion-MNIST images with 3 recorded crop + flip views, the teacher's logits cached (fp32)."""
    r = {"name": "tc", "seed": 0,
         "data": {"name": "fashion_mnist_subset", "batch_size": 50, "val_fraction": 0.1, "limit_train": 200,
                  "augment": True, "views": 3},
         "method": {"name": "distill", "teacher": {"model": "cnn_small", "kwargs": {"width": 4},
                                                   "checkpoint": str(teacher)},
                    "student": {"model": "cnn_tiny"}, "terms": TERMS,
                    "cache": {"name": "t", "dir": str(cache_dir), "dtype": "fp32", "chunk": 64, "batch_size": 64}},
         "optim": {"lr": 0.05}, "train": {"epochs": 1, "progress": "silent", "threads": 1}}
    for k, v in over.items():
        section, key = k.split(".", 1)
        r[section][key] = v
    return r


def views_of(n: int = 12, views: int = 4) -> ReplayViews:
    g = torch.Generator().manual_seed(0)
    base = kd.data.TensorImages(torch.randint(0, 256, (n, 1, 10, 10), dtype=torch.uint8, generator=g),
                                torch.arange(n) % 10, (0.5,), (0.25,), augment=True, crop_pad=2)
    return replay_views(base, views, view_seed=7)


def test_replayed_views_equal_the_live_augmentation_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    rv = views_of()
    table = rv.params_table()
    live = rv.base  # the augmenting TensorImages itself: the path a run without a cache takes
    assert live.augment
    seen = set()
    for code in range(len(rv) * rv.views):
        x, _ = rv[code]
        i, v = rv.decode(code)
        dy, dx, flip = table[i, v].tolist()
        calls: list[str] = []
        with monkeypatch.context() as mp:  # the live path's own random draws, forced to the recorded values
            mp.setattr(torch, "randint", lambda lo, hi, size, c=calls, d=(dy, dx): c.append("crop") or torch.tensor(d))
            mp.setattr(torch, "rand", lambda *a, c=calls, f=flip: c.append("flip") or torch.tensor(0.25 if f else 0.75))
            want, _ = live[int(rv.indices[i])]
        assert calls == ["crop", "flip"] and torch.equal(x, want)
        assert torch.equal(x, views_of()[code][0])  # a fresh set (another process) draws the same parameters
        seen.add((dy, dx, flip))
    assert len(seen) > 10 and {p[2] for p in seen} == {0, 1}  # crops and flips really vary
    # a crop by (dy, dx) of the zero-padded image, then a flip: checked by hand on one view
    dy, dx, flip = table[3, 1].tolist()
    ref = torch.nn.functional.pad(rv.base.x[3], (2, 2, 2, 2))[:, dy:dy + 10, dx:dx + 10]
    assert torch.equal(rv[1 * len(rv) + 3][0], ref.flip(-1) if flip else ref)
    # every view once per K epochs, in a per-sample order
    for i in range(5):
        assert sorted(view_of(0, e, i, 4) for e in range(4, 8)) == [0, 1, 2, 3]
    assert ReplaySpec(2, True, False).params(0, 5, 3) == (2, 2, 0)


def test_topk_rule_keeps_the_top_probabilities_and_the_rest_mass() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.5, -1.0, 2.0, 0.0]])
    v, i, rest = compress_topk(logits, 2)
    full = expand_topk(v, i, rest, 6)
    p, q = logits.softmax(-1), full.softmax(-1)
    assert torch.allclose(q[0, [0, 4]], p[0, [0, 4]], atol=1e-6)  # exact top-k at T = 1
    rest_p = p[0, [1, 2, 3, 5]]
    assert torch.allclose(q[0, [1, 2, 3, 5]], rest_p.sum().expand(4) / 4, atol=1e-6)  # rest spread evenly
    assert math.isclose(float(rest), math.log(sum(math.exp(z) for z in (1.0, 0.5, -1.0, 0.0))), rel_tol=1e-6)


def _method_and_views(r: dict[str, Any]) -> tuple[kd.Distill, Any]:
    rec = kd.Recipe.from_dict(r)
    data = kd.load_data(rec.data)
    m = build_method(rec.method.model_dump(), DataInfo(data.num_classes, data.in_chans, data.image_size))
    return m, m.wrap_train_data(data.train)  # type: ignore[return-value]


def _grads(m: kd.Distill, batch: Any) -> tuple[float, list[torch.Tensor]]:
    m.student.zero_grad()
    out = m.training_step(batch, 0)
    out["loss"].backward()
    return float(out["loss"].detach()), [p.grad.clone() for p in m.student.parameters()]


def test_cached_kd_step_equals_the_live_step(teacher_ck: Path, tmp_path: Path, one_thread: None) -> None:
    from torch.utils.data._utils.collate import default_collate

    r = recipe(teacher_ck, tmp_path / "c")
    build_from_recipe(kd.Recipe.from_dict(r))
    cached, views = _method_and_views(r)
    live, _ = _method_and_views({**r, "method": {k: v for k, v in r["method"].items() if k != "cache"}})
    live.student.load_state_dict(cached.student.state_dict())
    batch = default_collate([views[c] for c in (5, 200 + 17, 400 + 9, 33, 200 + 150)])  # several views
    assert batch["view"].tolist() == [0, 1, 2, 0, 1]
    with torch.no_grad():
        assert torch.allclose(cached._cache.logits(batch["index"], batch["view"]), live.teacher(batch["x"]),
                              atol=1e-5)
    la, ga = _grads(cached, batch)
    lb, gb = _grads(live, (batch["x"], batch["y"]))
    assert abs(la - lb) < 1e-5
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ga, gb, strict=True))
    # fp16 storage: the same step within fp16 rounding of the logits
    build_from_recipe(kd.Recipe.from_dict(recipe(teacher_ck, tmp_path / "h", **{"method.cache": {
        "name": "t", "dir": str(tmp_path / "h"), "dtype": "fp16"}})))
    half, _ = _method_and_views(recipe(teacher_ck, tmp_path / "h", **{"method.cache": {
        "name": "t", "dir": str(tmp_path / "h"), "dtype": "fp16"}}))
    half.student.load_state_dict(cached.student.state_dict())
    assert abs(_grads(half, batch)[0] - lb) < 1e-3


def test_a_cached_run_trains_through_the_engine(teacher_ck: Path, tmp_path: Path, one_thread: None) -> None:
    r = recipe(teacher_ck, tmp_path / "c")
    out = cli_main(["cache", "build", _yaml(tmp_path, r)])
    assert out == 0
    res = kd.train(kd.Recipe.from_dict(r), tmp_path / "run")
    assert res.steps == 4 and math.isfinite(res.history[-1]["train_loss"])


def _yaml(tmp_path: Path, r: dict[str, Any], name: str = "r.yaml") -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(r))
    return str(p)


def test_changed_teacher_preprocessing_or_data_is_refused(teacher_ck: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    r = recipe(teacher_ck, tmp_path / "c")
    build_from_recipe(kd.Recipe.from_dict(r))
    other = tmp_path / "other.safetensors"
    shutil.copy(teacher_ck, other)
    from safetensors.torch import load_file, save_file

    w = load_file(str(other))
    w["fc.bias"] = w["fc.bias"] + 1e-3  # one changed number
    save_file(w, str(other))
    changed_teacher = recipe(other, tmp_path / "c")
    with pytest.raises(StaleCache, match=r"teacher changed \(weights_sha256"):
        _method_and_views(changed_teacher)
    with pytest.raises(StaleCache, match=r"training data changed"):
        _method_and_views(recipe(teacher_ck, tmp_path / "c", **{"data.limit_train": 199}))
    with pytest.raises(StaleCache, match=r"preprocessing / augmentation changed \(view_seed"):
        _method_and_views(recipe(teacher_ck, tmp_path / "c", **{"data.view_seed": 1}))
    # the build refuses too, in one line, exit 2, and leaves the cache as it was
    before = chunk_path(tmp_path / "c" / "t", 0).read_bytes()
    assert cli_main(["cache", "build", _yaml(tmp_path, changed_teacher)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "teacher changed" in err and "--overwrite" in err
    assert chunk_path(tmp_path / "c" / "t", 0).read_bytes() == before
    assert cli_main(["cache", "build", _yaml(tmp_path, changed_teacher), "--overwrite"]) == 0
    _method_and_views(changed_teacher)


def test_refusals_and_fallback(teacher_ck: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = {"name": "t", "dir": str(tmp_path), "store": "topk", "k": 3}
    for loss in ("dkd", "dist"):
        r = recipe(teacher_ck, tmp_path, **{"method.cache": cache})
        r["method"]["terms"] = [{"loss": loss}]
        with pytest.raises(KdforgeError, match=f"loss '{loss}' needs every teacher logit.*top-3 of 10"):
            _method_and_views(r)
    live_aug = recipe(teacher_ck, tmp_path, **{"data.views": None})
    with pytest.raises(KdforgeError, match=r"augmented live.*data\.views: K"):
        _method_and_views(live_aug)
    live_aug["method"]["cache"]["fallback"] = "live"
    m, _ = _method_and_views(live_aug)
    assert m._cache is None and "live teacher runs instead" in capsys.readouterr().err
    from torchvision import transforms as T

    class Folder(torch.utils.data.Dataset):
        transform = T.Compose([T.RandomResizedCrop(8), T.ColorJitter(0.4)])

        def __len__(self) -> int:
            return 1

    with pytest.raises(NotReplayable, match="RandomResizedCrop, ColorJitter draws parameters it does not record"):
        replay_views(Folder())
    assert cli_main(["train", _yaml(tmp_path, recipe(teacher_ck, tmp_path / "none")), "-o", str(tmp_path / "run")]) == 2
    assert "no teacher cache in" in capsys.readouterr().err


def test_a_killed_build_resumes(teacher_ck: Path, tmp_path: Path) -> None:
    r = kd.Recipe.from_dict(recipe(teacher_ck, tmp_path / "a"))
    done: list[int] = []

    def stop_after_two(i: int) -> None:
        done.append(i)
        if len(done) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_from_recipe(r, on_chunk=stop_after_two)
    with pytest.raises(KdforgeError, match="incomplete"):
        _method_and_views(r.model_dump())
    res = build_from_recipe(r)
    assert (res.chunks_built, res.chunks_total) == (2, 4)  # 200 samples in chunks of 64
    clean = build_from_recipe(kd.Recipe.from_dict(recipe(teacher_ck, tmp_path / "b")))
    for i in range(clean.chunks_total):
        assert chunk_path(tmp_path / "a" / "t", i).read_bytes() == chunk_path(tmp_path / "b" / "t", i).read_bytes()
    _method_and_views(r.model_dump())


def test_a_sigkilled_build_process_resumes(teacher_ck: Path, tmp_path: Path) -> None:
    cache = {"name": "t", "dir": str(tmp_path / "a"), "chunk": 8, "batch_size": 64}
    r = recipe(teacher_ck, tmp_path, **{"data.limit_train": 2000, "method.cache": cache, "train.progress": "always"})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "kdforge", "cache", "build", _yaml(tmp_path, r)], env=env,
                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert p.stderr is not None
    for line in p.stderr:
        if "chunk 3/250" in line:
            p.kill()  # SIGKILL: no clean-up runs
            break
    p.wait(timeout=60)
    done = len(list((tmp_path / "a" / "t" / "chunks").glob("*.sha256")))
    assert 3 <= done < 250, done
    res = build_from_recipe(kd.Recipe.from_dict(r))
    assert res.chunks_built == 250 - done
    assert not list((tmp_path / "a" / "t" / "chunks").glob(".*"))  # no half-written chunk is left
    m, _ = _method_and_views(r)
    assert m._cache.t["params"].shape == (2000, 3, 3)


def test_cache_list_size_clear(teacher_ck: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_from_recipe(kd.Recipe.from_dict(recipe(teacher_ck, tmp_path)))
    (tmp_path / "mine").mkdir()  # not a cache: never touched
    assert cli_main(["cache", "list", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "t " in out and "complete" in out and "200 samples x 3 views" in out and "full fp32 of 10 classes" in out
    assert cli_main(["cache", "size", "t", "--dir", str(tmp_path)]) == 0
    assert "KB" in capsys.readouterr().out
    assert cli_main(["cache", "clear", "mine", "--dir", str(tmp_path)]) == 2
    assert cli_main(["cache", "clear", "--all", "--dir", str(tmp_path)]) == 0
    assert not (tmp_path / "t").exists() and (tmp_path / "mine").is_dir()


def test_bucket_kd_is_the_kl_of_the_bucketed_distributions() -> None:
    from kdforge.llm.cache import bucket_kd

    t = torch.tensor([[2.0, 0.5, -1.0, 1.0, 0.0]])
    s = torch.tensor([[1.0, 1.0, 0.0, -0.5, 0.3]])
    v, ids, rest = compress_topk(t, 2)  # tokens 0 and 3
    t_lp = torch.cat([v, rest[:, None]], -1).log_softmax(-1)
    pt, ps = t.softmax(-1)[0], s.softmax(-1)[0]
    bt = [pt[0], pt[3], pt[1] + pt[2] + pt[4]]
    bs = [ps[0], ps[3], ps[1] + ps[2] + ps[4]]
    by_hand = sum(float(a) * math.log(float(a) / float(b)) for a, b in zip(bt, bs, strict=True))
    assert float(bucket_kd(s, ids.long(), t_lp)) == pytest.approx(by_hand, rel=1e-5)


def test_lm_topk_cache_heals_like_the_live_teacher(tmp_path: Path, one_thread: None) -> None:
    from kdforge.llm import heal_kd, tiny_llama
    from kdforge.llm.cache import LMTopKCache

    teacher, student = tiny_llama(3, 32, vocab=64), tiny_llama(2, 32, vocab=64, seed=1)
    blocks = torch.randint(0, 64, (12, 16), generator=torch.Generator().manual_seed(0))
    exact = LMTopKCache.build(teacher, blocks, tmp_path / "all", k=64, dtype="fp32", chunk=5)
    live = heal_kd(copy.deepcopy(student), teacher, blocks, steps=3, lr=1e-3)
    for tail in ("bucket", "uniform"):  # k = V: the cache is the teacher
        cached = heal_kd(copy.deepcopy(student), teacher, blocks, steps=3, lr=1e-3, teacher_cache=exact,
                         cache_tail=tail)
        assert cached == pytest.approx(live, rel=1e-5)
    top8 = LMTopKCache.build(teacher, blocks, tmp_path / "k8", k=8)
    assert top8.bytes_per_token == 8 * 6 + 4
    approx = heal_kd(copy.deepcopy(student), teacher, blocks, steps=3, lr=1e-3, teacher_cache=top8)
    assert all(math.isfinite(v) for v in approx) and approx != live
    with pytest.raises(KdforgeError, match="other token rows"):
        heal_kd(copy.deepcopy(student), teacher, blocks[:6], steps=1, teacher_cache=top8)


@NEEDS_ACCELERATE
def test_two_gloo_processes_build_the_same_cache_as_one(teacher_ck: Path, tmp_path: Path) -> None:
    from tests.test_ddp import _free_port

    r = _yaml(tmp_path, recipe(teacher_ck, tmp_path / "two"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = str(Path(sys.executable).parent / "accelerate")
    proc = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
                    "-m", "kdforge", "cache", "build", r], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    build_from_recipe(kd.Recipe.from_dict(recipe(teacher_ck, tmp_path / "one")))
    two = sorted((tmp_path / "two" / "t" / "chunks").iterdir())
    one = sorted((tmp_path / "one" / "t" / "chunks").iterdir())
    assert [p.name for p in two] == [p.name for p in one] and len(one) == 8
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(two, one, strict=True))
    meta = yaml.safe_load((tmp_path / "two" / "t" / "meta.json").read_text())
    assert meta["complete"] and meta["build"]["processes"] == 2


@pytest.mark.slow
@NEEDS_ACCELERATE
def test_a_launched_build_of_a_cache_in_use_stops_every_rank_in_one_line(teacher_ck: Path, tmp_path: Path) -> None:
    """Rank 0 locks for all ranks: when the lock is held elsewhere every rank stops (none waits at a barrier)."""
    import fcntl

    from tests.test_ddp import _free_port

    r = _yaml(tmp_path, recipe(teacher_ck, tmp_path / "c"))
    build_from_recipe(kd.Recipe.from_dict(recipe(teacher_ck, tmp_path / "c")))
    before = {p.name: p.read_bytes() for p in (tmp_path / "c" / "t" / "chunks").iterdir()}
    fd = os.open(tmp_path / "c" / "t" / ".lock", os.O_RDWR)  # another build holds the cache
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        launcher = str(Path(sys.executable).parent / "accelerate")
        proc = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                               str(_free_port()), "-m", "kdforge", "cache", "build", r, "--overwrite"],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    finally:
        os.close(fd)
    ours = [x for x in proc.stderr.splitlines() if x.startswith("error:")]  # the launcher adds its own report
    assert proc.returncode != 0 and ours and all("in use by another kdforge run" in x for x in ours), proc.stderr
    assert "kdforge/cache" not in proc.stderr, proc.stderr  # no traceback from a rank
    assert {p.name: p.read_bytes() for p in (tmp_path / "c" / "t" / "chunks").iterdir()} == before


def test_teacher_cache_config_resolves_storage() -> None:
    c = TeacherCacheConfig(name="x")
    assert c.resolved_store(10) == "full" and c.resolved_store(49152) == "topk"
    assert TeacherCacheConfig(name="x", store="topk", k=20).resolved_store(10) == "full"
    with pytest.raises(ValueError):
        TeacherCacheConfig(name="../up")
