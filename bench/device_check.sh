#!/usr/bin/env bash
# The device check of issue 19: on one GPU, in at most 8 minutes, every result under one folder (OUT):
#   (a) the gpu-marked tests: pytest_gpu.log, pytest_gpu.xml (junit)
#   (b) the throughput table of bench/device_throughput.py (model only; end to end with the CPU augmentation and
#       with the augmentation on the device; lightly 1.6 at its defaults) for ResNet-18 (CIFAR stem, 32 px) and
#       ViT-S/16 (224 px): throughput.md, throughput.json, throughput.log
#   (c) a short MoCo v2 run on CIFAR-10 with kNN (examples/moco_cifar10.yaml, --set overrides): moco/run.log,
#       moco/summary.json, moco/metrics.jsonl, moco/config.yaml
#   summary.md: what ran, what passed, what was skipped or failed and why; env.txt: the machine and packages.
# Optional pieces the machine may lack (lightly, faiss-gpu, nvidia-smi, Ray, timm) are reported and the script
# goes on; a step that fails is reported and the script goes on, then exits 1 naming the failed steps.
#
#   bash bench/device_check.sh [OUT]          # on the GPU machine (OUT: first argument, else $OUT, else
#                                             # bench/results/device_check)
#   bash bench/device_check.sh --cpu [OUT]    # the same on the CPU at tiny sizes in a few minutes (CI, no device)
#
# Environment: PYTHON (default .venv/bin/python, else python3; sslcore and its plugins are installed, editable and
# without dependencies, into a throwaway venv over it when it cannot import them), LIGHTLY_PYTHON (default
# bench/.venv-lightly/bin/python, else PYTHON when it has lightly), SSLCORE_CIFAR10 (a folder with train/ and
# test/; default ~/.cache/sslcore/cifar10, unpacked there from $SSLCORE_CIFAR10_ARCHIVE, shared/data/ or
# ../shared/data/cifar10-jpg.tar.gz when missing).
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"

mode=gpu
if [ "${1:-}" = "--cpu" ]; then
  mode=cpu
  shift
fi
case "${1:-}" in -*) echo "usage: bash bench/device_check.sh [--cpu] [OUT]" >&2; exit 2 ;; esac
out="${1:-${OUT:-$repo/bench/results/device_check}}"  # a relative OUT is the caller's
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$repo"
work="$(mktemp -d "${TMPDIR:-/tmp}/sslcore-device-check.XXXXXX")"
trap 'rm -rf "$work"' EXIT
started=$SECONDS

# Seconds each step may take: together under 8 minutes on the GPU machine.
if [ "$mode" = gpu ]; then
  tests_limit=180 throughput_limit=190 moco_limit=100
else
  tests_limit=300 throughput_limit=300 moco_limit=300
  export CUDA_VISIBLE_DEVICES=""  # CPU only, even on a machine with a GPU
fi

steps=()  # "name|status|detail" for summary.md
record() {
  local detail="${3//|//}"  # "|" separates the fields here and the cells of summary.md
  steps+=("$1|$2|$detail")
  echo "device_check: $1: $2${detail:+ ($detail)}"
}

write_summary() {
  {
    echo "# Device check ($mode), $(date '+%Y-%m-%d %H:%M'), $((SECONDS - started)) s"
    echo
    echo "| step | status | detail |"
    echo "|---|---|---|"
    for line in "${steps[@]}"; do
      IFS='|' read -r name status detail <<<"$line"
      echo "| $name | $status | $detail |"
    done
    echo
    echo "Files: $(cd "$out" && find . -type f ! -name summary.md | sort | sed 's|^\./||' | tr '\n' ' ')"
  } >"$out/summary.md"
}

finish() {
  write_summary
  local failed=()
  for line in "${steps[@]}"; do
    IFS='|' read -r name status _ <<<"$line"
    [ "$status" = failed ] && failed+=("$name")
  done
  if [ "${#failed[@]}" -gt 0 ]; then
    echo "device_check.sh: failed: ${failed[*]} (see $out/summary.md)" >&2
    exit 1
  fi
  echo "device_check: done in $((SECONDS - started)) s; $out/summary.md"
  exit 0
}

# Runs "$@" under a time limit; prints nothing, returns the command's status (124: timed out).
limited() {
  local seconds=$1
  shift
  timeout --kill-after=15 "$seconds" "$@"
}

# -- the python, sslcore and the optional pieces ---------------------------------------------------------------

py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c "" 2>/dev/null; then py=.venv/bin/python; else py=python3; fi
fi
if ! "$py" -c "import torch" 2>/dev/null; then
  record setup failed "$py cannot import torch; set PYTHON to a python that has it"
  finish
fi
if [ "$mode" = gpu ] && ! "$py" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  record setup failed "torch sees no CUDA GPU here; run bash bench/device_check.sh --cpu for the CPU check"
  finish
fi

