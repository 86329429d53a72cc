"""Augmentation on the training device: a batch of decoded uint8 images in, every view's random operations
batched over the batch, each sample with parameters of its own.

A view is described by a :class:`ViewSpec` (crop, flip, colour jitter, grayscale, blur, solarize, normalise);
the CPU recipes build their albumentations pipelines from the same specs (``sslcore.components.augmentations``),
so both paths run one recipe with one set of parameters. Here each parameter is drawn as albumentations draws
it, per sample, from a ``torch.Generator`` on the device (the engine seeds it per batch from the epoch's seed
and the batch's position, so views repeat from the seed and across a resume):

- random resized crop: torchvision's 10 tries of an area in ``scale`` x the image's and a log-uniform aspect
  ratio in ``ratio``, rounded to whole pixels, at a uniform position; else the centre crop of the ratio
  clamped to ``ratio``. Each sample's crop lies in its own image (``sizes``: the batch is padded to its
  largest image by repeating edges), resampled with ``grid_sample`` at the pixel centres cv2.resize uses;
- colour jitter with probability ``jitter_prob``: brightness, contrast, saturation factors uniform in
  [max(0, 1 - v), 1 + v], hue uniform in [-h, h], applied in an order drawn per sample (torchvision's and
  albumentations' formulas, through kornia's ``adjust_*``);
- grayscale (0.299 R + 0.587 G + 0.114 B), Gaussian blur with sigma uniform in ``blur_sigma`` (each sample's
  kernel with albumentations' support of 2 int(3.5 sigma) + 1 taps, through kornia's ``filter2d_separable``,
  reflect-101 border), solarize at 0.5, horizontal flip, each with its probability.

Differences from the CPU path, none of them in a parameter's distribution: pixels stay float between the
operations (albumentations rounds to uint8 after each); the flip comes right after the crop (MoCo v2 flips
last; a flip commutes with every other operation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViewSpec:
    """One view of a recipe: what is done to the image, with which probability."""

    size: int  #: side of the square view, in pixels
    scale: tuple[float, float]  #: range of the crop's area, as a fraction of the image's
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  #: range of the crop's aspect ratio (width / height)
    interpolation: str = "bilinear"  #: "bilinear" or "bicubic"
    flip_prob: float = 0.5
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  #: brightness, contrast, saturation, hue
    jitter_prob: float = 0.0
    grayscale_prob: float = 0.0
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass
class ViewParams:
    """The parameters of one view of every sample in a batch (tensors of N rows on the generator's device)."""

    top: torch.Tensor  #: N, the crop's first row
    left: torch.Tensor  #: N, the crop's first column
    height: torch.Tensor  #: N, the crop's height in pixels
    width: torch.Tensor  #: N, the crop's width in pixels
    flip: torch.Tensor  #: N bool
    jitter: torch.Tensor  #: N bool
    factors: torch.Tensor  #: N x 4: brightness, contrast, saturation, hue
    order: torch.Tensor  #: N x 4: the jitter's operations (0 brightness .. 3 hue) in the order applied
    grayscale: torch.Tensor  #: N bool
    blur: torch.Tensor  #: N bool
    sigma: torch.Tensor  #: N
    solarize: torch.Tensor  #: N bool


def _uniform(low: float, high: float, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, device=generator.device)


def _coin(p: float, n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=generator.device) < p


def sample_crops(sizes: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float],
                 generator: torch.Generator, tries: int = 10) -> tuple[torch.Tensor, ...]:
    """Random resized crop boxes ``(top, left, height, width)`` of images of ``sizes`` (N x 2: height, width),
    as torchvision's and albumentations' ``RandomResizedCrop`` draw them (see the module docstring)."""
    n = sizes.shape[0]
    image_h, image_w = sizes[:, 0].double(), sizes[:, 1].double()
    area = (image_h * image_w)[:, None]
    target = area * _uniform(scale[0], scale[1], (n, tries), generator).double()
    aspect = torch.exp(_uniform(math.log(ratio[0]), math.log(ratio[1]), (n, tries), generator).double())
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= image_w[:, None]) & (h > 0) & (h <= image_h[:, None])
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first try that fits
    found = fits.any(dim=1)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    # no try fits: the centre crop of the whole image, its ratio clamped to the range
    in_ratio = image_w / image_h
    fallback_w = torch.where(in_ratio > ratio[1], torch.round(image_h * ratio[1]), image_w)
    fallback_h = torch.where(in_ratio < ratio[0], torch.round(image_w / ratio[0]), image_h)
    w, h = torch.where(found, w, fallback_w), torch.where(found, h, fallback_h)
    start_y, start_x = _uniform(0, 1, (n,), generator).double(), _uniform(0, 1, (n,), generator).double()
    top = torch.where(found, torch.floor((image_h - h + 1) * start_y), torch.floor((image_h - h) / 2))
    left = torch.where(found, torch.floor((image_w - w + 1) * start_x), torch.floor((image_w - w) / 2))
    return top.long(), left.long(), h.long(), w.long()


