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
python -m pip install --quiet -e ".[test,umap,timm,onnx]" "${plugins[@]}"
python scripts/prepare_cifar10.py

# The browser test (tests/test_aim_ui.py) drives Debian's chromium with Playwright for Python (the test
# extra). Never `playwright install`: it downloads a browser of its own. Where chromium cannot be installed
# this warns, and the test fails saying what is missing.
install_chromium() {
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || return 1
    sudo=(sudo)
  fi
  command -v apt-get >/dev/null || return 1
  ${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    ${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
}
if [ ! -x /usr/bin/chromium ] && ! install_chromium; then
  echo "setup.sh: could not install Debian's chromium (apt-get, as root or with sudo);" \
       "tests/test_aim_ui.py needs /usr/bin/chromium" >&2
fi
