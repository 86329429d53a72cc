"""The augmentation recipes (moco_v2; simclr and byol at the end): view shapes, reproducible seeding,
deterministic eval, blur only when large."""

from __future__ import annotations

import pickle

import albumentations as A
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from sslcore.components.augmentations import MoCoV2Augmentation, MoCoV2Config
from sslcore.registry import Registry


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(40, 48, 3), dtype=np.uint8)


def moco_v2(**params) -> MoCoV2Augmentation:
    return MoCoV2Augmentation(MoCoV2Config(**params))


def test_views_are_two_normalized_float_tensors(image):
    augmentation = moco_v2(size=32)
    views = augmentation.views(image)
    assert augmentation.view_sizes == [32, 32] and len(views) == 2
    for view in views:
        assert view.shape == (3, 32, 32) and view.dtype == torch.float32
    assert not torch.equal(views[0], views[1])
    assert views[0].min() < 0 < views[0].max()  # normalized, not in [0, 1]


def test_set_seed_makes_views_reproducible(image):
    augmentation = moco_v2(size=32)
    augmentation.set_seed(7)
    first = [augmentation.views(image) for _ in range(3)]
    augmentation.set_seed(7)
    again = [augmentation.views(image) for _ in range(3)]
    for views, views_again in zip(first, again, strict=True):
        for view, view_again in zip(views, views_again, strict=True):
            assert torch.equal(view, view_again)
    augmentation.set_seed(8)
    assert not torch.equal(augmentation.views(image)[0], first[0][0])


def test_seeded_transforms_draw_independently(image):
    """With one seed for all transforms, albumentations would flip every grayscale view."""
    augmentation = moco_v2(size=32)
    augmentation.set_seed(0)
    compose = augmentation.view_transforms[0]
    compose.save_applied_params = True
    gray_not_flipped = 0
    for _ in range(400):
        applied = {name for name, _ in compose(image=image)["applied_transforms"]}
        gray_not_flipped += {"ToGray"} <= applied and "HorizontalFlip" not in applied
    assert gray_not_flipped > 10  # expected about 400 x 0.2 x 0.5 = 40


def test_pickled_copy_continues_identically(image):
    augmentation = moco_v2(size=32)
    augmentation.set_seed(3)
    copy = pickle.loads(pickle.dumps(augmentation))
    assert torch.equal(augmentation.views(image)[1], copy.views(image)[1])


def test_eval_is_deterministic_center_crop(image):
    augmentation = moco_v2(size=32)
    out = augmentation.eval(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out, augmentation.eval(image))
    large = moco_v2(size=224).eval(np.zeros((300, 400, 3), np.uint8))
    assert large.shape == (3, 224, 224)


@pytest.mark.parametrize(("size", "has_blur"), [(32, False), (63, False), (64, True), (224, True)])
def test_blur_only_from_blur_min_size(size, has_blur):
    transforms = moco_v2(size=size).view_transforms[0].transforms
    assert any(isinstance(t, A.GaussianBlur) for t in transforms) == has_blur


def test_blur_min_size_is_configurable():
    transforms = moco_v2(size=32, blur_min_size=0).view_transforms[0].transforms
    assert any(isinstance(t, A.GaussianBlur) for t in transforms)


@pytest.mark.parametrize("params", [{"scale": (0.9, 0.2)}, {"scale": (0.0, 1.0)}, {"std": (0.2, 0.0, 0.2)},
                                    {"size": 0}, {"sizes": 32}])
def test_invalid_config_is_rejected(params):
    with pytest.raises(ValidationError):
        MoCoV2Config(**params)


