"""The audio recipe: pre-training (optional), the four AcieLee stages as engine fits, late fusion.

Each stage is one ``kdforge.Trainer`` fit in its own folder of a :class:`~kdforge.engine.stages.StagedRun`
(``RUN/stages/NN-name/``), starting from the weights of an earlier stage (or a checkpoint). After every
stage the per-segment scores on the validation and test splits are stored; the fusion weights are
searched on the validation split and applied to the test split. On EPIC-SOUNDS the reported test split
is a labelled hold-out of the validation CSV (whole videos, ``data.report_fraction``), the fusion weights
are searched on the rest, and ``submission.zip`` is written for the recognition test CSV (no labels).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from kdforge.audio.frontend import FrontEnd
from kdforge.audio.fusion import PUBLISHED_WEIGHTS, fuse, search_weights
from kdforge.audio.metrics import all_metrics, per_class_recall
from kdforge.config import (
    DataConfig,
    MethodConfig,
    ModelSpec,
    OptimConfig,
    Recipe,
    RecipeFile,
    SchedConfig,
    Strict,
    TrainConfig,
)
from kdforge.errors import KdforgeError


class FrontEndConfig(Strict):
    """Log-mel parameters (defaults: the official EPIC-SOUNDS baseline)."""

    sample_rate: int = Field(24000, ge=1000)
    win_ms: float = Field(10.0, gt=0)
    hop_ms: float = Field(5.0, gt=0)
    n_fft: int = Field(2048, ge=16)
    n_mels: int = Field(128, ge=1)
    log_offset: float = Field(1e-6, gt=0)
    clip_s: float = Field(1.999, gt=0)
    pad_mode: Literal["edge", "constant"] = "edge"

    def build(self) -> FrontEnd:
        """The :class:`FrontEnd` these settings describe."""
        return FrontEnd(**self.model_dump())


class AudioDataConfig(Strict):
    """Which audio: the offline synthetic set, EPIC-SOUNDS from user paths, or espeak-ng spoken words."""

    kind: Literal["synthetic", "epic_sounds", "spoken_words"] = "synthetic"
    data_seed: int = Field(0, ge=0)
    most: int = Field(400, ge=1)
    least: int = Field(8, ge=1)
    val_per_class: int = Field(30, ge=1)
    test_most: int = Field(200, ge=1)
    test_least: int = Field(20, ge=1)
    pretrain_per_class: int = Field(100, ge=1)
    hdf5: str | None = None
    train_csv: str | None = None
    val_csv: str | None = None
    #: EPIC-SOUNDS recognition test CSV (no labels): scored for submission.zip only
    test_csv: str | None = None
    #: EPIC-SOUNDS: share of the validation CSV's videos held out (labelled) for every reported number; the
    #: fusion weights are searched on the other videos
    report_fraction: float = Field(0.5, gt=0, lt=1)
    redact_background: bool = False
    frontend: FrontEndConfig = Field(default_factory=FrontEndConfig)
    specaugment: bool = True
    specaug_faithful: bool = True
    views: int = Field(5, ge=1)
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    num_workers: int = Field(0, ge=0)
    cache: str | None = None


class StageConfig(Strict):
    """One stage: where it starts, what it trains on, its loss, freezing, lr and relative step decay."""

    name: str
    init: str | None = None  # "stage:<name>", a .safetensors path, or None (random init)
    data: Literal["target", "pretrain"] = "target"
    loss: Literal["ce", "ls", "ls_focal", "focal"] = "ce"
    epsilon: float = Field(0.0, ge=0, le=1)
    gamma: float = Field(0.0, ge=0)
    freeze_backbone: bool = False
    freeze_bn: bool = True
    freeze_bn_stats: bool = False
    precise_bn_batches: int = Field(0, ge=0)
    lr: float = Field(1e-3, gt=0)
    relative: list[tuple[float, float]] = Field(default_factory=lambda: [(0.0, 1.0)])
    epochs: int = Field(10, ge=1)
    fuse: bool = True


class FusionConfig(Strict):
    """Late fusion: the published weights (for the 4 fused stages), the search grid step and metric."""

    published: list[Annotated[float, Field(ge=0, allow_inf_nan=False)]] = Field(
        default_factory=lambda: list(PUBLISHED_WEIGHTS), min_length=1, max_length=64)
    step: float = Field(0.05, gt=0, le=1)
    metric: Literal["top1", "mca"] = "top1"


def _default_optim() -> OptimConfig:
    return OptimConfig(name="sgd", lr=1e-3, momentum=0.9, weight_decay=1e-4, no_decay=["norm"])


class AudioRecipe(RecipeFile):
    """A whole audio run (``kdforge audio RECIPE``)."""

    resume_free: ClassVar[dict[str, tuple[str, ...]]] = {
        "train": ("device", "progress", "threads", "log_every"), "data": ("num_workers", "cache")}

    name: str = "audio"
    seed: int = Field(0, ge=0, lt=2**31)
    data: AudioDataConfig = Field(default_factory=AudioDataConfig)
    model: ModelSpec = Field(default_factory=lambda: ModelSpec(model="audio_slowfast_lite"))
    stages: list[StageConfig]
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    optim: OptimConfig = Field(default_factory=_default_optim)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(progress="never"))

    @model_validator(mode="after")
    def _check(self) -> AudioRecipe:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique (got {names})")
        for i, s in enumerate(self.stages):
            if s.init and s.init.startswith("stage:") and s.init[6:] not in names[:i]:
                raise ValueError(f"stage {s.name!r} starts from {s.init!r}, which is not an earlier stage "
                                 f"(earlier: {names[:i] or 'none'})")
        return self


# -- data ------------------------------------------------------------------------------------------------


@dataclass
class AudioSplits:
    """Engine-ready data sets of a run: target train/val/test, optional pre-training train/val."""

    train: Any
    val: Any
    test: Any
    num_classes: int
    class_names: list[str]
    pretrain: Any = None
    pretrain_val: Any = None
    pretrain_classes: int = 0
    submit: Any = None  # EPIC-SOUNDS: the unlabelled recognition test split, scored for the submission
    annotation_ids: list[str] = field(default_factory=list)


def build_data(c: AudioDataConfig) -> AudioSplits:
    """The data sets a recipe names (synthetic spectrograms are computed once and cached if ``cache`` is set)."""
    from kdforge.audio.data import EpicSounds, SpectrogramSet
    from kdforge.audio.specaug import SpecAugment

    fe = c.frontend.build()
    aug = SpecAugment(faithful=c.specaug_faithful) if c.specaugment else None
    if c.kind == "epic_sounds":
        missing = [k for k in ("hdf5", "train_csv", "val_csv") if getattr(c, k) is None]
        if missing:
            raise KdforgeError(f"EPIC-SOUNDS needs data.{missing[0]} (the paths of EPIC_audio.hdf5 and the train/val "
                               "annotation CSVs; the data is not downloaded by kdforge)")
        train = EpicSounds(c.hdf5, c.train_csv, fe, train=True, specaug=aug, split="train")  # type: ignore[arg-type]
        val = EpicSounds(c.hdf5, c.val_csv, fe, views=c.views, split="val")  # type: ignore[arg-type]
        test = EpicSounds(c.hdf5, c.val_csv, fe, views=c.views, split="test")  # type: ignore[arg-type]
        held = holdout_videos([r.video_id for r in val.records], c.report_fraction, c.data_seed)
        val.records = [r for r in val.records if r.video_id not in held]
        test.records = [r for r in test.records if r.video_id in held]
        out = AudioSplits(train, val, test, 44, train.class_names())
        if c.test_csv is not None:
            out.submit = EpicSounds(c.hdf5, c.test_csv, fe, views=c.views, split="submit")
            out.annotation_ids = [r.annotation_id for r in out.submit.records]
        return out
    specs = _cached_specs(c, fe)
    n = fe.num_frames

    def ds(key: str, train: bool) -> SpectrogramSet:
        s, y = specs[key]
        return SpectrogramSet(s, y, n, train, c.views, aug if train else None, fe.pad_mode, split=key)

    out = AudioSplits(ds("train", True), ds("val", False), ds("test", False), specs["num_classes"],
                      specs["class_names"])
    if "pretrain" in specs:
        out.pretrain, out.pretrain_val = ds("pretrain", True), ds("pretrain_val", False)
        out.pretrain_classes = specs["pretrain_classes"]
    return out


def holdout_videos(videos: list[str], fraction: float, seed: int) -> set[str]:
    """A seeded share of the distinct videos (at least one, never all), held out as the labelled report split."""
    distinct = sorted(set(videos))
    if len(distinct) < 2:
        raise KdforgeError(f"the validation CSV has {len(distinct)} video(s): holding out a labelled report split "
                           "(whole videos) beside the fusion-search split needs at least 2")
    k = min(len(distinct) - 1, max(1, round(fraction * len(distinct))))
    order = np.random.default_rng(seed).permutation(len(distinct))
    return {distinct[i] for i in order[:k]}


def _cached_specs(c: AudioDataConfig, fe: FrontEnd) -> dict[str, Any]:
    import hashlib

    from kdforge.audio.data import precompute

    key = hashlib.sha256(json.dumps({k: v for k, v in c.model_dump(mode="json").items() if k in (
        "kind", "data_seed", "most", "least", "val_per_class", "test_most", "test_least", "pretrain_per_class",
        "frontend")} | {"logmel": "float64-stft"},  # the front end's numerics: a change makes a new cache
        sort_keys=True).encode()).hexdigest()[:12]
    path = Path(c.cache) / f"audio-{c.kind}-{key}.pt" if c.cache else None
    if path is not None and path.is_file():
        return torch.load(path, weights_only=True)
    out: dict[str, Any] = {}
    if c.kind == "synthetic":
        from kdforge.audio.synthetic import PRETRAIN, TARGET, kitchen_sounds

        sets = kitchen_sounds(c.data_seed, fe.sample_rate, c.most, c.least, c.val_per_class, c.test_most,
                              c.test_least, c.pretrain_per_class)
        for k, clips in sets.items():
            out[k] = (precompute([cl.wave for cl in clips], fe), [cl.label for cl in clips])
        out.update(num_classes=len(TARGET), class_names=list(TARGET), pretrain_classes=len(PRETRAIN))
    else:  # spoken words: split by held-out voices
        from kdforge.audio.data import VOICES, WORDS, spoken_words

        clips = spoken_words(sample_rate=fe.sample_rate, seed=c.data_seed)
        parts = {"train": VOICES[:5], "val": VOICES[5:6], "test": VOICES[6:]}
        for k, voices in parts.items():
            sel = [(a, w) for a, w, v in clips if v in voices]
            out[k] = (precompute([a for a, _ in sel], fe), [w for _, w in sel])
        out.update(num_classes=len(WORDS), class_names=list(WORDS))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, path)
    return out


# -- running -----------------------------------------------------------------------------------------------


@dataclass
class AudioResult:
    """Per-stage test (and validation) metrics, fusion weights and fused metrics, timings."""

    stages: dict[str, dict[str, Any]]
    fusion: dict[str, Any]
    class_names: list[str]
    time_s: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict."""
        return {"stages": self.stages, "fusion": self.fusion, "class_names": self.class_names, "time_s": self.time_s}


