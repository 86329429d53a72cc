"""Benchmark: the quickstart as a new user runs it, on each backend (issue 20).

1. Start-up, command to first step, of examples/quickstart.yaml as it is (backend auto: in this process) and
   with ``--set scaling.backend=ray`` (Ray Train with one worker: the default before backend auto), alternating,
   ``--reps`` times each; each run is stopped with SIGINT once its first step is printed.
2. The whole quickstart on the default path, at a (pseudo-)terminal: its wall time, kNN top-1 before and
   after, and the console as a person sees it (each terminal line as last drawn), saved to
   bench/results/quickstart_console.txt.
3. The whole quickstart on Ray Train with 1 and with 2 workers (``scaling.backend=ray``): img/s (median of
   the epochs after the first) and kNN top-1 at the end.

    python bench/quickstart.py [--reps 3] [--skip-full]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import termios
import time

from harness import HERE, cpu_name, save

REPO = HERE.parent
RUNS = HERE / "runs" / "quickstart"
SSLCORE = [sys.executable, "-m", "sslcore", "run", str(REPO / "examples" / "quickstart.yaml")]


def first_step(*sets: str) -> tuple[float, float]:
    """Seconds from the spawn to the "first step" line, and of them those of the evaluation before training
    (the random-init kNN floor); the run is then stopped (SIGINT)."""
    shutil.rmtree(RUNS, ignore_errors=True)
    RUNS.mkdir(parents=True)
    args = [arg for value in ("output_dir=" + str(RUNS), *sets) for arg in ("--set", value)]
    start = time.perf_counter()
    proc = subprocess.Popen([*SSLCORE, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=RUNS, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "first step" in line:
            seconds = time.perf_counter() - start
            os.killpg(proc.pid, signal.SIGINT)
            proc.communicate(timeout=120)
            evaluated = re.search(r"\(([\d.]+) s of it the evaluation", line)
            return seconds, float(evaluated[1]) if evaluated else 0.0
    proc.wait()
    sys.exit(f"no first step ({proc.returncode}):\n{''.join(lines[-30:])}")


def at_a_terminal(*sets: str) -> tuple[float, str]:
    """The whole run with stdout and stderr on a 40 x 120 pseudo-terminal; (wall seconds, what it wrote)."""
    shutil.rmtree(RUNS, ignore_errors=True)
    RUNS.mkdir(parents=True)
    args = [arg for value in ("output_dir=runs", *sets) for arg in ("--set", value)]
    primary, secondary = os.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    start = time.perf_counter()
    proc = subprocess.Popen([*SSLCORE, *args], stdout=secondary, stderr=secondary, cwd=RUNS)
    os.close(secondary)
    chunks = []
    while True:
        ready, _, _ = select.select([primary], [], [], 1.0)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        try:
            data = os.read(primary, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(primary)
    code = proc.wait()
    seconds = time.perf_counter() - start
    if code:
        sys.exit(f"quickstart failed ({code}):\n{b''.join(chunks).decode(errors='replace')[-3000:]}")
    return seconds, b"".join(chunks).decode(errors="replace")


def as_seen(raw: str) -> str:
    """Terminal output as it stays on the screen: of each line, what its last carriage return left."""
    lines = []
    for line in raw.replace("\r\n", "\n").split("\n"):
        line = line.split("\r")[-1] if "\r" in line.rstrip("\r") else line.rstrip("\r")
        lines.append(line.replace("\x1b[A", "").replace("\x1b[K", "").rstrip())
    return "\n".join(lines).strip() + "\n"


def summary() -> dict:
    return json.loads((RUNS / "runs" / "quickstart" / "summary.json").read_text())


def epoch_rates() -> list[float]:
    records = [json.loads(line) for line in (RUNS / "runs" / "quickstart" / "metrics.jsonl").read_text().splitlines()]
    by_epoch: dict[int, list[float]] = {}
    for record in records:
        if record["subset"] == "train":
            by_epoch.setdefault(record["epoch"], []).append(record["img_per_s"])
    return [statistics.median(rates) for epoch, rates in sorted(by_epoch.items()) if epoch > 0]


def full(*sets: str) -> dict:
    seconds, raw = at_a_terminal(*sets)
    record = summary()
    return {"wall_s": seconds, "startup_s": record["startup_seconds"], "backend": record["backend"],
            "knn_top1_before": record["initial"]["knn_top1"], "knn_top1_after": record["final"]["knn_top1"],
            "img_per_s": statistics.median(epoch_rates()), "console": as_seen(raw)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--skip-full", action="store_true", help="start-up only")
    args = parser.parse_args()
    paths = {"auto (in-process)": (), "ray, 1 worker": ("scaling.backend=ray",)}
    starts: dict[str, list[float]] = {name: [] for name in paths}
    evals: dict[str, list[float]] = {name: [] for name in paths}
    for rep in range(args.reps):
        for name, sets in paths.items():
            seconds, evaluated = first_step(*sets)
            starts[name].append(seconds)
            evals[name].append(evaluated)
        print(f"rep {rep + 1}: first step " + ", ".join(f"{k} {v[-1]:.1f} s ({evals[k][-1]:.1f} s the kNN before "
                                                       "training)" for k, v in starts.items()), flush=True)
    result: dict = {"startup_s": {k: statistics.median(v) for k, v in starts.items()},
                    "startup_without_initial_eval_s": {k: statistics.median(a - b for a, b in zip(v, evals[k]))
                                                       for k, v in starts.items()},
                    "startup_per_rep": starts, "initial_eval_per_rep": evals}
    if not args.skip_full:
        runs = {"auto (in-process)": full(),
                "ray, 1 worker": full("scaling.backend=ray"),
                "ray, 2 workers": full("scaling.backend=ray", "scaling.num_workers=2")}
        (HERE / "results" / "quickstart_console.txt").write_text(runs["auto (in-process)"]["console"])
        for name, run in runs.items():
            print(f"{name}: wall {run['wall_s']:.0f} s, first step {run['startup_s']:.1f} s, "
                  f"{run['img_per_s']:.0f} img/s, kNN top-1 {run['knn_top1_before']:.3f} -> "
                  f"{run['knn_top1_after']:.3f}", flush=True)
        result["runs"] = {name: {k: v for k, v in run.items() if k != "console"} for name, run in runs.items()}
    print(f"CPU: {cpu_name()}")
    print(json.dumps({"startup_s": result["startup_s"],
                      "startup_without_initial_eval_s": result["startup_without_initial_eval_s"]}))
    save("quickstart", result)


if __name__ == "__main__":
    main()
