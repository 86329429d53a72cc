"""Vision Transformer encoders: shapes and sizes, CLS and mean pooling, the sin-cos position embeddings against
their formula written out here, the learned option, loading into plain torchvision, the encoder contract and
the errors for a wrong image size."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from sslcore.components.encoders import VIT_SIZES, ViTConfig, plain_torchvision_vit, vit_tiny
from sslcore.registry import Registry
from sslcore.testing import check_component

torch.set_num_threads(1)

SIZE, PATCH = 16, 4  # a 4 x 4 grid of patches


def tiny(**params) -> nn.Module:
    return vit_tiny(ViTConfig(**{"image_size": SIZE, "patch_size": PATCH, "depth": 2, **params}))


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def formula_sincos(dim: int, grid_size: int) -> list[list[float]]:
    """MAE's 2-D sin-cos embedding, one value at a time: patch l = row y * grid_size + column x; channel c < dim/2
    encodes x and c >= dim/2 encodes y, each half [sin(pos w_0), .., sin(pos w_{K-1}), cos(pos w_0), ..]
    with K = dim/4 and w_k = 1 / 10000^(k/K)."""
    k_count = dim // 4
    rows = []
    for y in range(grid_size):
        for x in range(grid_size):
            row = []
            for c in range(dim):
                position = x if c < dim // 2 else y
                j = c % (dim // 2)
                k = j % k_count
                angle = position / 10000 ** (k / k_count)
                row.append(math.sin(angle) if j < k_count else math.cos(angle))
            rows.append(row)
    return rows


def test_the_sizes_are_those_of_the_papers() -> None:
    # width, depth, heads: ViT-Ti and ViT-S of DeiT, ViT-B of the ViT paper
    assert VIT_SIZES == {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}
    assert len(vit_tiny(ViTConfig()).blocks) == 12  # without depth, the size's


@pytest.mark.parametrize("name", list(VIT_SIZES))
def test_each_size_is_built_with_its_width_and_heads(registry: Registry, name: str) -> None:
    width, _, heads = VIT_SIZES[name]
    encoder = registry.build("encoder", {"name": name, "image_size": SIZE, "patch_size": PATCH, "depth": 1})
    assert encoder.feature_dim == width and len(encoder.blocks) == 1
    assert encoder.blocks[0].num_heads == heads and encoder.blocks[0].self_attention.embed_dim == width
    assert encoder(images()).shape == (3, width)


def test_shapes_of_the_pieces() -> None:
    encoder = tiny()
    x = images()
    assert encoder.num_patches == 16 and encoder.grid_size == 4
    assert encoder.embed_patches(x).shape == (3, 16, 192)  # N x L x D
    assert encoder.position_embedding.shape == (1, 17, 192)  # CLS, then the L patches
    assert encoder.class_token.shape == (1, 1, 192)
    assert encoder.blocks(torch.randn(3, 5, 192)).shape == (3, 5, 192)  # any number of tokens
    assert encoder(x).shape == (3, 192) and encoder(x).dtype == torch.float32


def test_patch_embedding_is_the_patches_in_row_major_order() -> None:
    encoder = tiny()
    x = images(1)
    row, column = 2, 1  # patch 2 * 4 + 1
    patch = x[:, :, row * PATCH:(row + 1) * PATCH, column * PATCH:(column + 1) * PATCH]
    expected = encoder.conv_proj(patch).flatten(1)  # 1 x D
    torch.testing.assert_close(encoder.embed_patches(x)[:, row * 4 + column], expected)


def test_cls_and_mean_pooling_read_the_same_tokens() -> None:
    torch.manual_seed(0)
    cls = tiny(pool="cls")
    mean = tiny(pool="mean")
    mean.load_state_dict(cls.state_dict())
    x = images()
    position = cls.position_embedding
    tokens = torch.cat([(cls.class_token + position[:, :1]).expand(3, -1, -1),
                        cls.embed_patches(x) + position[:, 1:]], dim=1)
    out = cls.norm(cls.blocks(tokens))  # N x (1 + L) x D
    torch.testing.assert_close(cls(x), out[:, 0])
    torch.testing.assert_close(mean(x), out[:, 1:].mean(dim=1))
    assert not torch.allclose(cls(x), mean(x))


def test_sincos_position_embedding_matches_the_formula_and_is_not_trained() -> None:
    encoder = tiny()
    embedding = encoder.position_embedding[0]  # (1 + L) x D
    assert torch.equal(embedding[0], torch.zeros(192))  # the CLS token's
    torch.testing.assert_close(embedding[1:], torch.tensor(formula_sincos(192, 4)), rtol=0, atol=1e-6)
    names = [name for name, _ in encoder.named_parameters()]
    assert "encoder.pos_embedding" not in names and "encoder.pos_embedding" in encoder.state_dict()
    encoder(images()).sum().backward()
    assert all(p.grad is not None for p in encoder.parameters())


def test_learned_position_embedding_is_a_trained_parameter() -> None:
    torch.manual_seed(0)
    encoder = tiny(position_embedding="learned")
    parameter = dict(encoder.named_parameters())["encoder.pos_embedding"]
    assert parameter.shape == (1, 17, 192) and parameter.requires_grad
    assert 0.01 < parameter.std().item() < 0.03  # torchvision's N(0, 0.02^2)
    encoder(images()).sum().backward()
    assert parameter.grad is not None and parameter.grad.abs().sum() > 0


@pytest.mark.parametrize("position_embedding", ["sincos", "learned"])
def test_state_dict_loads_strictly_into_plain_torchvision(position_embedding: str) -> None:
    torch.manual_seed(0)
    encoder = tiny(position_embedding=position_embedding).eval()
    plain = plain_torchvision_vit("vit_tiny", SIZE, PATCH, depth=2).eval()
    plain.load_state_dict(encoder.state_dict(), strict=True)
    x = images()
    torch.testing.assert_close(plain(x), encoder(x))


def test_the_smallest_vit_meets_the_encoder_contract(registry: Registry) -> None:
    check_component(registry, "encoder", "vit_tiny")  # tests/test_contract.py runs every registered size


def test_an_image_of_another_size_is_a_clear_error() -> None:
    encoder = tiny()
    with pytest.raises(ValueError, match=r"takes N x 3 x 16 x 16 images, got \(2, 3, 32, 32\); set the encoder's "
                                         r"image_size to the augmentation's size"):
        encoder(torch.randn(2, 3, 32, 32))


def test_a_patch_size_that_does_not_divide_the_image_size_is_a_config_error(registry: Registry) -> None:
    with pytest.raises(ValidationError, match="patch_size 16 does not divide image_size 40; use a divisor of it"):
        registry.build("encoder", {"name": "vit_tiny", "image_size": 40, "patch_size": 16})


def test_a_dynamic_vit_interpolates_its_position_embeddings_to_other_sizes() -> None:
    import torch.nn.functional as F

    model = tiny(dynamic_img_size=True, position_embedding="learned").eval()
    assert model.input_size is None
    static = tiny(position_embedding="learned").eval()
    static.load_state_dict(model.state_dict())
    x = images()
    torch.testing.assert_close(model(x), static(x))  # the native size: the same features
    small = torch.randn(2, 3, 8, 12)  # a 2 x 3 grid of 4 px patches
    assert model(small).shape == (2, 192)
    # the 4 x 4 table resampled bicubically to 2 x 3 (timm's resample_abs_pos_embed), row-major
    table = model.position_embedding[:, 1:].reshape(1, 4, 4, 192).permute(0, 3, 1, 2)
    expected = F.interpolate(table, size=(2, 3), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(model.patch_position_embedding(2, 3), expected.permute(0, 2, 3, 1).reshape(1, 6, 192))
    with pytest.raises(ValueError, match="multiples of 4"):
        model(torch.randn(1, 3, 10, 12))


def test_drop_path_drops_whole_branches_per_sample_in_training_only() -> None:
    torch.manual_seed(0)
    model = tiny(drop_path_rate=0.5, depth=3)
    blocks = list(model.blocks)
    assert [block.drop_path.p for block in blocks] == [0.0, 0.25, 0.5]  # linear over the blocks
    plain = tiny(depth=3)
    assert plain.load_state_dict(model.state_dict()) is not None  # the same parameter names
    model.eval(), plain.eval()
    torch.testing.assert_close(model(images()), plain(images()))  # no drop in eval mode
    model.train()
    outputs = [model(images(8)) for _ in range(2)]
    assert not torch.equal(*outputs)  # a different set of samples skips the last blocks' branches
    exported = plain_torchvision_vit("vit_tiny", SIZE, PATCH, depth=3)
    exported.load_state_dict(model.state_dict())