if ! "$py" -c "import sslcore, sslcore_moco" 2>/dev/null; then
  plugins=()
  for dir in plugins/*/; do [ -f "$dir/pyproject.toml" ] && plugins+=(-e "$dir"); done
  if "$py" -m venv --system-site-packages "$work/venv" >"$out/install.log" 2>&1 &&
     "$work/venv/bin/python" -m pip install --no-deps --no-build-isolation --no-index -e . "${plugins[@]}" \
       >>"$out/install.log" 2>&1; then
    record install passed "sslcore and its plugins installed editable (no dependencies) into a throwaway venv over $py"
    py="$work/venv/bin/python"
  else
    record install failed "$py cannot import sslcore and installing it failed (install.log)"
    finish
  fi
fi

missing="$("$py" - <<'EOF'
import importlib.util
needed = ["torchvision", "pydantic", "pluggy", "yaml", "albumentations", "cv2", "kornia", "PIL", "numpy", "pytest"]
print(" ".join(name for name in needed if importlib.util.find_spec(name) is None))
EOF
)"
[ -n "$missing" ] && record dependencies failed "$py lacks: $missing (the steps that import them fail)"

"$py" - >"$out/env.txt" 2>&1 <<'EOF'
import importlib, os, platform, sys
import torch
print(f"python {sys.version.split()[0]} ({sys.executable}); {platform.platform()}; {os.cpu_count()} CPUs")
cuda = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU: {torch.cuda.get_device_name(0) if cuda else 'none'}")
for name in ["torchvision", "sslcore", "kornia", "albumentations", "cv2", "pydantic", "ray", "aim", "timm", "faiss"]:
    try:
        version = getattr(importlib.import_module(name), "__version__", "?")
        print(f"{name} {getattr(version, '__version__', version)}")  # aim's __version__ is a module
    except Exception as exc:
        print(f"{name}: missing ({type(exc).__name__}: {exc})")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi >>"$out/env.txt" 2>&1
grep -m1 "model name" /proc/cpuinfo >>"$out/env.txt" 2>/dev/null

if [ "$mode" = gpu ]; then
  gpus="$("$py" -c "import faiss; print(faiss.get_num_gpus())" 2>/dev/null || echo missing)"
  case "$gpus" in
    missing) record faiss-gpu skipped "faiss is not installed: k-means runs nowhere; its tests fail or skip" ;;
    0) record faiss-gpu skipped "faiss sees no GPU (faiss-cpu installed): k-means stays on the CPU" ;;
    *) record faiss-gpu passed "faiss sees $gpus GPU(s)" ;;
  esac
  command -v nvidia-smi >/dev/null || record nvidia-smi skipped "not installed: no GPU utilisation in the table"
fi

lightly_args=()
if [ -n "${LIGHTLY_PYTHON:-}" ]; then
  lightly_args=(--lightly-python "$LIGHTLY_PYTHON")
elif [ ! -x bench/.venv-lightly/bin/python ] && "$py" -c "import lightly" 2>/dev/null; then
  lightly_args=(--lightly-python "$py")
fi

# -- CIFAR-10 --------------------------------------------------------------------------------------------------

cache="${SSLCORE_CACHE:-$HOME/.cache/sslcore}/cifar10"
for candidate in "${SSLCORE_CIFAR10_ARCHIVE:-}" shared/data/cifar10-jpg.tar.gz ../shared/data/cifar10-jpg.tar.gz; do
  if [ -n "$candidate" ] && [ -f "$candidate" ]; then
    export SSLCORE_CIFAR10_ARCHIVE="$(cd "$(dirname "$candidate")" && pwd)/$(basename "$candidate")"  # for the tests
    break
  fi
done
cifar=""
if [ -n "${SSLCORE_CIFAR10:-}" ] && [ -d "$SSLCORE_CIFAR10/train" ]; then
  cifar="$SSLCORE_CIFAR10"
elif [ -d "$cache/train" ] && [ -d "$cache/test" ]; then
  cifar="$cache"
elif [ -n "${SSLCORE_CIFAR10_ARCHIVE:-}" ]; then
  # the layout sslcore.testing.unpack_cifar10 makes, so the tests reuse it
  mkdir -p "$cache" && tar -xzf "$SSLCORE_CIFAR10_ARCHIVE" -C "$cache" && touch "$cache/.unpacked" && cifar="$cache"
fi
if [ -n "$cifar" ]; then
  export SSLCORE_CIFAR10="$cifar"
  record cifar10 passed "$cifar"
else
  record cifar10 failed "no CIFAR-10: set SSLCORE_CIFAR10, or bring shared/data/cifar10-jpg.tar.gz"
fi

# -- (a) the gpu-marked tests ------------------------------------------------------------------------------------

limited "$tests_limit" "$py" -m pytest -q -m gpu -rs --junitxml "$out/pytest_gpu.xml" >"$out/pytest_gpu.log" 2>&1
status=$?
counts="$("$py" - "$out/pytest_gpu.xml" 2>/dev/null <<'EOF'
import sys, xml.etree.ElementTree as ET
suite = ET.parse(sys.argv[1]).getroot()
suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
tests, failures, errors, skipped = (int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped"))
passed = tests - failures - errors - skipped
reasons = {case.find("skipped").get("message", "") for case in suite.iter("testcase") if case.find("skipped") is not None}
print("skipped" if tests and skipped == tests else "passed",
      f"{passed} passed, {failures + errors} failed, {skipped} skipped of {tests}"
      + (f" ({'; '.join(sorted(reasons))})" if skipped else ""))
EOF
)"
case $status in
  0) record "gpu tests" "${counts%% *}" "${counts#* }; pytest_gpu.log" ;;
  5) record "gpu tests" skipped "no test is marked gpu (pytest collected none)" ;;
  124|137) record "gpu tests" failed "timed out after $tests_limit s; pytest_gpu.log" ;;
  *) record "gpu tests" failed "pytest exited $status: ${counts#* }; pytest_gpu.log" ;;
esac

# -- (b) the throughput table ------------------------------------------------------------------------------------

if [ -z "$cifar" ]; then
  record throughput failed "no CIFAR-10"
else
  if [ "$mode" = gpu ]; then
    sizes=(--device cuda --reps 2)
  else
    sizes=(--device cpu --batch resnet18_cifar32=16 vit_s16_224=4 --steps 1 --warmup 1 --reps 1)
  fi
  limited "$throughput_limit" "$py" bench/device_throughput.py "${sizes[@]}" "${lightly_args[@]}" --out "$out" \
    >"$out/throughput.log" 2>&1
  status=$?
  rows="$("$py" - "$out/throughput.json" 2>/dev/null <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
ok = sum(row["status"] == "ok" for row in rows)
other = [f"{row['model']} {row['row']} {row['status']}: {row['reason']}" for row in rows if row["status"] != "ok"]
print(f"{ok} of {len(rows)} rows measured" + ("; " + "; ".join(other) if other else ""))
EOF
)"
  case $status in
    0) record throughput passed "${rows}; throughput.md" ;;
    124|137) record throughput failed "timed out after $throughput_limit s; throughput.log" ;;
    *) record throughput failed "exited $status: $(tail -n 1 "$out/throughput.log")" ;;
  esac
fi

# -- (c) a short MoCo run with kNN ---------------------------------------------------------------------------------

if [ -z "$cifar" ]; then
  record "moco run" failed "no CIFAR-10"
else
  if "$py" -c "import ray" 2>/dev/null; then
    backend=ray
  else
    backend=local
    record ray skipped "Ray is not installed: the MoCo run ran in-process (scaling.backend local)"
  fi
  if [ "$mode" = gpu ]; then
    # 3 x 80 steps of 512 images; kNN of 2,000 test images against 10,000 train images
    run=(--set scaling.use_gpu=true --set train.epochs=3 --set train.max_steps_per_epoch=80
         --set evaluators.0.data.max_per_class=200 --set train.eval_at_start=true
         --set "evaluators.0.train_data={name: image_folder, root: $cifar/train, max_per_class: 1000}")
  else
    run=(--set scaling.use_gpu=false --set train.epochs=1 --set train.max_steps_per_epoch=3
         --set train.batch_size=32 --set evaluators.0.data.max_per_class=10 --set train.eval_at_start=true
         --set "evaluators.0.train_data={name: image_folder, root: $cifar/train, max_per_class: 20}")
  fi
  mkdir -p "$out/moco"
  limited "$moco_limit" "$py" -m sslcore run examples/moco_cifar10.yaml --set name=moco_device_check \
    --set "output_dir=$work/runs" --set "scaling.backend=$backend" --set "data.root=$cifar/train" \
    --set "evaluators.0.data.root=$cifar/test" --set evaluators.0.every_epochs=0 --set tracking.aim=null \
    --set tracking.progress_bar=false --set checkpoint.every_epochs=100 "${run[@]}" >"$out/moco/run.log" 2>&1
  status=$?
  for file in summary.json metrics.jsonl config.yaml ray.log; do
    [ -f "$work/runs/moco_device_check/$file" ] && cp "$work/runs/moco_device_check/$file" "$out/moco/"
  done
  result="$("$py" - "$out/moco/summary.json" 2>/dev/null <<'EOF'
import json, sys
summary = json.load(open(sys.argv[1]))
final, initial = summary.get("final", {}), summary.get("initial", {})
text = f"kNN top-1 {final['knn_top1']:.3f}" + (f" (random init {initial['knn_top1']:.3f})" if initial else "")
text += f", {final['step']} steps, {final['img_per_s']:.0f} img/s in the last epoch"
if "views_made_on" in summary:
    text += f", views made on the {summary['views_made_on']}"
if "gpu_memory_gib" in final:
    text += f", GPU memory {final['gpu_memory_gib']:.2f} GiB"
print(text)
EOF
)"
  case $status in
    0) if [ -n "$result" ]; then
         record "moco run" passed "$result; backend $backend; moco/run.log"
       else
         record "moco run" failed "no kNN result in moco/summary.json; moco/run.log"
       fi ;;
    124|137) record "moco run" failed "timed out after $moco_limit s; moco/run.log" ;;
    *) record "moco run" failed "exited $status: $(tail -n 1 "$out/moco/run.log")" ;;
  esac
fi

finish
