"""`sslcore embed` and its faiss indexes on 10,000 and 50,000 CIFAR-10 training images: embedding img/s, then for
the flat (exact), IVF and HNSW indexes that `sslcore embed --index` builds, build seconds, search seconds per
query (a batch of 1000 queries, and queries one at a time) and recall@10 against flat.

The encoder is the quickstart's (ResNet-18, standard stem, 32 px, examples/quickstart.yaml's augmentation) at its
seeded random initialisation, written as `sslcore export` writes a backbone: times do not depend on the weights.
Each size is embedded once, through `sslcore.commands.embed.embed` (what `sslcore embed` runs); the indexes are
built and searched 3 times each, medians reported. Queries are a seeded sample of the indexed vectors, as for the
recall `sslcore embed` reports; the single-query time is the mean over 100 of them, one `search` call each.

    .venv/bin/python bench/embed_search.py [--sizes 10000 50000] [--reps 3]
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import numpy as np
from harness import CIFAR, HERE, median, save

REPO = HERE.parent
RUNS = HERE / "runs" / "embed_search"
KINDS = ("flat", "ivf", "hnsw")
BATCH_QUERIES = 1000
SINGLE_QUERIES = 100


def write_backbone(folder: Path) -> Path:
    """backbone.pt + backbone.yaml of the quickstart's encoder at its seed, as `sslcore export` writes them."""
    import torch
    import yaml

    from sslcore.config import load_yaml, resolve
    from sslcore.engine.launch import dry_build
    from sslcore.engine.loop import seed_everything
    from sslcore.registry import Registry

    data, _ = load_yaml(REPO / "examples" / "quickstart.yaml")
    data["data"] = {"name": "image_folder", "root": str(CIFAR / "train"), "max_per_class": 20}  # dry_build sizes
    resolved = resolve(data, Registry(), source="examples/quickstart.yaml")
    seed_everything(resolved.experiment.seed)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(dry_build(resolved, Registry()).backbone.state_dict(), folder / "backbone.pt")
    (folder / "backbone.yaml").write_text(yaml.safe_dump(resolved.as_dict(), sort_keys=False))
    return folder / "backbone.pt"


def lscpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")


def measure_index(kind: str, vectors: np.ndarray, reps: int) -> dict[str, float | dict]:
    """Median build seconds, batch and single search seconds per query, and recall@10 of one index kind."""
    from sslcore.commands.embed import RECALL_K, build_index, recall_at_k

    queries = vectors[np.random.default_rng(1).choice(len(vectors), BATCH_QUERIES, replace=False)]
    builds, batch, single = [], [], []
    for _ in range(reps):
        started = time.perf_counter()
        index, params = build_index(vectors, kind)
        builds.append(time.perf_counter() - started)
        started = time.perf_counter()
        index.search(queries, RECALL_K)
        batch.append((time.perf_counter() - started) / len(queries))
        started = time.perf_counter()
        for query in queries[:SINGLE_QUERIES]:
            index.search(query[None], RECALL_K)
        single.append((time.perf_counter() - started) / SINGLE_QUERIES)
    return {"params": params, "build_s": median(builds), "batch_ms_per_query": 1000 * median(batch),
            "single_ms_per_query": 1000 * median(single),
            "recall_at_10": 1.0 if kind == "flat" else recall_at_k(index, vectors)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    import faiss

    from sslcore.commands.embed import embed
    from sslcore.registry import Registry

    registry = Registry()
    backbone = write_backbone(RUNS / "backbone")
    results = {}
    for size in args.sizes:
        data = {"name": "image_folder", "root": str(CIFAR / "train"), "max_per_class": size // 10}
        record = embed(backbone, RUNS / f"n{size}", registry, data=data, index="flat", device="cpu")
        vectors = np.load(RUNS / f"n{size}" / "embeddings.npy")
        row = {"embed_s": record["seconds"]["embed"], "images_per_second": record["images_per_second"],
               "indexes": {kind: measure_index(kind, vectors, args.reps) for kind in KINDS}}
        results[str(size)] = row
        print(f"{size} images: embedded in {row['embed_s']:.1f} s ({row['images_per_second']:.0f} img/s)", flush=True)
        for m in row["indexes"].values():
            print(f"  {m['params']['factory']:>12}: build {m['build_s']:6.2f} s, search {m['batch_ms_per_query']:.3f} "
                  f"ms/query in a batch of {BATCH_QUERIES}, {m['single_ms_per_query']:.2f} ms one at a time, "
                  f"recall@10 {m['recall_at_10']:.3f}", flush=True)
    print(f"\n| images | index | build s | ms/query (batch {BATCH_QUERIES}) | ms/query (single) | recall@10 |")
    print("|---|---|---|---|---|---|")
    for size, row in results.items():
        for m in row["indexes"].values():
            print(f"| {int(size):,} | {m['params']['factory']} | {m['build_s']:.2f} | {m['batch_ms_per_query']:.3f} | "
                  f"{m['single_ms_per_query']:.2f} | {m['recall_at_10']:.3f} |")
    path = save("embed_search", {"lscpu_model_name": lscpu_model(), "faiss": faiss.__version__,
                                 "faiss_threads": faiss.omp_get_max_threads(), "reps": args.reps,
                                 "batch_queries": BATCH_QUERIES, "single_queries": SINGLE_QUERIES,
                                 "encoder": "resnet18, cifar_stem false, random init (seed 0), 32 px, 512-d",
                                 "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
