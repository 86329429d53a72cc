"""The memory bank (InstDisc, Wu et al. 2018): its update rule, the exclusion of each image from its own
negatives, replicated state on two real gloo workers, and resume through checkpoints and a real run."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from sslcore.api.errors import TrainingError
from sslcore.components.negatives import MemoryBankConfig, MemoryBankNegatives
from sslcore.testing import run_distributed

DIM = 4


def make_bank(dataset_size: int = 16, **config: object) -> MemoryBankNegatives:
    return MemoryBankNegatives(MemoryBankConfig(**config), dim=DIM, global_batch_size=4, dataset_size=dataset_size)


def unit(n: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed)), dim=1)


def instdisc_update(bank: torch.Tensor, index: list[int], keys: torch.Tensor, m: float) -> torch.Tensor:
    """lemniscate.pytorch's update, row by row in batch order: v <- (m v + (1 - m) k) / ||m v + (1 - m) k||."""
    bank = bank.clone()
    for i, k in zip(index, keys):
        v = m * bank[i] + (1 - m) * k
        bank[i] = v / v.norm()
    return bank


def test_bank_starts_as_random_unit_vectors_and_logs_its_memory(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="sslcore.components.negatives"):
        source = MemoryBankNegatives(MemoryBankConfig(), dim=128, global_batch_size=256, dataset_size=50000)
    assert "memory_bank: 50000 x 128 float32 = 24.4 MiB on every worker" in caplog.text
    assert source.bank.shape == (50000, 128) and source.bank.dtype == torch.float32
    torch.testing.assert_close(source.bank.norm(dim=1), torch.ones(50000))
    assert set(source.state_dict()) == {"bank", "step"}
    assert torch.equal(make_bank(seed=1).bank, make_bank(seed=1).bank)  # every worker starts from the same bank


@pytest.mark.parametrize("m", [0.5, 0.0, 0.9])
def test_update_follows_the_instdisc_formula(m: float) -> None:
    source = make_bank(momentum=m)
    before = source.bank.clone()
    keys = unit(3, seed=1).bfloat16()  # as under autocast: stored in float32 all the same

    source.update(keys, torch.tensor([7, 2, 11]))

    expected = instdisc_update(before, [7, 2, 11], keys.float(), m)
    assert source.bank.dtype == torch.float32
    torch.testing.assert_close(source.bank, expected)
    untouched = [i for i in range(16) if i not in (7, 2, 11)]
    assert torch.equal(source.bank[untouched], before[untouched])
    assert int(source.step) == 1


def test_an_image_twice_in_the_batch_keeps_its_last_key() -> None:
    source = make_bank(momentum=0.5)
    before = source.bank.clone()
    keys = unit(3, seed=2)
    source.update(keys, torch.tensor([5, 1, 5]))
    torch.testing.assert_close(source.bank, instdisc_update(before, [1, 5], keys[1:], 0.5))


def test_an_image_is_never_its_own_negative() -> None:
    source = make_bank(dataset_size=8, num_negatives=64)  # 64 draws of 8 ids: each image is drawn
    index = torch.tensor([6, 0, 3])
    negatives, exclude = source.negatives(unit(3, seed=3), unit(3, seed=4), index)

    assert negatives.shape == (64, DIM) and exclude.shape == (3, 64)
    drawn = torch.cdist(negatives, source.bank).argmin(dim=1)  # which bank row each negative is
    assert torch.equal(negatives, source.bank[drawn])
    for i, image in enumerate(index.tolist()):
        assert exclude[i].tolist() == [d == image for d in drawn.tolist()]
        assert exclude[i].any(), "the test needs each image drawn at least once"


def test_draws_are_uniform_shared_and_reproducible() -> None:
    source = make_bank(dataset_size=10, num_negatives=1000, seed=7)
    first = source.draw()
    assert torch.equal(first, make_bank(dataset_size=10, num_negatives=1000, seed=7).draw())
    counts = torch.bincount(first, minlength=10)
    assert counts.min() > 60 and counts.max() < 140  # 100 expected per id
    source.update(unit(2, seed=5), torch.tensor([0, 1]))
    assert not torch.equal(source.draw(), first)  # a fresh draw each step
    assert not torch.equal(make_bank(dataset_size=10, num_negatives=1000, seed=8).draw(), first)