def test_byol_views_are_asymmetric_and_simclr_scales_its_jitter(registry: Registry) -> None:
    def steps(transform: A.Compose) -> dict[str, float]:
        return {type(t).__name__: t.p for t in transform.transforms}

    byol = registry.build("augmentation", {"name": "byol", "size": 64})
    first, second = (steps(t) for t in byol.view_transforms)
    assert first["GaussianBlur"] == 1.0 and "Solarize" not in first
    assert second["GaussianBlur"] == 0.1 and second["Solarize"] == 0.2
    # at 32 px the blur is left out (blur_min_size), the solarization stays
    small = [steps(t) for t in registry.build("augmentation", {"name": "byol", "size": 32}).view_transforms]
    assert all("GaussianBlur" not in s for s in small) and small[1]["Solarize"] == 0.2

    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    byol.set_seed(3)
    view1, view2 = byol.views(image)
    assert not torch.equal(view1, view2)  # two pipelines with their own random streams

    simclr = registry.build("augmentation", {"name": "simclr", "size": 32, "strength": 0.5})
    jitter = next(t for t in simclr.view_transforms[0].transforms if isinstance(t, A.ColorJitter))
    assert jitter.p == 0.8
    assert tuple(jitter.brightness) == pytest.approx((0.6, 1.4)) and tuple(jitter.hue) == pytest.approx((-0.1, 0.1))


def test_multi_crop_recipes_are_those_of_swav_and_dino(registry: Registry) -> None:
    """facebookresearch/swav src/multicropdataset.py (2 x 224 of 0.14-1, 6 x 96 of 0.05-0.14, blur p 0.5 and
    SimCLR's jitter everywhere) and facebookresearch/dino main_dino.py DataAugmentationDINO (2 x 224 of 0.4-1,
    blur 1.0 / 0.1, solarize 0 / 0.2; 8 x 96 of 0.05-0.4, blur 0.5; BYOL's jitter; bicubic)."""
    def steps(transform: A.Compose) -> dict[str, A.BasicTransform]:
        return {type(t).__name__: t for t in transform.transforms}

    swav = registry.build("augmentation", {"name": "swav"})
    assert swav.view_sizes == [224] * 2 + [96] * 6 and swav.eval_size == 224
    crops = [steps(t) for t in swav.view_transforms]
    assert [tuple(c["RandomResizedCrop"].scale) for c in crops] == [(0.14, 1.0)] * 2 + [(0.05, 0.14)] * 6
    assert all(c["GaussianBlur"].p == 0.5 and "Solarize" not in c for c in crops)
    jitter = crops[0]["ColorJitter"]
    assert jitter.p == 0.8 and tuple(jitter.brightness) == pytest.approx((0.2, 1.8))
    assert tuple(jitter.hue) == pytest.approx((-0.2, 0.2)) and crops[0]["ToGray"].p == 0.2

    dino = registry.build("augmentation", {"name": "dino"})
    assert dino.view_sizes == [224] * 2 + [96] * 8
    crops = [steps(t) for t in dino.view_transforms]
    assert [tuple(c["RandomResizedCrop"].scale) for c in crops] == [(0.4, 1.0)] * 2 + [(0.05, 0.4)] * 8
    assert [c["GaussianBlur"].p for c in crops] == [1.0, 0.1] + [0.5] * 8
    assert [c["Solarize"].p if "Solarize" in c else 0.0 for c in crops] == [0.0, 0.2] + [0.0] * 8
    assert all(c["RandomResizedCrop"].interpolation == 2 for c in crops)  # cv2.INTER_CUBIC
    assert tuple(crops[0]["ColorJitter"].saturation) == pytest.approx((0.8, 1.2))


def test_multi_crop_views_have_their_group_sizes_and_repeat_with_the_seed(registry: Registry) -> None:
    dino = registry.build("augmentation", {"name": "dino", "size": 32, "local_size": 16, "local_crops": 4})
    image = np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    dino.set_seed(7)
    views = dino.views(image)
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 4
    assert all(v.dtype == torch.float32 for v in views)
    dino.set_seed(7)
    assert all(torch.equal(a, b) for a, b in zip(views, dino.views(image)))
    assert not torch.equal(views[2], views[3])  # each local crop is a draw of its own
    # below blur_min_size (64 px) no crop is blurred; the solarization of the second global crop stays
    names = [{type(t).__name__ for t in transform.transforms} for transform in dino.view_transforms]
    assert all("GaussianBlur" not in n for n in names) and "Solarize" in names[1]


def test_multi_crop_needs_one_probability_per_global_crop(registry: Registry) -> None:
    from sslcore.components.augmentations import MultiCropConfig

    with pytest.raises(ValidationError, match="blur_prob needs one probability per global crop: 3"):
        MultiCropConfig(global_crops=3)
    assert MultiCropConfig(global_crops=1, blur_prob=[1.0], solarize_prob=[0.0], local_crops=0).local_crops == 0
