"""Every built-in component meets the contract of its kind (sslcore.contract), as any plugin's must."""

from __future__ import annotations

import pytest

from sslcore.registry import Registry
from sslcore.testing import check_component

BUILTINS = Registry(autoload=False)
COMPONENTS = [(kind, name) for kind, names in BUILTINS.components.items() for name in names]


def test_every_kind_has_builtins() -> None:
    kinds = {kind for kind, _ in COMPONENTS}
    assert {"augmentation", "encoder", "negative_source", "loss", "evaluator", "dataset"} <= kinds


@pytest.mark.parametrize(("kind", "name"), COMPONENTS, ids=[f"{k}:{n}" for k, n in COMPONENTS])
def test_builtin_component_meets_the_contract(kind: str, name: str) -> None:
    check_component(Registry(autoload=False), kind, name)


def test_contract_catches_a_broken_component() -> None:
    from pydantic import BaseModel

    from sslcore import hookimpl

    class Broken:
        @hookimpl
        def register_encoders(self, register):
            import torch

            class NoFeatureDim(torch.nn.Module):
                feature_dim = 7

                def forward(self, x):
                    return x.mean(dim=(2, 3))  # 3 features, not 7

            register("broken_encoder", lambda config: NoFeatureDim(), config=BaseModel)

    registry = Registry(autoload=False)
    registry.add_plugin(Broken(), name="broken")
    with pytest.raises(AssertionError, match="broken_encoder"):
        check_component(registry, "encoder", "broken_encoder")