def sample_view_params(spec: ViewSpec, sizes: torch.Tensor, generator: torch.Generator) -> ViewParams:
    """Every random parameter of ``spec``'s view for a batch of images of ``sizes``, one row per sample."""
    n = sizes.shape[0]
    top, left, height, width = sample_crops(sizes, spec.scale, spec.ratio, generator)
    brightness, contrast, saturation, hue = spec.jitter
    factors = torch.stack([_uniform(max(0.0, 1 - brightness), 1 + brightness, (n,), generator),
                           _uniform(max(0.0, 1 - contrast), 1 + contrast, (n,), generator),
                           _uniform(max(0.0, 1 - saturation), 1 + saturation, (n,), generator),
                           _uniform(-hue, hue, (n,), generator)], dim=1)
    order = torch.rand((n, 4), generator=generator, device=generator.device).argsort(dim=1)
    return ViewParams(top=top, left=left, height=height, width=width, flip=_coin(spec.flip_prob, n, generator),
                      jitter=_coin(spec.jitter_prob, n, generator), factors=factors, order=order,
                      grayscale=_coin(spec.grayscale_prob, n, generator),
                      blur=_coin(spec.blur_prob, n, generator),
                      sigma=_uniform(*spec.blur_sigma, (n,), generator),
                      solarize=_coin(spec.solarize_prob, n, generator))


