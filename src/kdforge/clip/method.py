"""Methods for the engine: ``clip`` (the CLIP task loss alone, e.g. for the teacher) and ``clip_kd``."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.utils.data import Dataset

from kdforge.clip.data import find_attr
from kdforge.clip.losses import TERMS, ClipKDLoss, clip_loss, clip_quirks
from kdforge.clip.model import build_clip
from kdforge.config import Strict, validate
from kdforge.engine.gather import gather
from kdforge.errors import KdforgeError
from kdforge.losses.base import deprecated_key
from kdforge.method import DataInfo, Method
from kdforge.registry import METHODS

PAIR_SETS = "clip_fashion, clip_shapes, clip_csv, clip_folder"


def load_clip(spec: dict[str, Any], info: DataInfo) -> nn.Module:
    """A CLIP from a recipe spec (``embed_dim``, ``image``, ``text``, optional ``checkpoint``)."""
    spec = dict(spec)
    ckpt = spec.pop("checkpoint", None)
    model = build_clip(spec, info.in_chans, info.image_size)
    if ckpt:
        from kdforge.engine.checkpoint import load_weights

        load_weights(model, ckpt)
    return model


class _ClipMethod(Method):
    """What both methods share: the caption table and the zero-shot prompts of the pair data set."""

    captions: list[str] | None = None

    def wrap_train_data(self, dataset: Dataset) -> Dataset:
        captions, prompts = find_attr(dataset, "captions"), find_attr(dataset, "prompts")
        if captions is None:
            raise KdforgeError(f"method {self.name!r} needs an image–text pair data set (valid: {PAIR_SETS})")
        self.set_text_data(captions, prompts)  # type: ignore[arg-type]
        return dataset

    def set_text_data(self, captions: list[str], prompts: list[list[str]] | None) -> None:
        """The caption table that batch caption ids index, and the zero-shot prompts per class."""
        self.captions = list(captions)
        if prompts:
            self.deployable().set_classes(prompts)

    def texts(self, ids: Tensor) -> list[str]:
        if self.captions is None:
            raise KdforgeError("no caption table: train on a pair data set or call set_text_data(captions, prompts)")
        return [self.captions[i] for i in ids.tolist()]


class ClipConfig(Strict):
    """Recipe schema of ``method: {name: clip}``."""

    name: str = "clip"
    model: dict[str, Any]


@METHODS.register("clip")
class ClipTask(_ClipMethod):
    """Train a CLIP with the contrastive task loss over the all-gathered batch."""

    Config = ClipConfig
    name = "clip"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @classmethod
    def from_config(cls, cfg: dict[str, Any], info: DataInfo) -> ClipTask:
        c = validate(ClipConfig, cfg, prefix="method")
        return cls(load_clip(c.model, info))

    def training_step(self, batch: tuple[Tensor, Tensor], step: int) -> dict[str, Tensor]:
        x, ids = batch
        self.model.clamp_()  # the previous optimiser step may have pushed κ above 100
        v = F.normalize(gather(self.model.encode_image(x)), dim=-1)
        s = F.normalize(gather(self.model.encode_text(self.texts(ids))), dim=-1)
        scale = self.model.scale()
        return {"loss": clip_loss(v, s, scale), "scale": scale.detach()}

    def deployable(self) -> nn.Module:
        return self.model


class ClipKDConfig(Strict):
    """Recipe schema of ``method: {name: clip_kd}``."""

    name: str = "clip_kd"
    teacher: dict[str, Any]
    student: dict[str, Any]
    weights: dict[str, float] = Field(default_factory=lambda: {"task": 1.0, "crd": 1.0, "fd": 2000.0, "icl": 1.0})
    mask_ratio: float = Field(0.75, ge=0.0, lt=1.0)
    #: ``paper``, ``official`` (both quirks of the released code) or a list of ``mfd``, ``gd``
    compat: str | list[str] = "paper"
    mfd_compat: bool | None = None  # deprecated: compat [mfd]
    scale_param: Literal["exp", "raw"] = "exp"
    gd_compat: bool | None = None  # deprecated: compat [gd]


@METHODS.register("clip_kd")
class ClipKD(_ClipMethod):
    """CLIP-KD: a frozen teacher CLIP teaches a student CLIP with weighted task/CRD/FD/MFD/GD/ICL/AFD terms.

    ``weights`` may name ``mfd``: its weight is added to FD's and the student's image tower sees a
    masked image (ViT towers). ``compat: [mfd]`` reproduces the released code, whose masked forward
    is discarded (MFD = FD); ``compat: [gd]`` its GD (κ passed as a temperature); ``official`` both.
    """

    Config = ClipKDConfig
    name = "clip_kd"
    frozen_prefixes = ("teacher.",)

    def __init__(self, student: nn.Module, teacher: nn.Module, weights: dict[str, float], mask_ratio: float = 0.75,
                 mfd_compat: bool = False, scale_param: str = "exp", gd_compat: bool = False) -> None:
        super().__init__()
        w = dict(weights)
        bad = sorted(set(w) - {*TERMS, "mfd"})
        if bad:
            raise KdforgeError(f"unknown CLIP-KD weight {bad[0]!r} (valid: {', '.join((*TERMS, 'mfd'))})")
        mfd = w.pop("mfd", 0.0)
        if mfd > 0:
            w["fd"] = w.get("fd", 0.0) + mfd
        self.mask_ratio = mask_ratio if mfd > 0 and not mfd_compat else 0.0
        self.student = student
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.kd = ClipKDLoss(student.embed_dim, teacher.embed_dim, w, scale_param,
                             compat=["gd"] if gd_compat else "paper")

    @classmethod
    def from_config(cls, cfg: dict[str, Any], info: DataInfo) -> ClipKD:
        c = validate(ClipKDConfig, cfg, prefix="method")
        if not c.teacher.get("checkpoint") and "open_clip" not in c.teacher:
            raise KdforgeError("method.teacher needs a 'checkpoint' (a trained 'clip' run's "
                               "checkpoints/last.safetensors) or an open_clip model")
        try:
            quirks = set(clip_quirks(c.compat))
        except ValueError as e:
            raise KdforgeError(f"method: {e}") from None
        for key, quirk in (("mfd_compat", "mfd"), ("gd_compat", "gd")):
            old = getattr(c, key)
            if old is not None:
                deprecated_key(f"method.{key}", f"method.compat: [{quirk}]")
                quirks = quirks | {quirk} if old else quirks - {quirk}
        return cls(load_clip(c.student, info), load_clip(c.teacher, info), c.weights, c.mask_ratio, "mfd" in quirks,
                   c.scale_param, "gd" in quirks)

    def train(self, mode: bool = True) -> ClipKD:
        super().train(mode)
        self.teacher.eval()
        return self

    def set_text_data(self, captions: list[str], prompts: list[list[str]] | None) -> None:
        super().set_text_data(captions, prompts)
        if prompts:
            self.teacher.set_classes(prompts)

    def training_step(self, batch: tuple[Tensor, Tensor], step: int) -> dict[str, Tensor]:
        x, ids = batch
        texts = self.texts(ids)
        self.student.clamp_()
        self.kd.clamp_()
        with torch.no_grad():
            t_img = F.normalize(self.teacher.encode_image(x), dim=-1)
            t_txt = F.normalize(self.teacher.encode_text(texts), dim=-1)
            t_scale = self.teacher.scale()
        img = self.student.encode_image(x, self.mask_ratio)
        out = self.kd(img, self.student.encode_text(texts), self.student.scale(), t_img, t_txt, t_scale)
        return {k: v if k == "loss" else v.detach() for k, v in out.items()}

    def deployable(self) -> nn.Module:
        return self.student
