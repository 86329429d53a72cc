"""The GPU paths: SyncBatchNorm where the official recipes share BatchNorm statistics (and the per-worker
fallback on CPU workers), and, marked ``gpu`` (skipped with the reason where no CUDA GPU is visible): the
device views on CUDA, nccl, fp16 with the grad scaler, bf16, channels_last, torch.compile (MAE's pieces
too), faiss-gpu, and the GPU memory reported per epoch. ``bench/device_check.sh`` runs them on a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sslcore.config import resolve
from sslcore.engine.console import Console
from sslcore.engine.loop import Trainer
from sslcore.engine.rundir import RunDir
from sslcore.registry import Registry
from sslcore.testing import run_example_briefly
from sslcore.toolkit.device_views import ViewSpec, apply_view, sample_view_params

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"

#: whether each method's official multi-GPU code shares BatchNorm statistics over the global batch
OFFICIAL_SYNC_BN = {"simclr": True, "byol": True, "simsiam": True, "barlowtwins": True, "vicreg": True,
                    "swav": True, "deepclusterv2": True, "dino": True, "moco": False, "pcl": False, "mae": False,
                    "nnclr": False, "rotnet": False, "jigsaw": False}


def sync_batchnorm_of(trainer_device: str, world_size: int, model: torch.nn.Module) -> torch.nn.Module:
    trainer = SimpleNamespace(train_cfg={"sync_batchnorm": True}, session=SimpleNamespace(world_size=world_size),
                              device=torch.device(trainer_device), is_main=True, console=Console(interactive=False))
    return Trainer._sync_batchnorm(trainer, model)


def small_bn_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())


@pytest.mark.parametrize("method", sorted(OFFICIAL_SYNC_BN))
def test_method_alone_shares_batchnorm_statistics_as_its_official_code(method):
    registry = Registry(autoload=True)
    if method not in registry.components["method"]:
        pytest.skip(f"the plugin of {method} is not installed")
    resolved = resolve({"method": method, "data": {"name": "image_folder", "root": "/nowhere"}}, registry)
    assert resolved.as_dict()["train"]["sync_batchnorm"] is OFFICIAL_SYNC_BN[method]


def test_cpu_workers_keep_per_worker_batchnorm_and_say_so(capsys):
    """torch's SyncBatchNorm refuses CPU tensors; CPU workers keep BatchNorm2d, and the run says so once."""
    model = small_bn_model()
    assert sync_batchnorm_of("cpu", 2, model) is model and isinstance(model[1], torch.nn.BatchNorm2d)
    assert "stay per worker" in capsys.readouterr().out
    assert sync_batchnorm_of("cpu", 1, model) is model  # one worker: nothing to share


# -- on a GPU ---------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_sync_batchnorm_converts_on_gpu_workers():
    model = sync_batchnorm_of("cuda", 2, small_bn_model())
    assert isinstance(model[1], torch.nn.SyncBatchNorm)


