"""The plugin test kit (sslcore.testing) fails when it should: W real gloo workers whose loss or gradients are
not one process's, an entry point that registers other components or fails to load, no CIFAR-10 images; and
passes where all is right."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from sslcore.api.hookspecs import Method
from sslcore.testing import check_entry_point, check_workers_match_one_process, find_cifar10_images, tiny_encoder
from sslcore.toolkit.distributed import concat_all_gather, gather_with_grad, rank

BATCH = 8


def embeddings() -> list[torch.Tensor]:
    """The global batch: BATCH x 4."""
    return [torch.randn(BATCH, 4, generator=torch.Generator().manual_seed(0))]


class GlobalBatchVariance(nn.Module):
    """The variance of every entry of the global batch's rows, gathered with their gradient: a loss without
    parameters, every worker's the same."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return gather_with_grad(z).var()


def global_batch_variance() -> nn.Module:
    return GlobalBatchVariance()


def linear() -> nn.Module:
    return nn.Linear(4, 3)


def variance_without_the_other_workers_gradient(model: nn.Module, inputs: list[torch.Tensor]) -> torch.Tensor:
    """The global batch's variance with the other workers' rows gathered without gradient (the local rows put
    back with theirs): the value of one process, but each worker's gradient reaches only its own rows."""
    z = model(inputs[0])
    everyone, start = concat_all_gather(z), rank() * len(z)
    return torch.cat([everyone[:start], z, everyone[start + len(z):]]).var()


class LocalBatchVariance(nn.Module, Method):
    """A method whose loss is the variance of the features of this worker's batch alone, not of the global one."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = tiny_encoder()

    def forward(self, views: list[torch.Tensor], index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {"loss": self.backbone(views[0]).var()}


def local_batch_variance() -> nn.Module:
    return LocalBatchVariance()


def images() -> list[torch.Tensor]:
    return [torch.randn(BATCH, 3, 8, 8, generator=torch.Generator().manual_seed(0))]


def test_a_loss_gathered_with_gradient_matches_one_process() -> None:
    # no parameters: the gradients compared are the inputs', the loss called as module(*inputs)
    check_workers_match_one_process(global_batch_variance, embeddings)


def test_workers_that_miss_the_other_workers_gradient_fail_on_the_gradients() -> None:
    with pytest.raises(AssertionError, match=r"rank 0: the gradient of (weight|bias) is not one process's"):
        check_workers_match_one_process(linear, embeddings, loss=variance_without_the_other_workers_gradient)


def test_a_method_whose_loss_sees_only_its_workers_batch_fails_on_the_loss() -> None:
    with pytest.raises(AssertionError, match=r"the mean of the 2 workers' losses .* is not the loss of one process"):
        check_workers_match_one_process(local_batch_variance, images)


def test_the_entry_point_of_the_example_plugin_registers_its_loss() -> None:
    check_entry_point("sslcore-debiased", [("loss", "debiased_info_nce")])


@pytest.mark.parametrize(("distribution", "components", "error"), [
    ("sslcore-debiased", [("loss", "info_nce")], "loss 'info_nce' is registered by 'sslcore', not by"),
    ("sslcore-debiased", [("method", "debiased_info_nce")], "registers no method 'debiased_info_nce'"),
    ("sslcore-debiased", [("losses", "debiased_info_nce")], "unknown kind 'losses'"),
    ("sslcore-no-such-plugin", [("loss", "info_nce")], "no sslcore entry point of the distribution"),
])
def test_a_wrong_component_list_fails(distribution: str, components: list[tuple[str, str]], error: str) -> None:
    with pytest.raises(AssertionError, match=error):
        check_entry_point(distribution, components)


def test_an_entry_point_that_fails_to_import_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A distribution installed on sys.path (its dist-info) whose entry point names a module that is not there."""
    info = tmp_path / "sslcore_broken-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sslcore-broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[sslcore]\nbroken = sslcore_broken_missing_module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(AssertionError, match="entry point of 'sslcore-broken' failed to load: 'broken'"):
        check_entry_point("sslcore-broken", [("loss", "broken")])


def test_cifar10_images_come_from_the_cache_that_setup_made_or_nowhere(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSLCORE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SSLCORE_CIFAR10_ARCHIVE", str(tmp_path / "no-archive.tar.gz"))
    assert find_cifar10_images() is None  # neither: the fixture fails, naming both
    for split in ("train", "test"):  # unpacked by setup, without the archive
        (tmp_path / "cache" / "cifar10" / split).mkdir(parents=True)
    assert find_cifar10_images() == tmp_path / "cache" / "cifar10"