def load_backbone(model: nn.Module, state: dict[str, torch.Tensor] | str | Path) -> list[str]:
    """Load weights whose names and shapes fit (a new classifier stays as built); return the keys skipped.

    ``state``: a state dict, a .safetensors file, or an official Auditory SlowFast ``.pyth`` checkpoint
    (its names converted by :func:`~kdforge.audio.models.convert_official`).
    """
    if not isinstance(state, dict):
        from safetensors.torch import load_file

        p = Path(state)
        if not p.is_file():
            raise KdforgeError(f"stage init checkpoint not found: {str(p)!r}")
        if p.suffix == ".pyth":
            from kdforge.audio.models import load_official

            state = load_official(p)
        else:
            state = load_file(str(p))
    own = model.state_dict()
    fit = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not fit:
        raise KdforgeError("the init checkpoint shares no tensor with this model: is it another architecture?")
    model.load_state_dict(fit, strict=False)
    return sorted(set(own) - set(fit))


def stage_recipe(r: AudioRecipe, s: StageConfig, seed: int) -> Recipe:
    """The engine recipe of one stage (its lr, relative step decay and epochs)."""
    return Recipe(name=f"{r.name}-{s.name}", seed=seed,
                  data=DataConfig(name="audio", batch_size=r.data.batch_size, eval_batch_size=r.data.eval_batch_size,
                                  num_workers=r.data.num_workers, val_fraction=0.0, augment=False),
                  method=MethodConfig(name="audio_stage"), optim=r.optim.model_copy(update={"lr": s.lr}),
                  sched=SchedConfig(name="relative", relative=[tuple(x) for x in s.relative]),
                  train=r.train.model_copy(update={"epochs": s.epochs, "eval_every": s.epochs}))


