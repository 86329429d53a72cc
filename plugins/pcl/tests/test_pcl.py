"""PCL: phi and ProtoNCE against the official formulas written out here, the E-step on real CIFAR-10 images
(in-process, through a resume, and with 2 real Ray workers), the official recipe that ``method: pcl`` resolves
to, the loss slot that refuses a loss without prototypes, and the plugin contract."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from sslcore_pcl import (
    PCL,
    ProtoNCEConfig,
    ProtoNCELoss,
    Prototypes,
    PrototypicalLoss,
    concentration,
    sample_negative_prototypes,
)

from sslcore.api.errors import ConfigError
from sslcore.config import resolve
from sslcore.engine.rundir import RunDir
from sslcore.registry import Registry
from sslcore.testing import check_component, check_entry_point, run_cli


def official_density(distances: np.ndarray, im2cluster: np.ndarray, k: int, temperature: float) -> np.ndarray:
    """``run_kmeans`` of salesforce/PCL main_pcl.py, the concentration part, as written there."""
    dcluster = [[] for _ in range(k)]
    for im, i in enumerate(im2cluster):
        dcluster[i].append(distances[im])
    density = np.zeros(k)
    for i, dist in enumerate(dcluster):
        if len(dist) > 1:
            density[i] = (np.asarray(dist) ** 0.5).mean() / np.log(len(dist) + 10)
    dmax = density.max()
    for i, dist in enumerate(dcluster):
        if len(dist) <= 1:
            density[i] = dmax
    density = density.clip(np.percentile(density, 10), np.percentile(density, 90))
    return temperature * density / density.mean()


def test_concentration_matches_the_official_code() -> None:
    generator = torch.Generator().manual_seed(0)
    k = 12
    assignments = torch.randint(0, k - 2, (300,), generator=generator)  # clusters k-2 and k-1 stay empty
    assignments[0] = k - 2  # and cluster k-2 a singleton
    distances = torch.rand(300, generator=generator) * 2
    phi = concentration(distances, assignments, k, temperature=0.2)
    expected = official_density(distances.numpy().astype(np.float64), assignments.numpy(), k, 0.2)
    np.testing.assert_allclose(phi.numpy(), expected, rtol=1e-5)
    assert phi.mean().item() == pytest.approx(0.2)


def test_negative_prototypes_are_distinct_and_never_the_positive() -> None:
    generator = torch.Generator().manual_seed(0)
    positive = torch.randint(0, 50, (64,), generator=generator)
    negative = sample_negative_prototypes(positive, 50, r=20, generator=generator)
    assert negative.shape == (64, 20)
    assert not (negative == positive[:, None]).any()
    assert all(len(set(row)) == 20 for row in negative.tolist())
    # fewer other prototypes than r: all of them, each once
    few = positive % 8
    everything = sample_negative_prototypes(few, 8, r=16384)
    assert everything.shape == (64, 7)
    for row, pos in zip(everything.tolist(), few.tolist()):
        assert sorted(row) == [j for j in range(8) if j != pos]


def test_negative_prototypes_cover_all_others_uniformly() -> None:
    generator = torch.Generator().manual_seed(1)
    positive = torch.zeros(20000, dtype=torch.long)
    counts = torch.bincount(sample_negative_prototypes(positive, 11, r=3, generator=generator).flatten(), minlength=11)
    assert counts[0] == 0
    expected = 20000 * 3 / 10
    assert ((counts[1:] - expected).abs() < 0.05 * expected).all()


def test_proto_nce_matches_the_formula() -> None:
    generator = torch.Generator().manual_seed(0)
    n, d, queue_size, tau, r = 6, 8, 10, 0.2, 4
    q = F.normalize(torch.randn(n, d, generator=generator), dim=1)
    k = F.normalize(torch.randn(n, d, generator=generator), dim=1)
    queue = F.normalize(torch.randn(queue_size, d, generator=generator), dim=1)
    granularities = []
    for num in (7, 3):  # r = 4 sampled of 6 others; then all 2 others
        granularities.append(Prototypes(positive=torch.randint(0, num, (n,), generator=generator),
                                        centroids=F.normalize(torch.randn(num, d, generator=generator), dim=1),
                                        phi=torch.rand(num, generator=generator) * 0.3 + 0.05))
    loss_fn = ProtoNCELoss(ProtoNCEConfig(temperature=tau, num_negative_prototypes=r))
    logits = loss_fn.prototype_logits(q, granularities, generator=torch.Generator().manual_seed(5))
    loss = loss_fn(q, k, queue, None, prototype_logits=logits)

    # by hand: InfoNCE, then per granularity -log exp(q.c_s/phi_s) / sum_{j in {s} u R_i} exp(q.c_j/phi_j)
    sampler = torch.Generator().manual_seed(5)
    expected = 0.0
    for i in range(n):
        positive = math.exp(float(q[i] @ k[i]) / tau)
        expected += -math.log(positive / (positive + sum(math.exp(float(q[i] @ queue[j]) / tau)
                                                         for j in range(queue_size)))) / n
    proto = 0.0
    for protos in granularities:
        negatives = sample_negative_prototypes(protos.positive, protos.centroids.shape[0], r, sampler)
        for i in range(n):
            s = int(protos.positive[i])
            term = [math.exp(float(q[i] @ protos.centroids[j]) / float(protos.phi[j]))
                    for j in [s, *negatives[i].tolist()]]
            proto += -math.log(term[0] / sum(term)) / n
    expected += proto / len(granularities)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # without prototypes (PCL's warm-up) it is InfoNCE alone
    info_nce = loss_fn(q, k, queue, None)
    assert info_nce.item() == pytest.approx(expected - proto / 2, rel=1e-5)


def registry_with_pcl() -> Registry:
    registry = Registry(autoload=False)
    import sslcore_moco.plugin
    import sslcore_pcl.plugin

    registry.add_plugin(sslcore_moco.plugin, name="sslcore_moco.plugin")
    registry.add_plugin(sslcore_pcl.plugin, name="sslcore_pcl.plugin")
    return registry


def test_pcl_and_proto_nce_meet_the_contract() -> None:
    registry = registry_with_pcl()
    check_component(registry, "method", "pcl")
    check_component(registry, "loss", "proto_nce")


def test_the_installed_entry_point_registers_pcl() -> None:
    check_entry_point("sslcore-pcl", [("method", "pcl"), ("loss", "proto_nce")])


def test_method_pcl_alone_is_the_official_imagenet_recipe() -> None:
    """salesforce/PCL main_pcl.py @ 964da1f with the README's PCL v2 flags (--mlp --aug-plus --cos): its
    argparse defaults --lr 0.03, --momentum 0.9, --wd 1e-4, -b 256, --epochs 200, --cos (cosine, no lr warmup:
    --warmup-epoch 20 is the InfoNCE-only epochs), ``torch.optim.SGD(model.parameters(), ...)`` (weight decay on
    every parameter); --temperature 0.2, --pcl-r 16384 (queue and negative prototypes), --num-cluster
    25000,50000,100000, resnet50."""
    resolved = resolve({"method": "pcl", "data": {"name": "image_folder", "root": "/nowhere"}},
                       registry_with_pcl()).as_dict()
    train = resolved["train"]
    assert train["optimizer"] == {"name": "sgd", "lr": 0.03, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": False}
    assert train["lr_scaling"] == "linear" and train["batch_size"] == 256 and train["epochs"] == 200
    assert train["schedule"] == "cosine" and train["final_lr"] == 0.0 and train["warmup_epochs"] == 0
    assert train["param_groups"] == {} and train["grad_clip"] is None and train["weight_decay_end"] is None
    assert resolved["method"]["warmup_epochs"] == 20 and resolved["method"]["mlp"] is True
    assert resolved["method"]["dim"] == 128 and resolved["method"]["momentum"] == 0.999
    assert resolved["encoder"]["name"] == "resnet50" and resolved["augmentation"]["name"] == "moco_v2"
    assert resolved["negatives"] == {"name": "queue", "size": 16384}
    assert resolved["loss"] == {"name": "proto_nce", "temperature": 0.2, "num_negative_prototypes": 16384}
    assert resolved["clustering"]["name"] == "faiss_kmeans"
    assert resolved["clustering"]["num_clusters"] == [25000, 50000, 100000]


def test_the_loss_slot_refuses_a_loss_without_prototypes() -> None:
    assert isinstance(ProtoNCELoss(ProtoNCEConfig()), PrototypicalLoss)
    with pytest.raises(ConfigError) as error:
        resolve({"method": "pcl", "loss": {"name": "info_nce"}, "data": {"name": "image_folder", "root": "/nowhere"}},
                registry_with_pcl())
    (line,) = error.value.args  # one error, on one line
    assert "\n" not in line and "loss.name" in line and "info_nce" in line
    assert line.endswith("proto_nce"), line  # the losses that fit: proto_nce alone


def experiment(tmp_path: Path, subset: dict[str, Path], **overrides: object) -> Path:
    """A small PCL run on real CIFAR-10 JPEGs: E-steps from the second epoch on, two granularities."""
    config = {
        "name": "pcl",
        "output_dir": str(tmp_path / "runs"),
        "seed": 1,
        "method": {"name": "pcl", "momentum": 0.99, "bn_splits": 2, "warmup_epochs": 1, "grid_prototypes": 3},
        "encoder": {"name": "resnet18", "cifar_stem": False},
        "augmentation": {"name": "moco_v2", "size": 32},
        "negatives": {"name": "queue", "size": 64},
        "loss": {"name": "proto_nce", "temperature": 0.2, "num_negative_prototypes": 5},
        "clustering": {"name": "faiss_kmeans", "num_clusters": [4, 10], "nredo": 1, "min_points_per_centroid": 1},
        "data": {"name": "image_folder", "root": str(subset["train"])},
        # a constant learning rate, so that a run stopped after 2 epochs and resumed with 3 repeats a 3-epoch one
        "train": {"epochs": 3, "batch_size": 16, "max_steps_per_epoch": 3, "log_every_steps": 1,
                  "optimizer": {"name": "sgd", "lr": 0.05}, "lr_scaling": "none", "schedule": "constant",
                  "warmup_epochs": 0},
        "scaling": {"backend": "local"},
        "evaluators": [],
        "checkpoint": {"every_epochs": 1, "keep": 3},
        "tracking": {"aim": None, "progress_bar": False},
        "plugins": ["sslcore_moco.plugin", "sslcore_pcl.plugin"],
    }
    config.update(overrides)
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def state(run_dir: Path, epoch: int) -> dict[str, torch.Tensor]:
    """The model state of the checkpoint at the end of ``epoch`` (one per epoch, all kept)."""
    return torch.load(RunDir(run_dir).checkpoints()[epoch], weights_only=True)["model"]


def test_e_steps_cluster_real_images_and_their_state_survives_resume(tmp_path: Path, cifar10_subset: dict) -> None:
    (tmp_path / "straight").mkdir()
    out = run_cli("run", str(experiment(tmp_path / "straight", cifar10_subset)), cwd=tmp_path, autoload=False)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    straight = tmp_path / "straight" / "runs" / "pcl"

    warmup = state(straight, 0)
    assert not warmup["clustered"] and (warmup["assignments"] == -1).all()  # epoch 1: InfoNCE only
    clustered = state(straight, 1)
    assert clustered["clustered"] and clustered["assignments"].shape == (2, 200)
    assert clustered["assignments"][0].max() < 4 and clustered["assignments"][1].max() < 10
    assert clustered["phi_1"].mean().item() == pytest.approx(0.2, rel=1e-4)
    torch.testing.assert_close(clustered["prototypes_1"].norm(dim=1), torch.ones(10))

    logged = records(straight)
    e_steps = [r for r in logged if r["subset"] == "epoch_start"]
    assert [r["epoch"] for r in e_steps] == [1, 2]
    assert e_steps[0]["e_step_seconds"] >= 0 and -1 <= e_steps[0]["ami_10"] <= 1 and 0 <= e_steps[0]["nmi_4"] <= 1
    assert sum(e_steps[0]["cluster_sizes_10"]["counts"]) == 10  # a histogram of the 10 cluster sizes
    train = [r for r in logged if r["subset"] == "train"]
    assert all("acc_proto_4" not in r for r in train if r["epoch"] == 0)
    assert all(0 <= r["acc_proto_4"] <= 1 and 0 <= r["acc_proto_10"] <= 1 for r in train if r["epoch"] > 0)
    assert (straight / "prototypes_epoch002.png").is_file() and (straight / "prototypes_epoch003.png").is_file()

    # stopped after epoch 2, then resumed: the restored E-step state is the one saved, and the third epoch
    # (whose E-step runs again from the restored weights) repeats the uninterrupted run
    (tmp_path / "resumed").mkdir()
    path = experiment(tmp_path / "resumed", cifar10_subset)
    out = run_cli("run", str(path), "--set", "train.epochs=2", cwd=tmp_path, autoload=False)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    resumed = tmp_path / "resumed" / "runs" / "pcl"
    for key in ("assignments", "prototypes_0", "phi_0", "prototypes_1", "phi_1", "clustered"):
        torch.testing.assert_close(state(resumed, 1)[key], clustered[key])
    from sslcore.engine.console import Console
    from sslcore.engine.loop import Trainer, WorkerSpec
    from sslcore.engine.session import LocalSession

    spec = WorkerSpec(experiment=yaml.safe_load((resumed / "config.yaml").read_text()), run_dir=str(resumed),
                      plugins=("sslcore_moco.plugin", "sslcore_pcl.plugin"), autoload=False, source="test")
    trainer = Trainer(spec, LocalSession(use_gpu=False), Console(interactive=False))
    trainer.setup()
    assert isinstance(trainer.method, PCL) and trainer.start_epoch == 2
    torch.testing.assert_close(trainer.method.assignments, clustered["assignments"])
    # a run resumed inside an epoch does not run its E-step again: the prototypes are used from the state
    assert trainer.method._use_prototypes
    trainer.tracker.close()

    out = run_cli("run", "--resume", str(resumed), "--set", "train.epochs=3", cwd=tmp_path, autoload=False)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    third = [r["loss"] for r in records(resumed) if r["subset"] == "train" and r["epoch"] == 2]
    assert third == [r["loss"] for r in logged if r["subset"] == "train" and r["epoch"] == 2]


@pytest.mark.ray
def test_two_ray_workers_run_an_e_step_on_real_images(tmp_path: Path, cifar10_subset: dict) -> None:
    path = experiment(tmp_path, cifar10_subset, scaling={"backend": "ray", "num_workers": 2},
                      method={"name": "pcl", "momentum": 0.99, "warmup_epochs": 1, "grid_prototypes": 2},
                      train={"epochs": 2, "batch_size": 16, "max_steps_per_epoch": 2, "log_every_steps": 1,
                             "optimizer": {"name": "sgd", "lr": 0.05}, "lr_scaling": "none"})
    out = run_cli("run", str(path), cwd=tmp_path, autoload=False)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    run_dir = tmp_path / "runs" / "pcl"
    logged = records(run_dir)
    (e_step,) = [r for r in logged if r["subset"] == "epoch_start"]
    assert e_step["epoch"] == 1 and "ami_10" in e_step
    assert all("acc_proto_10" in r for r in logged if r["subset"] == "train" and r["epoch"] == 1)
    final = torch.load(RunDir(run_dir).checkpoints()[-1], weights_only=True)["model"]
    # every image of the 200 was embedded (by one of the two workers) and assigned
    assert final["clustered"] and (final["assignments"] >= 0).all() and final["assignments"].shape == (2, 200)
    assert (run_dir / "prototypes_epoch002.png").is_file()


def test_quick_example_runs_as_written(tmp_path: Path, cifar10_dir: Path) -> None:
    example = Path(__file__).parents[3] / "examples" / "pcl_quick.yaml"
    text = example.read_text().replace("~/.cache/sslcore/cifar10", str(cifar10_dir))  # the same, unless moved
    (tmp_path / "pcl_quick.yaml").write_text(text)
    out = run_cli("run", str(tmp_path / "pcl_quick.yaml"), "--set", "scaling.backend=local", cwd=tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    run_dir = tmp_path / "runs" / "pcl_quick"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"knn_top1", "ami", "nmi", "ari", "tsne_kl_divergence"} <= set(summary["final"])
    assert [r["epoch"] for r in records(run_dir) if r["subset"] == "epoch_start"] == [1, 2, 3]
    assert (run_dir / "prototypes_epoch004.png").is_file() and (run_dir / "embedding_tsne_epoch004.png").is_file()
    # the run's backbone can be exported and evaluated: the driver sizes PCL's per-image state from the data
    out = run_cli("export", str(run_dir), "-o", str(tmp_path / "pcl_backbone.pt"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    out = run_cli("eval", str(run_dir), "-e", "knn", "--set", "k=10", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "knn: knn_top1=" in out.stdout
