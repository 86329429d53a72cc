#!/usr/bin/env bash
# Set up sslcore from nothing: a virtual environment in .venv with torch, the core, every plugin under
# plugins/ and the example plugin, and the CIFAR-10 images in ~/.cache/sslcore/cifar10 (from the shared
# archive when it is there, else downloaded by torchvision). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch first, pinned to the release this project is tested with (a range would let pip pick another)
python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
plugins=()
for dir in plugins/*/ examples/custom_loss_plugin/; do
  [ -f "$dir/pyproject.toml" ] && plugins+=(-e "$dir")
done
python -m pip install --quiet -e ".[test,umap]" "${plugins[@]}"
python scripts/prepare_cifar10.py