def run(recipe: AudioRecipe, run_dir: str | Path | None = None, resume: bool = True,
        splits: AudioSplits | None = None, overwrite: bool = False, resume_cmd: str | None = None) -> AudioResult:
    """Train every stage (resuming finished ones from ``run_dir``), then fuse; returns the metrics.

    ``run_dir`` is a run folder of kind ``audio`` (:func:`kdforge.engine.run_dir.open_run`): an audio run folder
    resumes; any other existing folder is refused unless ``overwrite`` (a kdforge folder only).
    """
    if run_dir is None:
        return _run(recipe, None, resume, splits)
    from kdforge.engine.run_dir import open_run

    with open_run(run_dir, "audio", resume="auto" if resume else False, overwrite=overwrite, legacy=_legacy_run,
                  resume_cmd=resume_cmd or f"kdforge audio RECIPE -r {run_dir}"):
        return _run(recipe, run_dir, resume, splits)


def _legacy_run(path: Path) -> bool:
    """An audio run folder written before run folders recorded their kind."""
    cfg = path / "config.yaml"
    return (path / "stages.json").is_file() and cfg.is_file() and "\nstages:" in "\n" + cfg.read_text(errors="replace")


def _run(recipe: AudioRecipe, run_dir: str | Path | None, resume: bool, splits: AudioSplits | None) -> AudioResult:
    from kdforge.audio.method import AudioStage, view_scores
    from kdforge.data import DataBundle, make_loader
    from kdforge.engine.checkpoint import atomic_write_text, save_weights
    from kdforge.engine.stages import StagedRun
    from kdforge.engine.trainer import Trainer
    from kdforge.method import DataInfo, build_model
    from kdforge.run import with_report

    t_start = time.perf_counter()
    data = splits or build_data(recipe.data)
    t_data = time.perf_counter() - t_start
    root = Path(run_dir) if run_dir is not None else None
    staged = StagedRun(root, recipe.identity(), resume=resume)
    if root is not None:
        atomic_write_text(root / "config.yaml", recipe.to_yaml())
    weights: dict[str, dict[str, torch.Tensor]] = {}
    scores: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    results: dict[str, dict[str, Any]] = {}
    times: dict[str, float] = {"data": t_data}
    redact = [13] if recipe.data.redact_background else []
    for i, s in enumerate(recipe.stages):
        pre = s.data == "pretrain"
        if pre and data.pretrain is None:
            raise KdforgeError(f"stage {s.name!r} trains on the pre-training set, which data.kind "
                               f"{recipe.data.kind!r} does not have (valid for: synthetic)")
        classes = data.pretrain_classes if pre else data.num_classes
        info = DataInfo(classes, 1, 0)
        seed = recipe.seed * 1000 + i
        torch.manual_seed(seed)
        model = build_model(ModelSpec(model=recipe.model.model, kwargs=recipe.model.kwargs), info)
        if s.init is not None:
            load_backbone(model, weights[s.init[6:]] if s.init.startswith("stage:") else s.init)
        d = staged.dir(s.name)
        done = staged.done(s.name)
        if done is not None and d is not None:
            from safetensors.torch import load_file

            weights[s.name] = load_file(str(d / "model.safetensors"))
            z = np.load(d / "scores.npz")
            scores[s.name] = {k: (z[f"{k}_s"], z[f"{k}_y"]) for k in ("val", "test", "submit") if f"{k}_s" in z}
            results[s.name], times[s.name] = done["metrics"], done["time_s"]
            continue
        method = AudioStage(model, s.loss, s.epsilon, s.gamma, s.freeze_backbone, s.freeze_bn and s.init is not None,
                            s.freeze_bn_stats, s.precise_bn_batches, redact)
        train, val, test = (data.pretrain, data.pretrain_val, data.pretrain_val) if pre else (
            data.train, data.val, data.test)
        bundle = DataBundle(train=train, val=val, test=test, num_classes=classes, in_chans=1, image_size=0,
                            class_names=[])
        t0 = time.perf_counter()
        trainer = Trainer(method, bundle, stage_recipe(recipe, s, seed), run_dir=d,
                          resume=d is not None and d.is_dir(), callbacks=with_report())
        fit = trainer.fit()
        del trainer
        got = {}
        extra = (("submit", data.submit),) if data.submit is not None and not pre else ()
        for key, dset in (("val", val), ("test", test), *extra):
            split = getattr(dset, "split", "")  # the engine's final evaluation already scored it
            got[key] = method.scores[split] if split in method.scores else view_scores(
                method.model, make_loader(dset, recipe.data.eval_batch_size, False))
        scores[s.name] = got
        weights[s.name] = {k: v.detach().clone() for k, v in method.model.state_dict().items()}
        times[s.name] = time.perf_counter() - t0
        metrics = {k: _metrics(*got[k], redact) for k in ("val", "test")}
        metrics["epochs"] = fit.epochs
        metrics["trainable_params"] = sum(p.numel() for p in method.model.parameters() if p.requires_grad)
        results[s.name] = metrics
        if d is not None:
            save_weights(method.model, d / "model.safetensors", {"stage": s.name})
            np.savez(d / "scores.npz", **{f"{k}_{x}": v for k, (sv, yv) in got.items()
                                            for x, v in (("s", sv), ("y", yv))})
        staged.finish(s.name, {"metrics": metrics, "time_s": times[s.name]})
    fusion = fuse_stages(recipe, scores, redact)
    res = AudioResult(results, fusion, data.class_names, times)
    if root is not None:
        atomic_write_text(root / "result.json", json.dumps(res.to_json(), indent=1))
        if data.annotation_ids and fusion:  # EPIC-SOUNDS: the challenge file of the searched fusion
            from kdforge.audio.data import write_submission

            fused = fuse([scores[n]["submit"][0] for n in fusion["models"]], fusion["searched"]["weights"])
            write_submission(root / "submission.zip", fused, data.annotation_ids)
    return res


