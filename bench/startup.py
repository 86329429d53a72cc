"""Benchmark 4b: command to first training step, `sslcore run` against a trivial TorchTrainer.fit().

Both are fresh processes (new Python, new Ray cluster) started from this script; the clock runs from the
spawn to the line the first step prints (sslcore: "first step", trivial: its loop's only line), and to the
exit. Reps alternate between the two.

    python bench/startup.py --reps 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

from harness import HERE, median, save

REPO = HERE.parent


def timed(cmd: list[str], marker: str) -> tuple[float, float]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
    first = None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if first is None and marker in line:
            first = time.perf_counter() - start
    proc.wait()
    total = time.perf_counter() - start
    if proc.returncode or first is None:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{''.join(lines[-30:])}")
    return first, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    python = sys.executable
    sslcore = [str(os.path.join(os.path.dirname(python), "sslcore")), "run", "bench/configs/startup.yaml"]
    rows = {"trivial_first": [], "trivial_total": [], "sslcore_first": [], "sslcore_total": []}
    for rep in range(args.reps):
        shutil.rmtree(REPO / "bench" / "runs" / "startup", ignore_errors=True)
        first, total = timed([python, str(HERE / "trivial_ray.py")], "TRIVIAL_FIRST_STEP")
        rows["trivial_first"].append(first)
        rows["trivial_total"].append(total)
        first, total = timed(sslcore, "first step")
        rows["sslcore_first"].append(first)
        rows["sslcore_total"].append(total)
        print(f"rep {rep + 1}: trivial TorchTrainer first step {rows['trivial_first'][-1]:.1f} s "
              f"(exit {rows['trivial_total'][-1]:.1f} s); sslcore first step {rows['sslcore_first'][-1]:.1f} s "
              f"(exit {rows['sslcore_total'][-1]:.1f} s)", flush=True)
    extra = [s - t for s, t in zip(rows["sslcore_first"], rows["trivial_first"])]
    result = {k: median(v) for k, v in rows.items()} | {"sslcore_extra_s": median(extra), "per_rep": rows}
    print(f"median: trivial {result['trivial_first']:.1f} s, sslcore {result['sslcore_first']:.1f} s, "
          f"sslcore adds {result['sslcore_extra_s']:.1f} s")
    save("startup", result)


if __name__ == "__main__":
    main()