def test_negatives_are_a_copy_that_update_does_not_change() -> None:
    source = make_bank()
    negatives, _ = source.negatives(unit(2, seed=1), unit(2, seed=2), torch.tensor([0, 1]))
    before = negatives.clone()
    source.update(unit(16, seed=3), torch.arange(16))
    assert torch.equal(negatives, before) and not negatives.requires_grad


def test_the_positive_is_the_images_own_entry_as_in_instdisc() -> None:
    source = make_bank()
    source.update(unit(16, seed=3), torch.arange(16))
    k, index = unit(3, seed=4), torch.tensor([5, 0, 5])
    positive = source.positive(k, index)
    assert torch.equal(positive, source.bank[[5, 0, 5]])
    source.update(unit(3, seed=5), index)
    assert not torch.equal(positive, source.bank[[5, 0, 5]])  # a copy, as backward() needs it after update()
    assert make_bank(positive="key").positive(k, index) is k  # the key of the method's other view


def test_moco_contrasts_each_query_with_its_bank_entry(registry) -> None:
    """MoCo's loss with a memory bank is InfoNCE of q against v_index (positive) and the drawn entries, written
    out here: -log exp(q.v_i / t) / (exp(q.v_i / t) + sum over drawn j != i of exp(q.v_j / t))."""
    from sslcore_moco import MoCo, MoCoConfig

    from sslcore.engine.context import MethodContext
    from sslcore.testing import built_slots, tiny_encoder

    torch.manual_seed(0)
    context = MethodContext(world_size=1, rank=0, global_batch_size=4, steps_per_epoch=1, epochs=1,
                            device=torch.device("cpu"), dataset_size=16)
    bank = MemoryBankNegatives(MemoryBankConfig(num_negatives=32), dim=8, global_batch_size=4, dataset_size=16)
    loss = registry.build("loss", {"name": "info_nce", "temperature": 0.2})
    moco = MoCo(MoCoConfig(momentum=0.0, dim=8, head_hidden_dim=16, shuffle_bn="off"), context=context,
                slots=built_slots(encoder=tiny_encoder(), negatives=bank, loss=loss))
    index = torch.tensor([2, 7, 11, 2])
    entries, ids = bank.bank.clone(), bank.draw()
    views = [torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)]
    with torch.no_grad():
        q = F.normalize(moco.head(moco.backbone(views[0])), dim=1)
    expected = []
    for i, image in enumerate(index.tolist()):
        positive = torch.exp(q[i] @ entries[image] / 0.2)
        negatives = sum(torch.exp(q[i] @ entries[j] / 0.2) for j in ids.tolist() if j != image)
        expected.append(-torch.log(positive / (positive + negatives)))
    out = moco(views, index)
    torch.testing.assert_close(out["loss"].detach(), torch.stack(expected).mean(), rtol=1e-4, atol=1e-5)


def test_the_dataset_index_is_required() -> None:
    source = make_bank()
    with pytest.raises(TrainingError, match=r"memory_bank needs the dataset index .* use negatives: \{name: queue\}"):
        source.negatives(unit(2, seed=1), unit(2, seed=2))
    with pytest.raises(TrainingError, match="memory_bank needs the dataset index"):
        source.update(unit(2, seed=2))


def test_state_dict_round_trip_restores_bank_and_draws(tmp_path: Path) -> None:
    source = make_bank(momentum=0.5)
    for step in range(3):
        source.update(unit(4, seed=step), torch.arange(4) + 4 * step)
    torch.save(source.state_dict(), tmp_path / "bank.pt")

    restored = make_bank(momentum=0.5)  # a fresh bank of the same config, as a resumed run builds
    assert not torch.equal(restored.bank, source.bank)
    restored.load_state_dict(torch.load(tmp_path / "bank.pt", weights_only=True))
    assert torch.equal(restored.bank, source.bank) and int(restored.step) == 3
    assert torch.equal(restored.draw(), source.draw())
    # a bank of another size (the data changed) does not load
    with pytest.raises(RuntimeError, match="size mismatch for bank"):
        make_bank(dataset_size=8).load_state_dict(torch.load(tmp_path / "bank.pt", weights_only=True))


# -- two real processes over gloo ------------------------------------------------------------------------

BATCHES = {0: [[0, 1], [4, 9]], 1: [[9, 12], [4, 5]]}  # step 2: image 4 on both workers (sampler padding)