def _metrics(s: np.ndarray, y: np.ndarray, redact: list[int]) -> dict[str, Any]:
    keep = y >= 0
    if not keep.any():
        return {}
    m: dict[str, Any] = all_metrics(s[keep], y[keep], redact)
    m["recall"] = {str(k): v for k, v in per_class_recall(s[keep], y[keep]).items()}
    return m


def fuse_stages(recipe: AudioRecipe, scores: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]],
                redact: list[int]) -> dict[str, Any]:
    """Uniform, published and validation-searched fusion of the fused stages' scores, scored on the test split."""
    names = [s.name for s in recipe.stages if s.fuse and s.data == "target"]
    if len(names) < 2:
        return {}
    val = [scores[n]["val"][0] for n in names]
    val_y = scores[names[0]]["val"][1]
    test = [scores[n]["test"][0] for n in names]
    test_y = scores[names[0]]["test"][1]
    searched, val_value = search_weights(val, val_y, recipe.fusion.step, recipe.fusion.metric)
    out: dict[str, Any] = {"models": names, "searched_weights": list(searched), "search_val": val_value}
    candidates = {"uniform": [1.0 / len(names)] * len(names), "searched": list(searched)}
    if len(recipe.fusion.published) == len(names):
        candidates["published"] = list(recipe.fusion.published)
    for label, w in candidates.items():
        out[label] = {"weights": w, "val": _metrics(fuse(val, w), val_y, redact),
                      "test": _metrics(fuse(test, w), test_y, redact)}
    return out


