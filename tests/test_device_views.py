"""Augmentation on the device (sslcore.toolkit.device_views), on CPU tensors: every sample gets its own
parameters; each parameter's distribution matches the CPU recipe's (albumentations, drawn by albumentations
itself), with fixed seeds and stated tolerances; each operation given the same parameters gives the CPU
recipe's pixels; the views repeat from the seed; and the engine runs the device path and resumes it exactly."""

from __future__ import annotations

import math
import random
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp

from sslcore.config import BlockError
from sslcore.engine.build import augments_on_device
from sslcore.engine.rundir import RunDir
from sslcore.testing import resume_repeats_the_run
from sslcore.toolkit.device_views import (
    ViewSpec,
    apply_view,
    color_jitter,
    crop_resize,
    device_views,
    gaussian_blur,
    gaussian_kernels,
    grayscale,
    pad_collate,
    sample_crops,
    sample_view_params,
    solarize,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
N = 20_000  # draws per distribution
# Two-sample Kolmogorov-Smirnov at n = m = 20,000: the statistic's 0.1% critical value is 1.95 sqrt(2/n) = 0.0195.
KS_MAX = 0.0195


def recipes(registry) -> dict[str, object]:
    return {name: registry.build("augmentation", {"name": name, **block})
            for name, block in [("moco_v2", {"size": 224}), ("simclr", {"size": 224}), ("byol", {"size": 224}),
                                ("mae", {"size": 224}), ("swav", {}), ("dino", {})]}


@pytest.fixture(scope="module")
def photo(cifar10_dir: Path) -> np.ndarray:
    """A real CIFAR-10 image, enlarged to 96 x 120 (some detail to resample)."""
    path = next((cifar10_dir / "train").glob("*/*.jpg"))
    image = np.asarray(Image.open(path).convert("RGB"))
    return cv2.resize(image, (120, 96), interpolation=cv2.INTER_CUBIC)


def as_batch(image: np.ndarray) -> torch.Tensor:
    """H x W x 3 uint8 -> 1 x 3 x H x W float in [0, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255


def as_image(x: torch.Tensor) -> np.ndarray:
    return x[0].permute(1, 2, 0).numpy() * 255


# -- per-sample parameters ------------------------------------------------------------------------------------

def test_every_sample_gets_its_own_parameters():
    spec = ViewSpec(size=32, scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_prob=0.8, grayscale_prob=0.2,
                    blur_prob=0.5, solarize_prob=0.2)
    params = sample_view_params(spec, torch.tensor([[64, 64]] * 256), torch.Generator().manual_seed(0))
    boxes = torch.stack([params.top, params.left, params.height, params.width], dim=1)
    assert len({tuple(b.tolist()) for b in boxes}) > 250
    assert len(set(params.factors[:, 0].tolist())) == 256 and len({tuple(o.tolist()) for o in params.order}) == 24
    for flags in (params.flip, params.jitter, params.grayscale, params.blur, params.solarize):
        assert 0 < flags.sum() < 256


def test_a_sample_view_is_its_own_whatever_the_batch(photo):
    """Sample i's view in a batch equals its view made alone with the same row of parameters."""
    spec = ViewSpec(size=48, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_prob=1.0, grayscale_prob=0.3,
                    blur_prob=0.5, solarize_prob=0.3)
    images = as_batch(photo).expand(16, -1, -1, -1).contiguous()
    params = sample_view_params(spec, torch.tensor([photo.shape[:2]] * 16), torch.Generator().manual_seed(3))
    batch = apply_view(images, spec, params)
    for i in range(16):
        alone = type(params)(**{k: v[i:i + 1] for k, v in vars(params).items()})
        torch.testing.assert_close(apply_view(images[i:i + 1], spec, alone), batch[i:i + 1], atol=1e-5, rtol=0)
    assert len({round(float(batch[i].sum()), 3) for i in range(16)}) == 16


def test_views_repeat_from_the_seed(registry):
    augmentation = registry.build("augmentation", {"name": "byol", "size": 32})
    images = torch.randint(0, 256, (8, 40, 36, 3), dtype=torch.uint8)
    sizes = torch.tensor([[40, 36]] * 8)
    first = augmentation.device_views(images, sizes, torch.Generator().manual_seed(5))
    again = augmentation.device_views(images, sizes, torch.Generator().manual_seed(5))
    other = augmentation.device_views(images, sizes, torch.Generator().manual_seed(6))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])


