"""The default encoder is truly ImageNet-pretrained (offline), and features have the paper's layout."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from skimage import data
from skimage.transform import resize

from AnomalyDiffusionLib.dode.features import (
    DEFAULT_ENCODER,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderSpec,
    Standardiser,
    build_encoder,
    extract,
    lite0_imagenet_state,
)
from AnomalyDiffusionLib.errors import AnomalyDiffusionError


def _top(net: torch.nn.Module, name: str, mean, std, k: int = 1) -> tuple[list[int], float]:
    """The top-k ImageNet classes of a scikit-image photo and the top-1 probability."""
    img = resize(getattr(data, name)(), (224, 224), anti_aliasing=True).astype(np.float32)
    x = (torch.from_numpy(img).permute(2, 0, 1)[None] - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[
        :, None, None
    ]
    with torch.no_grad():
        p, i = net(x).softmax(1)[0].topk(k)
    return i.tolist(), float(p[0])


def test_packaged_lite0_weights_classify_photos():
    """Strict load into timm's tf_efficientnet_lite0 (the TF port the weights come from), with its own
    input scaling (mean = std = 0.5); ImageNet top-1 on scikit-image's bundled photos, the cat
    (281-285 cats) and the coffee (967 espresso), and top-3 on the rocket on its launch tower
    (657 missile / 744 projectile; its top-1 is 540, drilling platform, the tower)."""
    net = timm.create_model(DEFAULT_ENCODER, pretrained=False).eval()
    net.load_state_dict(lite0_imagenet_state(), strict=True)
    enc = build_encoder(EncoderSpec())
    mean, std = enc.mean.flatten().tolist(), enc.std.flatten().tolist()
    assert mean == std == [0.5, 0.5, 0.5]  # the encoder normalises as its variant expects
    for name, classes in {"chelsea": {281, 282, 283, 284, 285}, "coffee": {967, 968, 504}}.items():
        cls, p = _top(net, name, mean, std)
        assert cls[0] in classes and p > 0.5, (name, cls, p)
    assert {657, 744} & set(_top(net, "rocket", mean, std, k=3)[0])


def test_matching_variant_is_more_confident_than_the_mismatched_one():
    """The oracle of issue 19: on the cat, the matching TF variant gives the Egyptian cat ~0.79, the
    symmetric-padding variant with ImageNet scaling only ~0.54 (the weights do not fit it)."""
    tf = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    tf.load_state_dict(lite0_imagenet_state("tf_efficientnet_lite0"), strict=True)
    pt = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    pt.load_state_dict(lite0_imagenet_state("efficientnet_lite0"), strict=True)
    cls_tf, p_tf = _top(tf, "chelsea", (0.5,) * 3, (0.5,) * 3)
    cls_pt, p_pt = _top(pt, "chelsea", IMAGENET_MEAN, IMAGENET_STD)
    assert cls_tf == cls_pt == [285]
    assert p_tf > 0.7 and p_pt < 0.65 and p_tf - p_pt > 0.15


def test_older_bundles_keep_their_encoder_variant():
    """A spec naming efficientnet_lite0 (bundles before the fix) builds that variant with ImageNet
    scaling, so its features are those the bundle's score networks were trained on."""
    old = build_encoder(EncoderSpec(name="efficientnet_lite0"))
    assert old.bn1.eps == 1e-5 and np.allclose(old.mean.flatten(), IMAGENET_MEAN)
    new = build_encoder(EncoderSpec())
    assert new.bn1.eps == 1e-3
    with pytest.raises(AnomalyDiffusionError, match="fit"):
        lite0_imagenet_state("efficientnet_b0")


def test_multi_scale_features_have_the_paper_layout():
    enc = build_encoder(EncoderSpec())
    assert enc.channels == 192  # lite0 blocks[:6]; B5 blocks[:6] would give 304
    slices = torch.rand(3, 1, 128, 128) * 2 - 1
    feats = extract(enc, slices, (256, 192, 128, 64))
    assert [tuple(f.shape) for f in feats] == [(3, 192, 8, 8), (3, 192, 6, 6), (3, 192, 4, 4), (3, 192, 2, 2)]
    # frozen and deterministic
    assert all(not p.requires_grad for p in enc.parameters())
    assert torch.allclose(extract(enc, slices[:1], (64,))[0], feats[3][:1], atol=1e-4)


def test_b5_path_needs_a_local_file_and_random_weights_are_possible(tmp_path):
    with pytest.raises(AnomalyDiffusionError, match="no offline ImageNet weights"):
        build_encoder(EncoderSpec(name="efficientnet_b5"))
    with pytest.raises(AnomalyDiffusionError, match="not found"):
        build_encoder(EncoderSpec(name="efficientnet_b5"), weights_file=tmp_path / "missing.pth")
    # timm's own loader reads a local file: save B5-shaped weights and load them back through it
    b5 = timm.create_model("efficientnet_b5", pretrained=False)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in b5.state_dict().items()}, str(tmp_path / "b5.safetensors"))
    enc = build_encoder(EncoderSpec(name="efficientnet_b5"), weights_file=tmp_path / "b5.safetensors")
    assert enc.channels == 304
    assert torch.equal(enc.conv_stem.weight, b5.conv_stem.weight)


def test_standardiser_fits_per_channel():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(50, 4, 3, 3, generator=g) * torch.tensor([1.0, 2.0, 0.5, 3.0]).reshape(1, 4, 1, 1) + 5
    z = Standardiser.fit(f)(f)
    assert torch.allclose(z.transpose(0, 1).reshape(4, -1).mean(1), torch.zeros(4, dtype=z.dtype), atol=1e-5)
    assert torch.allclose(z.transpose(0, 1).reshape(4, -1).std(1), torch.ones(4, dtype=z.dtype), atol=1e-2)