def predict_file(path: str | Path, checkpoint: str | Path, model: ModelSpec, num_classes: int,
                 fe: FrontEnd | None = None, class_names: list[str] | None = None, views: int = 5,
                 top: int = 5) -> list[tuple[str, float]]:
    """Classify a user's audio file (any sample rate, resampled in torch): the top classes and their scores."""
    from kdforge.audio.frontend import crop_starts, read_audio, resample, segment_logmel
    from kdforge.method import DataInfo, build_model

    fe = fe or FrontEnd()
    wave, sr = read_audio(path)
    if not np.isfinite(np.asarray(wave)).all():
        raise KdforgeError(f"audio file {str(path)!r} holds NaN or infinite samples; give a clip of finite samples")
    wave = resample(wave, sr, fe.sample_rate)
    from kdforge.engine.checkpoint import load_weights

    net = build_model(model, DataInfo(num_classes, 1, 0))
    load_weights(net, checkpoint)
    net.eval()
    with torch.no_grad():
        x = torch.stack([segment_logmel(wave, fe, s) for s in crop_starts(len(wave), fe.clip_samples, views)])
        p = net(x).softmax(-1).mean(0)
    names = class_names or [str(i) for i in range(num_classes)]
    order = p.argsort(descending=True)[:top]
    return [(names[int(i)], float(p[i])) for i in order]