# -- distributions against albumentations' own draws ------------------------------------------------------------

@pytest.mark.parametrize(("height", "width", "scale"), [(32, 32, (0.08, 1.0)), (375, 500, (0.2, 1.0)),
                                                        (500, 180, (0.05, 0.14))])
def test_crop_distribution_matches_albumentations(height, width, scale):
    """Area fraction, aspect ratio and position of the crops: KS statistic under its 0.1% critical value."""
    top, left, h, w = (t.double().numpy() for t in sample_crops(
        torch.tensor([[height, width]] * N), scale, (3 / 4, 4 / 3), torch.Generator().manual_seed(0)))
    crop = A.RandomResizedCrop(size=(32, 32), scale=scale)
    crop.set_random_state(np.random.default_rng(0), random.Random(0))
    boxes = np.array([crop.get_params_dependent_on_data({"shape": (height, width, 3)}, {})["crop_coords"]
                      for _ in range(N)], dtype=np.float64)  # x_min, y_min, x_max, y_max
    cpu_w, cpu_h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    pairs = {"area": (h * w / (height * width), cpu_h * cpu_w / (height * width)),
             "aspect": (w / h, cpu_w / cpu_h),
             "x centre": ((left + w / 2) / width, (boxes[:, 0] + cpu_w / 2) / width),
             "y centre": ((top + h / 2) / height, (boxes[:, 1] + cpu_h / 2) / height)}
    for name, (device, cpu) in pairs.items():
        assert ks_2samp(device, cpu).statistic < KS_MAX, name
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()


def test_jitter_factors_and_order_match_albumentations():
    jitter = (0.8, 0.8, 0.8, 0.2)
    spec = ViewSpec(size=32, scale=(0.08, 1.0), jitter=jitter, jitter_prob=1.0)
    params = sample_view_params(spec, torch.tensor([[32, 32]] * N), torch.Generator().manual_seed(1))
    transform = A.ColorJitter(*jitter, p=1.0)
    transform.set_random_state(np.random.default_rng(1), random.Random(1))
    cpu = [transform.get_params() for _ in range(N)]
    for column, key in enumerate(("brightness", "contrast", "saturation", "hue")):
        assert ks_2samp(params.factors[:, column].numpy(), [p[key] for p in cpu]).statistic < KS_MAX, key
    # each operation's position in the order: uniform over 0..3 on both sides (a chi-squared-free check: every
    # cell of the 4 x 4 position table within 5 standard deviations of N/4 on each side)
    device_positions = params.order.argsort(dim=1).numpy()
    cpu_positions = np.array([np.argsort(p["order"]) for p in cpu])
    sd = math.sqrt(N * 0.25 * 0.75)
    for positions in (device_positions, cpu_positions):
        for operation in range(4):
            counts = np.bincount(positions[:, operation], minlength=4)
            assert np.all(np.abs(counts - N / 4) < 5 * sd), counts