def _two_steps(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    source = make_bank(momentum=0.5, num_negatives=8)
    initial = source.bank.clone()
    out: dict[str, torch.Tensor] = {"initial": initial}
    for step, index in enumerate(BATCHES[rank]):
        keys = unit(2, seed=10 * rank + step)
        negatives, exclude = source.negatives(keys, keys, torch.tensor(index))
        source.update(keys, torch.tensor(index))
        out |= {f"negatives{step}": negatives, f"exclude{step}": exclude, f"keys{step}": keys}
    return out | {"bank": source.bank, "step": source.step}


def test_two_gloo_workers_hold_the_same_bank() -> None:
    rank0, rank1 = run_distributed(_two_steps, world_size=2)

    assert torch.equal(rank0["bank"], rank1["bank"])
    assert int(rank0["step"]) == int(rank1["step"]) == 2
    assert torch.equal(rank0["initial"], rank1["initial"])
    # one draw per step, the same on both workers; each worker excludes its own images
    assert all(torch.equal(rank0[f"negatives{step}"], rank1[f"negatives{step}"]) for step in range(2))
    drawn = torch.cdist(rank0["negatives0"], rank0["initial"]).argmin(dim=1)
    for rank, result in ((0, rank0), (1, rank1)):
        assert torch.equal(result["exclude0"], torch.tensor(BATCHES[rank][0])[:, None] == drawn[None, :])
    # the keys of both workers, in rank order, went to their images; image 4 keeps rank 1's (the last) key
    expected = instdisc_update(rank0["initial"], [*BATCHES[0][0], *BATCHES[1][0]],
                               torch.cat([rank0["keys0"], rank1["keys0"]]), 0.5)
    expected = instdisc_update(expected, [9, 4, 5], torch.cat([rank0["keys1"][1:], rank1["keys1"]]), 0.5)
    torch.testing.assert_close(rank0["bank"], expected)


# -- a real run, interrupted and resumed -------------------------------------------------------------------

def _experiment(folder: Path, subset: dict[str, Path], epochs: int) -> Path:
    config = {
        "name": "bank", "output_dir": str(folder / "runs"), "seed": 3,
        "method": {"name": "moco", "momentum": 0.0, "bn_splits": 2, "head_hidden_dim": 32, "dim": 16},
        "encoder": {"name": "resnet18", "cifar_stem": False},
        "augmentation": {"name": "moco_v2", "size": 32},
        "negatives": {"name": "memory_bank", "num_negatives": 64},
        "data": {"name": "image_folder", "root": str(subset["train"])},
        # constant lr: the run of 1 epoch and the run of 2 follow the same schedule
        "train": {"epochs": epochs, "batch_size": 16, "max_steps_per_epoch": 3, "log_every_steps": 1,
                  "schedule": "constant", "optimizer": {"name": "sgd", "lr": 0.05}},
        "scaling": {"backend": "local"}, "evaluators": [],
        "tracking": {"aim": None, "progress_bar": False}, "plugins": ["sslcore_moco.plugin"],
    }
    folder.mkdir()
    path = folder / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _sslcore(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SSLCORE_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONUNBUFFERED": "1"}
    out = subprocess.run([sys.executable, "-m", "sslcore", *args], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return out


def _last_state(run_dir: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if r["subset"] == "train" and r["epoch"] == 1]
    checkpoint = sorted(run_dir.glob("checkpoint_*/state.pt"))[-1]
    return losses, torch.load(checkpoint, weights_only=True)["model"]


def test_a_resumed_run_continues_with_the_same_bank(tmp_path: Path, cifar10_subset: dict) -> None:
    _sslcore("run", str(_experiment(tmp_path / "straight", cifar10_subset, epochs=2)))
    straight_losses, straight = _last_state(tmp_path / "straight" / "runs" / "bank")

    _sslcore("run", str(_experiment(tmp_path / "resumed", cifar10_subset, epochs=1)))
    run_dir = tmp_path / "resumed" / "runs" / "bank"
    out = _sslcore("run", "--resume", str(run_dir), "--set", "train.epochs=2")
    assert "resuming" in out.stdout
    resumed_losses, resumed = _last_state(run_dir)

    assert len(straight_losses) == 3 and resumed_losses == straight_losses  # bit for bit
    bank = "negative_source.bank"
    assert resumed[bank].shape == (200, 16) and int(resumed["negative_source.step"]) == 6
    assert torch.equal(resumed[bank], straight[bank])
