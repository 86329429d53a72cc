"""kNN top-1 (k=200, cosine, exp(s/0.1) votes) of saved ResNet-18 backbones, all evaluated the same way.

One protocol for every side of benchmark 3: sslcore's knn evaluator, fp32, the memory bank being the
experiment's training subset under the eval transform, the test set its evaluator's data. Weights are a
state_dict of bench/backbone.py's ResNet-18 (sslcore's backbone.pt and lightly_moco.py's output both are);
``random`` evaluates the randomly initialised encoder (the floor) for a seed.

    python bench/knn.py bench/configs/quality.yaml bench/runs/quality/backbone.pt random:0
"""

from __future__ import annotations

import argparse
import json

import torch

from sslcore.config import load_experiment
from sslcore.engine.context import EvalContext
from sslcore.registry import Registry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("weights", nargs="+", help="state_dict files, or random:SEED")
    args = parser.parse_args()
    torch.set_num_threads(2)
    registry = Registry()
    resolved = load_experiment(args.config, registry)
    blocks = resolved.blocks
    augmentation = registry.build("augmentation", blocks["augmentation"])
    evaluator = registry.build("evaluator", resolved.evaluators[0])
    context = EvalContext(registry=registry, eval_transform=augmentation.eval, train_data=blocks["data"],
                          device=torch.device("cpu"), batch_size=512, num_workers=0)
    results = {}
    for weights in args.weights:
        if weights.startswith("random:"):
            torch.manual_seed(int(weights.split(":")[1]))
        encoder = registry.build("encoder", blocks["encoder"])
        if not weights.startswith("random:"):
            encoder.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
        results[weights] = evaluator.evaluate(encoder.eval(), context)
        print(f"{weights}: {results[weights]}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
