#!/usr/bin/env bash
# Makes bench/.venv-lightly: the same torch as sslcore's venv, and lightly 1.6.0 with its own dependencies,
# kept apart from sslcore so neither's resolver can change the other's packages.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv-lightly"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
"$venv/bin/pip" install -q lightly==1.6.0 "torch==2.14.1" "torchvision==0.29.1"
"$venv/bin/python" -c "import lightly, torch; print('lightly', lightly.__version__, 'torch', torch.__version__)"
