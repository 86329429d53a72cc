"""timm encoders: ``encoder: {name: timm, model: resnet50 | convnext_tiny | vit_small_patch16_224 | ...}``, any
architecture of timm (pytorch-image-models), randomly initialised: nothing is ever downloaded.

timm is an optional dependency (``pip install sslcore[timm]``). The encoder is registered without it, and
importing timm waits until a ``timm`` block is validated (about 1.5 s that other experiments do not pay), so an
experiment naming it without timm installed gets one line saying what to install.

The encoder IS the model that ``timm.create_model(model, pretrained=False, num_classes=0, **kwargs)`` builds,
with ``feature_dim`` (timm's ``num_features``) and ``input_size`` set on it, and its forward is timm's: the
pooled features, N x feature_dim (``num_classes=0`` makes the classifier an identity). A wrapper would prefix
every key and a renamed copy would have to follow timm's layout; this way the ``state_dict`` that ``sslcore
export`` writes has timm's own keys and loads strictly, with no sslcore installed, into the same call::

    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=4)
    model.load_state_dict(torch.load("backbone.pt", weights_only=True))

its keyword arguments being those of the block that it sets (:meth:`TimmConfig.create_kwargs`). A timm ViT
that runs as MAE runs a ViT's pieces is also a :class:`~sslcore.api.hookspecs.PatchEncoder`
(:class:`sslcore.components.timm_vit.TimmVisionTransformer`, the same module tree).
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from sslcore import hookimpl
from sslcore.api.hookspecs import PatchEncoder, RegisterEncoder
from sslcore.components.encoders import sincos_position_embedding

INSTALL = "pip install sslcore[timm]"

#: the block's keys that are keyword arguments of timm.create_model, passed only when set
CREATE_KEYS = ("img_size", "patch_size", "dynamic_img_size", "drop_path_rate")


class TimmConfig(BaseModel):
    """Parameters of a timm encoder: the architecture and the few keyword arguments sslcore needs of it."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        description="A timm architecture, as timm.list_models() names it (resnet50, convnext_tiny, "
                    "vit_small_patch16_224, ...); built with pretrained=False and num_classes=0.",
        examples=["resnet18", "convnext_tiny", "vit_small_patch16_224"])
    img_size: int | None = Field(
        None, gt=0, description="For models of one input size (ViTs): the image side in pixels, which the "
                                "augmentation's size must equal unless dynamic_img_size; default the model's own "
                                "(224 for vit_*_224); 32 for CIFAR-10. Models that take any size (ResNets, "
                                "ConvNeXts) have none.")
    patch_size: int | None = Field(
        None, gt=0, description="For ViTs: the side of the patches in pixels; default the model's (16 for "
                                "*_patch16_*); 4 at 32 px gives 64 patches.")
    dynamic_img_size: bool | None = Field(
        None, description="For ViTs: true accepts any image side that patch_size divides, the position "
                          "embeddings interpolated to the image's grid (timm's resample_abs_pos_embed, bicubic), "
                          "for multi-crop (DINO, SwAV); default the model's (false).")
    drop_path_rate: float | None = Field(
        None, ge=0, lt=1, description="Stochastic depth (Huang et al. 2016), timm's per-block linear rule; "
                                      "default the model's (0; DINO: 0.1 for ViT-S/16).")
    position_embedding: Literal["learned", "sincos"] = Field(
        "learned", description="For ViTs: 'learned', timm's trained position embeddings; 'sincos', fixed 2-D "
                               "sine-cosine ones, not trained, as MAE's official code (models_mae.py, built on "
                               "timm) and MoCo v3 use. Either way the values sit in timm's pos_embed.")

    @model_validator(mode="before")
    @classmethod
    def _timm_is_installed(cls, data: Any) -> Any:
        try:
            import timm  # noqa: F401
        except ImportError:
            raise ValueError(f"timm is not installed: {INSTALL}") from None
        return data

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str) -> str:
        import timm

        if timm.is_model(name):
            return name
        if ":" in name:  # hf-hub:... and local-dir:... read a configuration at build time
            raise ValueError(f"'{name}' names a model outside timm's registry, which sslcore never fetches; "
                             f"name an architecture of timm.list_models()")
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" — did you mean {', '.join(repr(c) for c in close)}?" if close else \
            "; timm.list_models() lists them (timm.list_models('vit_*'): those matching a pattern)"
        raise ValueError(f"unknown timm model '{name}'{hint}")

    def create_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``timm.create_model(self.model, **kwargs)``: no pretrained weights, no
        classifier, and those of :data:`CREATE_KEYS` the block sets (timm's defaults stand for the rest)."""
        return {"pretrained": False, "num_classes": 0,
                **self.model_dump(include=set(CREATE_KEYS), exclude_none=True)}


def has_patch_pieces(model: nn.Module) -> bool:
    """Whether a timm model runs as a :class:`PatchEncoder`'s pieces say (CLS token plus position embedding,
    patches plus theirs, the blocks, the norm): timm's ``VisionTransformer`` itself (not a subclass with other
    tokens) with one CLS token, no register tokens, position embeddings that include the CLS token's, no norm
    before the blocks and square patches."""
    from timm.models.vision_transformer import VisionTransformer

    return (type(model) is VisionTransformer and model.has_class_token and model.num_prefix_tokens == 1
            and not model.no_embed_class and model.pos_embed is not None and isinstance(model.norm_pre, nn.Identity)
            and len(set(model.patch_embed.patch_size)) == 1 and len(set(model.patch_embed.grid_size)) == 1)


def _create(config: TimmConfig) -> nn.Module:
    """``timm.create_model``; a keyword argument the architecture does not take is a one-line ValueError."""
    import timm

    kwargs = config.create_kwargs()
    try:
        return timm.create_model(config.model, **kwargs)
    except TypeError as exc:  # the model class's __init__: "got an unexpected keyword argument 'img_size'"
        refused = [key for key in CREATE_KEYS if key in kwargs and f"'{key}'" in str(exc)]
        if not refused:
            raise
        raise ValueError(f"timm model '{config.model}' takes no {refused[0]}; remove it from the encoder "
                         f"block") from None


def timm_encoder(config: TimmConfig) -> nn.Module:
    """The timm model of ``config`` with ``feature_dim`` (timm's ``num_features``) and ``input_size``: the image
    side of a model of one input size (timm's ``pretrained_cfg['fixed_input_size']``, a ViT without
    ``dynamic_img_size``), None for one that takes any (ResNets, ConvNeXts). A ViT with the pieces of a
    :class:`PatchEncoder` (:func:`has_patch_pieces`) becomes a ``TimmVisionTransformer``; ``position_embedding:
    sincos`` fills its ``pos_embed`` with the fixed sine-cosine table (zeros for the CLS token) and freezes it."""
    model = _create(config)
    pieces = has_patch_pieces(model)
    if config.position_embedding == "sincos":
        if not pieces:
            raise ValueError(f"position_embedding: sincos needs a timm ViT with a CLS token and position "
                             f"embeddings for it; '{config.model}' is a {type(model).__name__}")
        width, grid = model.embed_dim, model.patch_embed.grid_size[0]
        with torch.no_grad():
            model.pos_embed.copy_(torch.cat([torch.zeros(1, width), sincos_position_embedding(width, grid)])[None])
        model.pos_embed.requires_grad_(False)  # a parameter still, so its key is timm's; not trained, as MAE's
    if pieces:
        from sslcore.components.timm_vit import TimmVisionTransformer

        # timm's entrypoints construct VisionTransformer itself; the subclass adds no state, only the pieces' names
        model.__class__ = TimmVisionTransformer
    fixed = model.pretrained_cfg.get("fixed_input_size", False) and not config.dynamic_img_size
    model.feature_dim = model.num_features
    model.input_size = (config.img_size or model.pretrained_cfg["input_size"][-1]) if fixed else None
    return model


@hookimpl
def register_encoders(register: RegisterEncoder) -> None:
    # provides: the most a timm encoder is, a PatchEncoder (for a ViT), so that validate lets `method: mae` take
    # one; naming TimmVisionTransformer here would import timm at every registry load. A model without the
    # pieces is refused by the slot's check of the built encoder, which names what it lacks.
    register("timm", timm_encoder, config=TimmConfig, provides=PatchEncoder)