@pytest.mark.gpu
def test_device_views_on_cuda_are_the_cpu_views():
    """The same parameters give the same views on CUDA as on the CPU; a CUDA generator repeats from its seed."""
    spec = ViewSpec(size=64, scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_prob=0.8, grayscale_prob=0.2,
                    blur_prob=0.5, solarize_prob=0.2, interpolation="bicubic")
    images = torch.rand(32, 3, 100, 90)
    params = sample_view_params(spec, torch.tensor([[100, 90]] * 32), torch.Generator().manual_seed(0))
    on_cuda = type(params)(**{k: v.cuda() for k, v in vars(params).items()})
    torch.testing.assert_close(apply_view(images.cuda(), spec, on_cuda).cpu(), apply_view(images, spec, params),
                               atol=2e-4, rtol=0)
    registry = Registry(autoload=False)
    augmentation = registry.build("augmentation", {"name": "dino", "size": 64, "local_size": 32})
    batch = torch.randint(0, 256, (16, 80, 72, 3), dtype=torch.uint8, device="cuda")
    sizes = torch.tensor([[80, 72]] * 16, device="cuda")
    first = augmentation.device_views(batch, sizes, torch.Generator(device="cuda").manual_seed(1))
    again = augmentation.device_views(batch, sizes, torch.Generator(device="cuda").manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


@pytest.mark.gpu
@pytest.mark.parametrize(("example", "settings"), [
    ("moco_cifar10.yaml", ("train.precision=fp16",)),  # fp16: the grad scaler
    ("byol_cifar10.yaml", ("train.precision=bf16", "train.channels_last=true")),
    ("mae_cifar10.yaml", ("train.precision=bf16", "train.compile=true")),  # MAE's encoder blocks compiled
    ("moco_cifar10.yaml", ("augmentation.device=false",)),  # views from the loader workers
])
def test_short_run_on_a_gpu(cifar10_dir, tmp_path, example, settings):
    run = run_example_briefly(EXAMPLES / example, cifar10_dir, tmp_path, "scaling.use_gpu=true",
                              "train.max_steps_per_epoch=4", *settings)
    summary = RunDir(run).read_summary()
    assert summary["device"].startswith("cuda")
    on_device = "augmentation.device=false" not in settings
    assert summary["views_made_on"].startswith("cuda") if on_device else summary["views_made_on"] == "loader"
    assert np.isfinite(summary["final"]["loss"]) and summary["final"]["gpu_memory_gib"] > 0


@pytest.mark.gpu
@pytest.mark.ray
def test_a_ray_worker_on_a_gpu_trains_under_nccl(cifar10_dir, tmp_path):
    run = run_example_briefly(EXAMPLES / "moco_cifar10.yaml", cifar10_dir, tmp_path, "scaling.backend=ray",
                              "scaling.use_gpu=true", "scaling.num_workers=1")
    summary = RunDir(run).read_summary()
    assert summary["process_group"] == "nccl" and summary["views_made_on"].startswith("cuda")


@pytest.mark.gpu
def test_faiss_gpu_kmeans_finds_the_cpu_clusters():
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        pytest.skip("faiss-gpu is not installed (pip install 'sslcore[gpu]')")
    from sklearn.metrics import adjusted_rand_score

    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 32, generator=generator) * 10
    labels = torch.arange(2000) % 10
    features = centres[labels] + torch.randn(2000, 32, generator=generator)
    registry = Registry(autoload=False)
    results = {device: registry.build("clustering", {"name": "faiss_kmeans", "num_clusters": [10],
                                                     "device": device}).fit(features)[0]
               for device in ("cpu", "gpu")}
    assert adjusted_rand_score(results["cpu"].assignments, results["gpu"].assignments) == 1.0
    assert adjusted_rand_score(labels, results["gpu"].assignments) == 1.0


@pytest.mark.ray
def test_the_device_check_runs_on_the_cpu(tmp_path):
    """``bench/device_check.sh --cpu``: every part that can run without a GPU, into one folder (lightly's row
    only where bench/.venv-lightly exists)."""
    out = tmp_path / "check"
    result = subprocess.run(["bash", str(REPO / "bench" / "device_check.sh"), "--cpu", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=1200, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    summary = (out / "summary.md").read_text()
    assert "| gpu tests | skipped |" in summary and "needs a CUDA GPU" in summary
    assert "| throughput | passed |" in summary and "| moco run | passed |" in summary
    table = (out / "throughput.md").read_text()
    for model in ("ResNet-18, CIFAR stem, 32 px", "ViT-S/16"):
        for row in ("model only", "end to end, CPU augmentation", "end to end, device augmentation"):
            assert any(model in line and row in line for line in table.splitlines()), (model, row, table)
    assert (out / "moco" / "summary.json").is_file() and (out / "pytest_gpu.xml").is_file()