def test_blur_kernels_match_albumentations():
    """albumentations hands out its kernel, not sigma: the centre tap of each side's kernels (a function of
    sigma and of the kernel's support, which both cut at int(3.5 sigma)) has one distribution, and a given
    sigma gets albumentations' kernel."""
    spec = ViewSpec(size=32, scale=(0.08, 1.0), blur_prob=1.0)
    n = 4000
    sigma = sample_view_params(spec, torch.tensor([[32, 32]] * n), torch.Generator().manual_seed(2)).sigma
    device_centre = gaussian_kernels(sigma, spec.blur_sigma[1])[:, 7].numpy()
    blur = A.GaussianBlur(sigma_limit=spec.blur_sigma, blur_limit=0, p=1.0)
    blur.set_random_state(np.random.default_rng(2), random.Random(2))
    cpu_centre = []
    for _ in range(n):
        kernel = blur.get_params_dependent_on_data({"shape": (32, 32, 3)}, {})["kernel"]
        cpu_centre.append(float(kernel[kernel.size // 2]))
    assert ks_2samp(device_centre, cpu_centre).statistic < 1.95 * math.sqrt(2 / n)
    for s in (0.2, 0.5, 1.3, 2.0):
        cpu = A.GaussianBlur(sigma_limit=(s, s), blur_limit=0).get_params_dependent_on_data({"shape": (9, 9)}, {})
        device = gaussian_kernels(torch.tensor([s]), 2.0)[0].numpy()
        radius = cpu["kernel"].size // 2
        np.testing.assert_allclose(device[7 - radius:8 + radius], cpu["kernel"], atol=1e-6)
        assert np.all(device[:7 - radius] == 0) and np.all(device[8 + radius:] == 0)


def applied_frequencies(pipeline: A.Compose, n: int) -> dict[str, float]:
    """How often each transform of ``pipeline`` applied, over ``n`` calls on a small image."""
    pipeline.save_applied_params = True
    pipeline.set_random_state(np.random.default_rng(0), random.Random(0))
    image = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    counts: dict[str, int] = {}
    for _ in range(n):
        for name, _params in pipeline(image=image)["applied_transforms"]:
            counts[name] = counts.get(name, 0) + 1
    return {name: count / n for name, count in counts.items()}


def test_every_probability_matches_the_cpu_recipe(registry):
    """For each view of each recipe: how often the CPU pipeline applies flip, jitter, grayscale, blur and
    solarize, against how often the device path draws them; a two-proportion z under 4.5 each."""
    n = 3000
    names = {"flip": "HorizontalFlip", "jitter": "ColorJitter", "grayscale": "ToGray", "blur": "GaussianBlur",
             "solarize": "Solarize"}
    for recipe, augmentation in recipes(registry).items():
        seen: dict[int, dict[str, float]] = {}
        for view, (spec, pipeline) in enumerate(zip(augmentation.view_specs, augmentation.view_transforms,
                                                    strict=True)):
            if id(pipeline) in seen:
                continue
            cpu = seen[id(pipeline)] = applied_frequencies(pipeline, n)
            params = sample_view_params(spec, torch.tensor([[24, 24]] * n), torch.Generator().manual_seed(view))
            for key, name in names.items():
                device = getattr(params, key).float().mean().item()
                p = getattr(spec, f"{key}_prob")
                device = device if p else 0.0  # an operation of probability 0 is not run on the device
                pooled = (device + cpu.get(name, 0.0)) / 2
                sd = math.sqrt(max(pooled * (1 - pooled), 1e-12) * 2 / n)
                assert abs(device - cpu.get(name, 0.0)) < 4.5 * sd + 1e-9, (recipe, view, key, device, cpu)


# -- each operation, given the same parameters, makes the CPU recipe's pixels --------------------------------

@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize(("box", "size"), [((10, 7, 50, 80), 32), ((0, 0, 96, 120), 224), ((40, 60, 56, 60), 24)])
def test_crop_resize_is_cv2_resize_of_the_crop(photo, box, size, interpolation):
    top, left, h, w = box
    flag = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}[interpolation]
    expected = cv2.resize(photo[top:top + h, left:left + w], (size, size), interpolation=flag).astype(np.float32)
    got = as_image(crop_resize(as_batch(photo), *(torch.tensor([v]) for v in box), size, interpolation))
    # cv2 computes in fixed point and rounds to uint8; resampling positions are the same
    assert np.abs(got - expected).mean() < 1.0 and np.abs(got - expected).max() < 12


def test_a_crop_never_sees_the_padding():
    """A batch padded to its largest image: a small constant image's views are that constant, whatever the crop."""
    small = torch.full((8, 10, 3), 200, dtype=torch.uint8)
    large = torch.zeros((40, 30, 3), dtype=torch.uint8)
    (canvas, sizes), _, _ = pad_collate([(small, 0, 0), (large, 1, 1)] * 32)
    assert canvas.shape == (64, 40, 30, 3) and sizes[0].tolist() == [8, 10]
    spec = ViewSpec(size=32, scale=(0.08, 1.0), flip_prob=0.5, mean=(0, 0, 0), std=(1, 1, 1))
    for interpolation in ("bilinear", "bicubic"):
        views = device_views(canvas, sizes, [ViewSpec(**{**vars(spec), "interpolation": interpolation})],
                             torch.Generator().manual_seed(0))[0]
        torch.testing.assert_close(views[0::2], torch.full_like(views[0::2], 200 / 255), atol=1e-5, rtol=0)


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]])
def test_color_jitter_is_albumentations_color_jitter(photo, order):
    factors = {"brightness": 1.3, "contrast": 0.7, "saturation": 1.4, "hue": 0.06}
    expected = A.ColorJitter(p=1.0).apply(photo, **factors, order=order).astype(np.float32)
    got = as_image(color_jitter(as_batch(photo), torch.tensor([True]), torch.tensor([list(factors.values())]),
                                torch.tensor([order])))
    # albumentations rounds to uint8 after each step, and shifts hue in OpenCV's 180-step uint8 HSV
    assert np.abs(got - expected).mean() < 1.5 and np.percentile(np.abs(got - expected), 99) < 6