def check_run_dir(run_dir: Path | None, overwrite: bool = False) -> None:
    """Refuse, before any work, a run folder that :func:`run` would refuse (a file, another kind, a user's)."""
    if run_dir is None:
        return
    from kdforge.engine.run_dir import check_run_folder

    check_run_folder(run_dir, "audio", overwrite=overwrite, resume="auto", legacy=_legacy_run)


def predict_run(run_dir: str | Path, audio_file: str | Path, stage: str | None = None,
                top: int = 5) -> list[tuple[str, float]]:
    """Classify an audio file with one stage (default: the last fused one) of a finished audio run folder."""
    root = Path(run_dir)
    cfg, index, result = root / "config.yaml", root / "stages.json", root / "result.json"
    if not (cfg.is_file() and index.is_file() and result.is_file()):
        raise KdforgeError(f"{str(root)!r} is not a finished audio run folder (it needs config.yaml, stages.json "
                           "and result.json; run 'kdforge audio RECIPE -r FOLDER' first)")
    recipe = AudioRecipe.from_yaml(cfg)
    target = [s.name for s in recipe.stages if s.data == "target"]
    fused = [s.name for s in recipe.stages if s.data == "target" and s.fuse] or target
    name = stage or fused[-1]
    if name not in target:
        raise KdforgeError(f"stage {name!r} is not a stage of {str(root)!r} trained on the target classes "
                           f"(valid: {', '.join(target)})")
    order = json.loads(index.read_text()).get("order", [])
    if name not in order:
        raise KdforgeError(f"stage {name!r} of {str(root)!r} has not run yet")
    ckpt = root / "stages" / f"{order.index(name):02d}-{name}" / "model.safetensors"
    names = json.loads(result.read_text())["class_names"]
    return predict_file(audio_file, ckpt, ModelSpec(model=recipe.model.model, kwargs=recipe.model.kwargs),
                        len(names), recipe.data.frontend.build(), names, recipe.data.views, top)
