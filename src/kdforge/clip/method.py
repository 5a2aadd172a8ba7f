"""Methods for the engine: ``clip`` (the CLIP task loss alone, e.g. for the teacher) and ``clip_kd``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from kdforge.clip.data import find_attr
from kdforge.clip.losses import TERMS, ClipKDLoss, clip_loss, clip_quirks
from kdforge.clip.model import build_clip
from kdforge.config import Strict, validate
from kdforge.engine.gather import gather
from kdforge.engine.optim import OptimizerSpec
from kdforge.errors import KdforgeError
from kdforge.losses.base import deprecated_key
from kdforge.method import DataInfo, Method, evaluate_classifier
from kdforge.registry import METHODS

if TYPE_CHECKING:
    from kdforge.engine.trainer import Trainer

PAIR_SETS = "clip_fashion, clip_shapes, clip_csv, clip_folder"
#: CLIP-KD's rule: no weight decay on logit scales (0-d), normalisation layers and biases (attention's
#: packed ``in_proj_bias`` included)
CLIP_NO_DECAY = ["norm", "bias", "scalar", "_bias"]


class TowerSpec(Strict):
    """One tower of a CLIP: a model name and its keyword arguments."""

    model: str
    kwargs: dict[str, Any] = Field(default_factory=dict)


class ClipSpec(Strict):
    """A CLIP model in a recipe: kdforge towers (``embed_dim``, ``image``, ``text``) or an open_clip model."""

    embed_dim: int = Field(64, ge=1)
    image: TowerSpec = Field(default_factory=lambda: TowerSpec(model="vit"))
    text: TowerSpec = Field(default_factory=lambda: TowerSpec(model="small"))
    open_clip: str | None = None
    pretrained: str | None = None
    checkpoint: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> ClipSpec:
        if self.open_clip is None and self.pretrained is not None:
            raise ValueError("'pretrained' needs 'open_clip' (an open_clip model name)")
        if self.open_clip is not None and ({"embed_dim", "image", "text"} & self.model_fields_set):
            raise ValueError("give either open_clip (+ pretrained) or embed_dim/image/text, not both")
        return self

    def build_spec(self) -> dict[str, Any]:
        """The dict :func:`build_clip` takes (no checkpoint)."""
        if self.open_clip is not None:
            return {"open_clip": self.open_clip, "pretrained": self.pretrained}
        return {"embed_dim": self.embed_dim, "image": self.image.model_dump(), "text": self.text.model_dump()}


def load_clip(spec: ClipSpec | dict[str, Any], info: DataInfo) -> nn.Module:
    """A CLIP from a recipe spec (``embed_dim``, ``image``, ``text``, optional ``checkpoint``)."""
    if not isinstance(spec, ClipSpec):
        spec = validate(ClipSpec, spec, prefix="CLIP model")
    ckpt = spec.checkpoint
    spec = spec.build_spec()
    model = build_clip(spec, info.in_chans, info.image_size)
    if ckpt:
        from kdforge.engine.checkpoint import load_weights

        load_weights(model, ckpt)
    model.kdforge_spec = {"builder": "clip", "spec": spec, "in_chans": info.in_chans, "image_size": info.image_size}
    return model


def rebuild_clip(kdforge_spec: dict[str, Any]) -> nn.Module:
    """The (untrained) CLIP that a ``kdforge_spec`` of builder ``clip`` describes."""
    model = build_clip(kdforge_spec["spec"], int(kdforge_spec["in_chans"]), int(kdforge_spec["image_size"]))
    model.kdforge_spec = dict(kdforge_spec)
    return model


@torch.no_grad()
def evaluate_clip(model: nn.Module, loader: DataLoader, acc: Any = None) -> dict[str, float]:
    """Zero-shot top-1/top-5 (data with classes) and retrieval recall@1/5 both ways (``i2t_R@1``, ...).

    Zero-shot uses the evaluation set's own class prompts. Retrieval ranks every image of the set
    against its distinct pair captions, so each process scores the whole set (not its shard).
    """
    from kdforge.clip.zeroshot import image_embeddings, retrieval_recall, unique_captions

    ds = loader.dataset
    prompts, captions = find_attr(ds, "prompts"), find_attr(ds, "pair_captions")
    out: dict[str, float] = {}
    if prompts and find_attr(ds, "zero_shot") is not False:
        model.set_classes(prompts)
        out.update(evaluate_classifier(model, loader, acc))
    if captions:
        device = acc.device if acc is not None else next(model.parameters()).device
        was = model.training
        model.eval()
        whole = DataLoader(ds, batch_size=loader.batch_size or 256, shuffle=False)
        img = image_embeddings(model, (b[0] for b in whole), device)
        unique, positives = unique_captions(list(captions))  # type: ignore[arg-type]
        txt = torch.cat([F.normalize(model.encode_text(unique[i:i + 256]).float(), dim=-1)
                         for i in range(0, len(unique), 256)])
        model.train(was)
        out.update(retrieval_recall(img, txt, positives.to(img.device), ks=(1, 5)))
    return out


class _ClipMethod(Method):
    """What both methods share: the caption table, the zero-shot prompts, evaluation and the optimizer rule.

    Evaluation reports zero-shot ``top1``/``top5`` (data with classes) and retrieval ``i2t_R@1``,
    ``t2i_R@1`` (and R@5); "best" is picked by zero-shot top-1, or by image→text R@1 on CSV/folder
    pairs, which have no classes.
    """

    captions: list[str] | None = None
    retrieval_only = False
    #: parameter-name rules without weight decay in the CLIP's optimizer (``optim.no_decay`` of the spec)
    no_decay: list[str] = CLIP_NO_DECAY

    @property
    def monitor(self) -> tuple[str, str]:  # type: ignore[override]
        """Zero-shot top-1, or image→text R@1 where the data have no classes."""
        return ("i2t_R@1", "max") if self.retrieval_only else ("top1", "max")

    def wrap_train_data(self, dataset: Dataset) -> Dataset:
        captions, prompts = find_attr(dataset, "captions"), find_attr(dataset, "prompts")
        if captions is None:
            raise KdforgeError(f"method {self.name!r} needs an image–text pair data set (valid: {PAIR_SETS})")
        self.retrieval_only = find_attr(dataset, "zero_shot") is False
        self.set_text_data(captions, prompts)  # type: ignore[arg-type]
        return dataset

    def configure_optimizers(self) -> Sequence[OptimizerSpec]:
        """One optimizer (the recipe's) over the CLIP, without weight decay where ``no_decay`` says."""
        return [OptimizerSpec("main", optim={"no_decay": list(self.no_decay)})]

    def evaluate(self, loader: DataLoader | None, trainer: Trainer, model: nn.Module) -> dict[str, float]:
        """Zero-shot top-1/top-5 and retrieval R@1/R@5 of ``model`` on ``loader``'s set."""
        if loader is None:
            return {}
        return evaluate_clip(model, loader, trainer.acc if trainer is not None else None)

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
    model: ClipSpec
    #: parameters without weight decay (``optim.no_decay`` rules): logit scale, norms, biases
    no_decay: list[str] = Field(default_factory=lambda: list(CLIP_NO_DECAY))


@METHODS.register("clip")
class ClipTask(_ClipMethod):
    """Train a CLIP with the contrastive task loss over the all-gathered batch."""

    Config = ClipConfig
    name = "clip"

    def __init__(self, model: nn.Module, no_decay: list[str] | None = None) -> None:
        super().__init__()
        self.model = model
        self.no_decay = list(CLIP_NO_DECAY if no_decay is None else no_decay)

    @classmethod
    def from_config(cls, cfg: dict[str, Any], info: DataInfo) -> ClipTask:
        c = validate(ClipConfig, cfg, prefix="method")
        return cls(load_clip(c.model, info), c.no_decay)

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
    teacher: ClipSpec
    student: ClipSpec
    weights: dict[str, float] = Field(default_factory=lambda: {"task": 1.0, "crd": 1.0, "fd": 2000.0, "icl": 1.0})
    mask_ratio: float = Field(0.75, ge=0.0, lt=1.0)
    #: ``paper``, ``official`` (both quirks of the released code) or a list of ``mfd``, ``gd``
    compat: str | list[str] = "paper"
    mfd_compat: bool | None = None  # deprecated: compat [mfd]
    scale_param: Literal["exp", "raw"] = "exp"
    gd_compat: bool | None = None  # deprecated: compat [gd]
    #: the student's parameters without weight decay (``optim.no_decay`` rules): logit scale, norms, biases
    no_decay: list[str] = Field(default_factory=lambda: list(CLIP_NO_DECAY))
    #: weight decay of the loss module (projections, cross/fusion scales, fusion layers): AdamW's default,
    #: as the released code gives that group
    loss_weight_decay: float = Field(0.01, ge=0.0, allow_inf_nan=False)


@METHODS.register("clip_kd")
class ClipKD(_ClipMethod):
    """CLIP-KD: a frozen teacher CLIP teaches a student CLIP with weighted task/CRD/FD/MFD/GD/ICL/AFD terms.

    ``weights`` may name ``mfd``: its weight is added to FD's and the student's image tower sees a
    masked image (ViT towers). ``compat: [mfd]`` reproduces the released code, whose masked forward
    is discarded (MFD = FD); ``compat: [gd]`` its GD (κ passed as a temperature); ``official`` both.
    Optimizers: "main" (the student: the recipe's optim, no decay on ``no_decay``) and "loss" (the
    loss module's parameters: the same optimizer and schedule, weight decay ``loss_weight_decay``).
    """

    Config = ClipKDConfig
    name = "clip_kd"
    frozen_prefixes = ("teacher.",)

    def __init__(self, student: nn.Module, teacher: nn.Module, weights: dict[str, float], mask_ratio: float = 0.75,
                 mfd_compat: bool = False, scale_param: str = "exp", gd_compat: bool = False,
                 no_decay: list[str] | None = None, loss_weight_decay: float = 0.01) -> None:
        super().__init__()
        self.no_decay = list(CLIP_NO_DECAY if no_decay is None else no_decay)
        self.loss_weight_decay = loss_weight_decay
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
        if not c.teacher.checkpoint and c.teacher.open_clip is None:
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
                   c.scale_param, "gd" in quirks, c.no_decay, c.loss_weight_decay)

    def configure_optimizers(self) -> Sequence[OptimizerSpec]:
        """The student ("main", no decay on ``no_decay``) and the loss module ("loss", decay ``loss_weight_decay``)."""
        return [OptimizerSpec("main", optim={"no_decay": list(self.no_decay)}),
                OptimizerSpec("loss", self.kd, optim={"weight_decay": self.loss_weight_decay, "no_decay": []})]

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