def crop_resize(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, height: torch.Tensor,
                width: torch.Tensor, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """``images`` (N x C x H x W float) -> N x C x size x size: sample i's box resampled as cv2.resize resamples
    the cut-out crop (output pixel j at source x = left + (j + 0.5) w / size - 0.5, clamped to the box)."""
    n, _, canvas_h, canvas_w = images.shape
    steps = (torch.arange(size, device=images.device, dtype=torch.float32) + 0.5) / size  # size
    dtype = torch.float32

    def axis(start: torch.Tensor, length: torch.Tensor, canvas: int) -> torch.Tensor:
        start, length = start.to(dtype)[:, None], length.to(dtype)[:, None]
        source = (start + steps[None] * length - 0.5).clamp(min=start, max=start + length - 1)  # N x size
        return (source + 0.5) / canvas * 2 - 1  # grid_sample's coordinates, align_corners=False

    xs, ys = axis(left, width, canvas_w), axis(top, height, canvas_h)
    grid = torch.stack([xs[:, None, :].expand(n, size, size), ys[:, :, None].expand(n, size, size)], dim=-1)
    out = F.grid_sample(images, grid, mode=interpolation, padding_mode="border", align_corners=False)
    return out.clamp_(0, 1) if interpolation == "bicubic" else out


def _jitter_step(images: torch.Tensor, operation: int, factor: torch.Tensor) -> torch.Tensor:
    from kornia import enhance

    if operation == 0:
        return enhance.adjust_brightness_accumulative(images, factor)
    if operation == 1:
        return enhance.adjust_contrast_with_mean_subtraction(images, factor)
    if operation == 2:
        return enhance.adjust_saturation_with_gray_subtraction(images, factor)
    return enhance.adjust_hue(images, factor * 2 * math.pi)


def color_jitter(images: torch.Tensor, apply: torch.Tensor, factors: torch.Tensor,
                 order: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation and hue of each sample where ``apply``, with its factors, in its
    order: at position k of the order, every sample whose k-th operation is o gets o, as one batch."""
    out = images.clone()
    for position in range(4):
        for operation in range(4):
            rows = torch.nonzero(apply & (order[:, position] == operation)).squeeze(1)
            if rows.numel():
                out[rows] = _jitter_step(out[rows], operation, factors[rows, operation])
    return out


def grayscale(images: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    from kornia.color import rgb_to_grayscale

    gray = rgb_to_grayscale(images).expand_as(images)
    return torch.where(apply[:, None, None, None], gray, images)


def gaussian_kernels(sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """N x K one-dimensional Gaussian kernels, K = 2 int(3.5 max_sigma) + 1, each with albumentations' (and
    PIL's) support for its own sigma: the taps within int(3.5 sigma) of the centre, normalised (a sigma under
    2/7 leaves the centre tap alone: no blur, as on the CPU)."""
    radius = int(3.5 * max_sigma)
    taps = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    sigma = sigma.float()[:, None]
    weights = torch.exp(-0.5 * (taps[None] / sigma) ** 2)
    weights = weights * (taps[None].abs() <= torch.floor(3.5 * sigma))
    return weights / weights.sum(dim=1, keepdim=True)


def gaussian_blur(images: torch.Tensor, apply: torch.Tensor, sigma: torch.Tensor,
                  max_sigma: float) -> torch.Tensor:
    """Each sample where ``apply`` blurred with its own sigma (:func:`gaussian_kernels`, separable,
    reflect-101 border as cv2's default; kornia's ``filter2d_separable``)."""
    from kornia.filters import filter2d_separable

    rows = torch.nonzero(apply).squeeze(1)
    if not rows.numel():
        return images
    kernels = gaussian_kernels(sigma[rows], max_sigma).to(images.dtype)
    out = images.clone()
    out[rows] = filter2d_separable(images[rows], kernels, kernels, border_type="reflect")
    return out


def solarize(images: torch.Tensor, apply: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    return torch.where(apply[:, None, None, None] & (images >= threshold), 1 - images, images)


def apply_view(images: torch.Tensor, spec: ViewSpec, params: ViewParams) -> torch.Tensor:
    """``images`` (N x 3 x H x W float in [0, 1], padded) -> the normalised view N x 3 x S x S of ``spec``."""
    x = crop_resize(images, params.top, params.left, params.height, params.width, spec.size, spec.interpolation)
    x = torch.where(params.flip[:, None, None, None], x.flip(-1), x)
    if spec.jitter_prob:
        x = color_jitter(x, params.jitter, params.factors, params.order)
    if spec.grayscale_prob:
        x = grayscale(x, params.grayscale)
    if spec.blur_prob:
        x = gaussian_blur(x, params.blur, params.sigma, spec.blur_sigma[1])
    if spec.solarize_prob:
        x = solarize(x, params.solarize)
    mean = torch.tensor(spec.mean, device=x.device, dtype=x.dtype)[None, :, None, None]
    std = torch.tensor(spec.std, device=x.device, dtype=x.dtype)[None, :, None, None]
    return (x - mean) / std


def to_float_images(batch: torch.Tensor) -> torch.Tensor:
    """N x H x W x 3 uint8 (as the loader collates decoded images) -> N x 3 x H x W float32 in [0, 1] (a
    permuted view: channels_last in memory)."""
    return batch.permute(0, 3, 1, 2).float().div_(255)


def device_views(batch: torch.Tensor, sizes: torch.Tensor, specs: list[ViewSpec],
                 generator: torch.Generator) -> list[torch.Tensor]:
    """The views of ``specs`` of a batch of decoded images (N x H x W x 3 uint8, padded to the largest by
    repeating edges; ``sizes``: N x 2, each image's height and width), drawn from ``generator``."""
    images = to_float_images(batch)
    sizes = sizes.to(images.device)
    return [apply_view(images, spec, sample_view_params(spec, sizes, generator)) for spec in specs]


def pad_collate(batch: list[tuple[torch.Tensor, int, int]]) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                                                       torch.Tensor, torch.Tensor]:
    """DataLoader ``collate_fn`` of decoded images (H x W x 3 uint8 tensors of any sizes): one N x H x W x 3
    uint8 batch padded to the largest height and width by repeating each image's last row and column, each
    image's size (N x 2), the labels and the indices."""
    images = [item[0] for item in batch]
    sizes = torch.tensor([image.shape[:2] for image in images], dtype=torch.long)
    height, width = int(sizes[:, 0].max()), int(sizes[:, 1].max())
    canvas = torch.empty((len(images), height, width, 3), dtype=torch.uint8)
    for i, image in enumerate(images):
        h, w = image.shape[:2]
        canvas[i, :h, :w] = image
        canvas[i, h:, :w] = image[h - 1:h]
        canvas[i, :, w:] = canvas[i, :, w - 1:w]
    labels = torch.tensor([item[1] for item in batch], dtype=torch.long)
    index = torch.tensor([item[2] for item in batch], dtype=torch.long)
    return (canvas, sizes), labels, index


__all__ = ["ViewParams", "ViewSpec", "apply_view", "color_jitter", "crop_resize", "device_views",
           "gaussian_blur", "gaussian_kernels", "grayscale", "pad_collate", "sample_crops", "sample_view_params",
           "solarize"]
