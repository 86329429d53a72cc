"""The floor of benchmark 4b: a trivial TorchTrainer.fit() with 1 worker whose loop prints one line."""

import tempfile

import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer


def loop(config):
    print("TRIVIAL_FIRST_STEP", flush=True)


if __name__ == "__main__":
    ray.init(include_dashboard=False)  # as sslcore starts its cluster
    TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1),
                 run_config=RunConfig(storage_path=tempfile.mkdtemp(), name="trivial")).fit()