def test_grayscale_blur_and_solarize_are_albumentations(photo):
    x, yes = as_batch(photo), torch.tensor([True])
    expected = A.ToGray(p=1.0).apply(photo).astype(np.float32)
    assert np.abs(as_image(grayscale(x, yes)) - expected).max() <= 1.0
    expected = A.Solarize(p=1.0).apply(photo, threshold=0.5).astype(np.float32)
    assert np.abs(as_image(solarize(x, yes)) - expected).max() <= 1e-3
    for sigma in (0.3, 1.0, 2.0):
        kernel = A.GaussianBlur(sigma_limit=(sigma, sigma), blur_limit=0, p=1.0).get_params_dependent_on_data(
            {"shape": photo.shape}, {})["kernel"]
        expected = A.GaussianBlur(p=1.0).apply(photo, kernel=kernel).astype(np.float32)
        got = as_image(gaussian_blur(x, yes, torch.tensor([sigma]), 2.0))
        assert np.abs(got - expected).mean() < 0.6 and np.abs(got - expected).max() <= 2.0, sigma
    untouched = torch.tensor([False])
    for op in (lambda t: grayscale(t, untouched), lambda t: solarize(t, untouched),
               lambda t: gaussian_blur(t, untouched, torch.tensor([1.0]), 2.0)):
        assert torch.equal(op(x), x)


def test_recipes_describe_both_paths_with_one_spec(registry):
    """The CPU pipeline of each view is built from its spec: the same sizes, ranges and probabilities."""
    for recipe, augmentation in recipes(registry).items():
        assert augmentation.view_sizes == [spec.size for spec in augmentation.view_specs], recipe
        for spec, pipeline in zip(augmentation.view_specs, augmentation.view_transforms, strict=True):
            crop = pipeline.transforms[0]
            assert isinstance(crop, A.RandomResizedCrop) and tuple(crop.size) == (spec.size, spec.size)
            assert tuple(crop.scale) == spec.scale and tuple(crop.ratio) == pytest.approx(spec.ratio)


# -- the engine -------------------------------------------------------------------------------------------------

def test_device_key_chooses_the_path(registry):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    for device, on_cpu, on_gpu in [("auto", False, True), (True, True, True), (False, False, False)]:
        block = {"name": "moco_v2", "size": 32, "device": device}
        augmentation = registry.build("augmentation", block)
        assert (augments_on_device(augmentation, block, cpu), augments_on_device(augmentation, block, gpu)) == (
            on_cpu, on_gpu)


def test_device_true_without_a_device_path_is_an_error(registry):
    """An augmentation without a device path (a ViewAugmentation: a plugin's own, as RotNet's) whose block asks
    for it is refused with the key, not run on the CPU in silence; under auto it runs in the loader."""
    from sslcore.components.augmentations import OneViewConfig, ViewAugmentation

    augmentation = ViewAugmentation([A.Compose([A.RandomResizedCrop(size=(32, 32))])], OneViewConfig(size=32))
    block = {"name": "my_crop", "device": True}
    with pytest.raises(BlockError, match="has no device path") as error:
        augments_on_device(augmentation, block, torch.device("cpu"))
    assert error.value.loc == ("augmentation", "device")
    assert augments_on_device(augmentation, {**block, "device": "auto"}, torch.device("cuda")) is False
    assert augments_on_device(augmentation, {"name": "my_crop"}, torch.device("cuda")) is False


def test_device_path_trains_and_resumes_exactly(cifar10_dir, tmp_path):
    """MoCo v2 with its views made on the (CPU) device: a run resumed inside an epoch and at its end repeats
    the uninterrupted one bit for bit. (The standard stem: the views are the question, not the encoder's
    16x FLOPs at 32 px.)"""
    resume_repeats_the_run(EXAMPLES / "moco_cifar10.yaml", cifar10_dir, tmp_path, "augmentation.device=true",
                           "encoder.cifar_stem=false")
    summaries = list(tmp_path.glob("**/summary.json"))
    assert len(summaries) == 3 and all(RunDir(s.parent).read_summary()["views_made_on"] == "cpu" for s in summaries)
