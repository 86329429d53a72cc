"""Collects bench/results/*.json into the table of bench/results.md and draws bench/throughput.png.

    python bench/report.py            # prints the markdown table; needs matplotlib for the plot
"""

from __future__ import annotations

import json

from harness import HERE, RESULTS


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def machine(data: dict) -> str:
    """A short name of the CPU a result was measured on: the machine changes between sessions."""
    cpu = data.get("cpu", "unknown")
    name = "Xeon" if "Xeon" in cpu else "EPYC" if "EPYC" in cpu else cpu.split(",")[0]
    return f"{name}+AMX" if "amx" in cpu else name


def main() -> None:
    rows: list[tuple[str, ...]] = []  # benchmark, measured, ratio, target, CPU
    bars: list[tuple[str, float]] = []
    for name in sorted(p.stem for p in RESULTS.glob("overhead_*.json")):
        data = load(name)
        for row in data["rows"]:
            label = f"{row['config']} ({name.removeprefix('overhead_')})"
            rows.append((f"1. overhead, model only, {label}",
                         f"bare {row['bare_img_s']:.1f} img/s, sslcore {row['sslcore_img_s']:.1f} img/s",
                         f"{row['ratio']:.3f}", ">= 0.97", machine(data)))
            note = f" ({machine(data)}" + ("" if name.endswith("shuffle-off") else f", {name.rsplit('_', 1)[-1]}") + ")"
            bars += [(f"bare {row['config']}{note}", row["bare_img_s"]),
                     (f"sslcore {row['config']}{note}", row["sslcore_img_s"])]
    for name in sorted(p.stem for p in RESULTS.glob("end_to_end_*.json")):
        data = load(name)
        tag = name.removeprefix("end_to_end_")
        rows.append((f"2. end to end vs lightly ({tag})",
                     f"sslcore {data['sslcore_img_s']:.1f} img/s, lightly {data['lightly_img_s']:.1f} img/s",
                     f"{data['sslcore_over_lightly']:.2f}", ">= 2.0", machine(data)))
        rows.append((f"2. sslcore end to end / model only ({tag})",
                     f"{data['sslcore_img_s']:.1f} / {data['sslcore_model_only_img_s']:.1f} img/s",
                     f"{data['sslcore_e2e_over_model_only']:.3f}", "(data pipeline cost)", machine(data)))
        bars += [(f"lightly e2e {tag} ({machine(data)})", data["lightly_img_s"]),
                 (f"sslcore e2e {tag} ({machine(data)})", data["sslcore_img_s"])]
    quality = load("quality")
    if quality:
        runs, floor = quality["runs"], quality["floor"]
        for name, run in runs.items():
            rows.append((f"3. kNN top-1 after {quality['epochs']} epochs, {name}",
                         f"{run['knn_top1']:.4f} (floor {floor[str(0)] if '0' in floor else floor}); "
                         f"{run['median_epoch_img_s']:.1f} img/s", "", "", machine(quality)))
            bars.append((f"{name} (train, {machine(quality)})", run["median_epoch_img_s"]))
        if "ray_tax" in quality:
            rows.append(("4. Ray tax: Ray Train 1 worker / in-process, median epoch img/s", "",
                         f"{quality['ray_tax']:.3f}", ">= 0.95", machine(quality)))
        if "two_over_one_worker" in quality:
            rows.append(("5. scaling: 2 Ray workers / 1, median epoch img/s", "",
                         f"{quality['two_over_one_worker']:.3f}", "", machine(quality)))
    startup = load("startup")
    if startup:
        rows.append(("4b. start: command to first step",
                     f"trivial TorchTrainer {startup['trivial_first']:.1f} s, sslcore {startup['sslcore_first']:.1f} s",
                     f"+{startup['sslcore_extra_s']:.1f} s", "<= +5 s", machine(startup)))
    data = load("data_pipeline")
    if data:
        rows.append(("data: JPEG decode, OpenCV / PIL", f"{data['decode_cv2']:.0f} / {data['decode_pil']:.0f} img/s",
                     f"{data['cv2_over_pil']:.2f}", "", machine(data)))
        rows.append(("data: two views, uint8 + batch normalise / per-image normalise",
                     f"{data['views_uint8_batch_normalize']:.0f} / {data['views_per_image_normalize']:.0f} img/s",
                     f"{data['batch_over_per_image']:.2f}", "", machine(data)))
    print("| benchmark | measured (medians) | ratio | target | CPU |\n|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no plot: pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(bars) + 1))
    labels, values = zip(*bars)
    ax.barh(range(len(bars)), values, color=["#888" if "bare" in x or "lightly" in x else "#1f77b4" for x in labels])
    ax.set_yticks(range(len(bars)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("images / second (2 CPU cores; medians)")
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.0f}", va="center")
    fig.tight_layout()
    fig.savefig(HERE / "throughput.png", dpi=100)
    print("wrote bench/throughput.png")


if __name__ == "__main__":
    main()
