"""``sslcore embed`` and ``sslcore search``: a dataset's embeddings in a faiss index, and the images nearest one.

``sslcore embed TARGET [--data BLOCK|FOLDER] -o DIR`` runs TARGET's backbone (a run folder, a backbone.pt or a
checkpoint's state.pt, found as ``sslcore eval`` finds it) over a dataset under the experiment's eval transform
and writes into DIR:

- ``embeddings.npy``: N x D float32, the backbone's features L2-normalised (so inner product = cosine similarity);
- ``paths.txt``: row i's image file, one per line (``NAME[i]``, item i of the block, for a dataset not of files);
- ``labels.npy``: row i's class index, when the dataset has classes (their names are in ``embed.json``);
- ``index.faiss``: the faiss index of the rows (``faiss.write_index``; its search parameters are in the file);
- ``embed.json``: what built it: target, weights, experiment, data block, count, dim, index and its parameters,
  seconds to embed and to build, and for an approximate index its recall@10 against the exact one.

The index (``--index``): ``flat`` is exact (``IndexFlatIP``); ``ivf`` is ``IVF{nlist},Flat`` with nlist = 4 sqrt(N)
(the lower end of faiss's guideline for up to 1M vectors, "Guidelines to choose an index" in the faiss wiki),
capped so that every list trains on the 39 points faiss's k-means asks for, searched with
:data:`IVF_NPROBE` lists; ``hnsw`` is ``HNSW{M},Flat`` (:data:`HNSW_M`, :data:`HNSW_EF_SEARCH`). ``auto``, the
default, is flat up to :data:`DEFAULT_THRESHOLD` vectors and HNSW above: on 50,000 CIFAR-10 embeddings HNSW's
recall@10 was 0.996 and IVF's 0.935, at search times within 0.15 ms of each other, and HNSW needs no training
(bench/embed_search.py, bench/results.md; the faiss wiki's choice too for data that fits in memory). An image
that cannot be decoded is left out (warned), not replaced.

``sslcore search DIR IMAGE [-k 10] [-o PNG]`` rebuilds the same backbone and transform from ``embed.json``,
embeds IMAGE, prints its k nearest rows (rank, cosine similarity, path) and draws the query beside them into
PNG (default ``DIR/search_<stem>.png``). An image of the dataset finds itself first, at similarity ~1.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sslcore.api.errors import UnreadableImage, UserError

if TYPE_CHECKING:  # imported where used: the CLI's --help stays fast
    import faiss
    import numpy as np
    import torch

    from sslcore.commands.evaluate import LoadedBackbone
    from sslcore.registry import Registry

logger = logging.getLogger(__name__)

INDEX_KINDS = ("auto", "flat", "ivf", "hnsw")
#: above this many vectors ``--index auto`` builds HNSW instead of the exact flat index. Measured on 2 CPU cores
#: (bench/embed_search.py, a quiet machine), exact search costs 5.8 ms a query at 50,000 512-d vectors, growing with
#: N: up to 100,000 that is ~12 ms, nothing beside the seconds ``sslcore search`` spends building the backbone, and
#: exact; above, HNSW answers in ~0.2 ms at recall@10 0.99+, for a build (~4 s at 50,000) that pays off over many
#: queries.
DEFAULT_THRESHOLD = 100_000
#: inverted lists an IVF search visits (measured recall@10: 0.98 at 10,000 vectors, 0.935 at 50,000)
IVF_NPROBE = 32
#: HNSW: links per vector (faiss's range 4-64), candidates kept while building (faiss's default) and searching
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
HNSW_EF_SEARCH = 64
#: recall@k of an approximate index against the flat one, over a seeded sample of the indexed vectors
RECALL_K = 10
RECALL_QUERIES = 1000

EMBED_JSON = "embed.json"
EMBEDDINGS = "embeddings.npy"
PATHS = "paths.txt"
LABELS = "labels.npy"
INDEX = "index.faiss"


# -- the CLI ------------------------------------------------------------------------------------------------

def add_parser(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """The ``embed`` and ``search`` subcommands; ``common`` is the parent parser with ``-p/--plugin``."""
    embed_parser = commands.add_parser(
        "embed", parents=[common], help="write a dataset's embeddings by a backbone and their faiss index",
        description="Embed every image of a dataset with TARGET's backbone under its eval transform; write "
                    "DIR/embeddings.npy, paths.txt, labels.npy, index.faiss and embed.json.")
    embed_parser.add_argument("target", type=Path, metavar="TARGET",
                              help="a run folder, or a backbone.pt / checkpoint file")
    embed_parser.add_argument("--data", metavar="BLOCK|FOLDER",
                              help="a dataset block as inline YAML, e.g. '{name: image_folder, root: "
                                   "~/.cache/sslcore/cifar10/test}', or a folder of images (image_folder); "
                                   "default: the run's training data")
    embed_parser.add_argument("-o", "--output", type=Path, required=True, metavar="DIR",
                              help="folder for the embeddings and the index")
    embed_parser.add_argument("--config", type=Path, help="experiment YAML of a backbone file")
    embed_parser.add_argument("--index", choices=INDEX_KINDS, default="auto",
                              help="faiss index: flat (exact), ivf, hnsw; auto: flat up to --threshold "
                                   "vectors, hnsw above (default: auto)")
    embed_parser.add_argument("--threshold", type=int, default=DEFAULT_THRESHOLD, metavar="N",
                              help=f"--index auto builds hnsw above N vectors (default: {DEFAULT_THRESHOLD})")
    embed_parser.add_argument("--device", help="cpu or cuda (default: cuda when there is one)")
    embed_parser.add_argument("--batch-size", type=int, default=256, metavar="N", help="images per batch (256)")

    search_parser = commands.add_parser(
        "search", parents=[common], help="the images of an embedded dataset nearest to an image",
        description="Embed IMAGE as sslcore embed embedded DIR's dataset, print its k nearest images with their "
                    "cosine similarity, and draw it beside them into a PNG.")
    search_parser.add_argument("directory", type=Path, metavar="DIR", help="a folder written by sslcore embed")
    search_parser.add_argument("image", type=Path, metavar="IMAGE", help="the query image file")
    search_parser.add_argument("-k", type=int, default=10, help="neighbours to show (default: 10)")
    search_parser.add_argument("-o", "--output", type=Path, metavar="PNG",
                               help="the picture (default: DIR/search_<IMAGE's stem>.png)")
    search_parser.add_argument("--device", help="cpu or cuda (default: cuda when there is one)")


def cmd_embed(args: argparse.Namespace) -> int:
    """Embed, index, and print what was written."""
    from sslcore.commands.cli import _registry

    registry = _registry(args)
    data = None if args.data is None else parse_data(args.data)
    record = embed(args.target, args.output, registry, data=data, config=args.config, index=args.index,
                   threshold=args.threshold, device=args.device, batch_size=args.batch_size)
    seconds = record["seconds"]
    print(f"embedded {record['count']} images ({record['dim']}-d) in {seconds['embed']:.1f} s "
          f"({record['images_per_second']:.0f} img/s"
          + (f", {record['skipped']} unreadable skipped" if record["skipped"] else "") + f") into {args.output}")
    index = record["index"]
    recall = record["recall"]
    print(f"index: {index['factory']} built in {seconds['build']:.2f} s"
          + (f", recall@{recall['k']} {recall['value']:.3f} against flat ({recall['queries']} queries)"
             if recall else " (exact)"))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    """Print the neighbours of IMAGE and write the picture."""
    from sslcore.commands.cli import _registry

    registry = _registry(args)
    embedding = load_embedding(args.directory)
    neighbours = search(embedding, args.image, registry, k=args.k, device=args.device)
    for neighbour in neighbours:
        print(f"{neighbour.rank:>3}  {neighbour.similarity:.4f}  {neighbour.path}")
    output = args.output or args.directory / f"search_{args.image.stem}.png"
    plot_neighbours(args.image, neighbours, output, embedding, registry)
    print(f"wrote {output}")
    return 0


def parse_data(text: str) -> dict[str, Any]:
    """``--data``: a folder (shorthand for ``{name: image_folder, root: FOLDER}``) or a dataset block as inline
    YAML; the block is validated by :func:`embed`."""
    import yaml

    if Path(text).expanduser().is_dir():
        return {"name": "image_folder", "root": text}
    try:
        block = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        reason = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise UserError(f"sslcore embed --data {text}: not YAML ({reason}); give a dataset block like "
                        "'{name: image_folder, root: FOLDER}' or a folder") from None
    if isinstance(block, str):
        raise UserError(f"sslcore embed --data {text}: no such folder; give a folder of images or a dataset block "
                        "like '{name: image_folder, root: FOLDER}'")
    if not isinstance(block, dict):
        raise UserError(f"sslcore embed --data {text}: a {type(block).__name__}, not a dataset block; give one "
                        "like '{name: image_folder, root: FOLDER}' or a folder")
    return block


# -- embed ----------------------------------------------------------------------------------------------------

def embed(target: Path, output: Path, registry: Registry, *, data: dict[str, Any] | None = None,
          config: Path | None = None, index: str = "auto", threshold: int = DEFAULT_THRESHOLD,
          device: str | None = None, batch_size: int = 256) -> dict[str, Any]:
    """``sslcore embed``: embed the dataset of ``data`` (default: ``target``'s training data) with ``target``'s
    backbone, index it (:func:`build_index`) and write both into ``output``; returns the ``embed.json`` record."""
    import faiss
    import numpy as np

    from sslcore.commands.evaluate import find_target, load_backbone
    from sslcore.config import resolve_block

    if index not in INDEX_KINDS:
        raise UserError(f"sslcore embed --index {index}: use one of {', '.join(INDEX_KINDS)}")
    if batch_size < 1:
        raise UserError(f"sslcore embed --batch-size {batch_size}: give 1 or more")
    if threshold < 0:
        raise UserError(f"sslcore embed --threshold {threshold}: give 0 or more (0: never the flat index)")
    found = find_target(target, registry, config, device, command="embed")
    block = found.resolved.blocks["data"] if data is None else resolve_block(
        registry, "dataset", data, source="sslcore embed --data")
    dataset = _open_dataset(registry, block)
    _make_folder(output)
    loaded = load_backbone(found, registry)

    started = time.perf_counter()
    vectors, rows = embed_images(loaded, dataset, registry, batch_size=batch_size)
    embed_seconds = time.perf_counter() - started
    started = time.perf_counter()
    faiss_index, params = build_index(vectors, index, threshold)
    build_seconds = time.perf_counter() - started
    recall = None if params["type"] == "flat" else {
        "k": RECALL_K, "queries": min(RECALL_QUERIES, len(vectors)),
        "value": round(recall_at_k(faiss_index, vectors, RECALL_K, RECALL_QUERIES), 4)}

    np.save(output / EMBEDDINGS, vectors)
    paths = _item_paths(dataset, block)
    (output / PATHS).write_text("".join(f"{paths[i]}\n" for i in rows), encoding="utf-8")
    classes = list(dataset.classes)
    if classes:
        np.save(output / LABELS, np.asarray(dataset.targets, dtype=np.int64)[rows])
    faiss.write_index(faiss_index, str(output / INDEX))
    record = {
        "target": str(target.resolve()), "weights": str(found.weights.resolve()),
        "config": str(found.config_file.resolve()), "experiment": loaded.experiment["name"], "epoch": loaded.epoch,
        "data": block, "count": len(rows), "skipped": len(dataset) - len(rows), "dim": int(vectors.shape[1]),
        "classes": classes, "path_kind": "files" if _is_files(dataset) else "items",
        "index": params, "recall": recall, "device": str(loaded.device),
        "seconds": {"embed": round(embed_seconds, 2), "build": round(build_seconds, 3)},
        "images_per_second": round(len(rows) / embed_seconds, 1),
        "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (output / EMBED_JSON).write_text(json.dumps(record, indent=2) + "\n")  # last: its presence means complete
    return record


def embed_images(loaded: LoadedBackbone, dataset: Any, registry: Registry, *, batch_size: int = 256
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The L2-normalised features (N x D float32) of every readable item of ``dataset`` under ``loaded``'s eval
    transform, precision and memory format, and the item index of each row; unreadable images are skipped."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    context = loaded.context(registry)
    loader = DataLoader(_Items(dataset, loaded.augmentation.eval), batch_size=batch_size, shuffle=False,
                        num_workers=context.num_workers, collate_fn=_collate)
    features, rows = [], []
    with torch.inference_mode():
        for batch in loader:
            if batch is None:  # every image of the batch was unreadable
                continue
            images, index = batch
            with context.autocast():
                out = loaded.backbone(context.to_device(images))
            features.append(torch.nn.functional.normalize(out.float(), dim=1).cpu())  # N x D, unit rows
            rows.append(index)
    if not features:
        raise UserError(f"sslcore embed --data: no readable image among the {len(dataset)} items (see the warnings "
                        "above); point the block at image files")
    return torch.cat(features).numpy(), torch.cat(rows).numpy().astype(np.int64)


class _Items:
    """Item i of a dataset as ``(eval_transform(image), i)``, or None when its image cannot be decoded: a row per
    readable image, never the next image in an unreadable one's place (as the training loader reads)."""

    def __init__(self, dataset: Any, transform: Any) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        try:
            image, _ = self.dataset[index]
        except UnreadableImage as exc:
            logger.warning("skipping unreadable image %s: %s", exc.path, exc.reason)
            return None
        return self.transform(image), index


def _collate(items: list[tuple[torch.Tensor, int] | None]) -> tuple[torch.Tensor, torch.Tensor] | None:
    from torch.utils.data import default_collate

    readable = [item for item in items if item is not None]
    return default_collate(readable) if readable else None


def _open_dataset(registry: Registry, block: dict[str, Any]) -> Any:
    """The dataset of a validated block; what its factory refuses is one line naming ``--data``."""
    try:
        return registry.build("dataset", block)
    except UserError as exc:
        raise UserError(*(f"sslcore embed --data: {line}" for line in exc.lines)) from None
    except ValueError as exc:
        raise UserError(f"sslcore embed --data: {block['name']}: {exc}") from None


def _is_files(dataset: Any) -> bool:
    from sslcore.components.datasets import ImageFiles

    return isinstance(dataset, ImageFiles)


def _item_paths(dataset: Any, block: dict[str, Any]) -> list[str]:
    """Each item's image file (absolute when the dataset's root is), or ``NAME[i]`` for a dataset not of files."""
    if not _is_files(dataset):
        return [f"{block['name']}[{i}]" for i in range(len(dataset))]
    return [os.path.abspath(dataset.path(i)) for i in range(len(dataset))]


def _make_folder(output: Path) -> None:
    """``output``, emptied of an earlier embedding's files: a run that stops half way leaves no embed.json that
    describes other files, and an unlabelled dataset no labels.npy of another."""
    try:
        output.mkdir(parents=True, exist_ok=True)
        for name in (EMBED_JSON, EMBEDDINGS, PATHS, LABELS, INDEX):
            (output / name).unlink(missing_ok=True)
    except OSError as exc:
        raise UserError(f"sslcore embed -o {output}: cannot write into the output folder ({exc.strerror or exc}); "
                        "give a folder for the embeddings") from None


# -- the index ----------------------------------------------------------------------------------------------

def build_index(vectors: np.ndarray, kind: str = "auto", threshold: int = DEFAULT_THRESHOLD
                ) -> tuple[faiss.Index, dict[str, Any]]:
    """A faiss inner-product index holding ``vectors`` (N x D float32, unit rows), and its parameters: ``type``
    (flat, ivf, hnsw), the ``index_factory`` string and the search parameters, which the index file keeps.

    ``kind`` auto is flat up to ``threshold`` vectors and HNSW above. IVF: nlist = 4 sqrt(N) lists, at most
    N / 39 (faiss's k-means wants 39 training points per centroid, and warns below), k-means on all the vectors,
    nprobe :data:`IVF_NPROBE`. HNSW: :data:`HNSW_M` links, efConstruction :data:`HNSW_EF_CONSTRUCTION`,
    efSearch :data:`HNSW_EF_SEARCH`."""
    import faiss
    import numpy as np

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if kind == "auto":
        kind = "flat" if n <= threshold else "hnsw"
    if kind == "flat":
        factory, params = "Flat", {}
    elif kind == "ivf":
        min_points = faiss.ClusteringParameters().min_points_per_centroid
        nlist = max(1, min(round(4 * math.sqrt(n)), n // min_points))
        factory, params = f"IVF{nlist},Flat", {"nlist": nlist, "nprobe": min(IVF_NPROBE, nlist)}
    elif kind == "hnsw":
        factory = f"HNSW{HNSW_M},Flat"
        params = {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": HNSW_EF_SEARCH}
    else:
        raise UserError(f"sslcore embed --index {kind}: use one of {', '.join(INDEX_KINDS)}")
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if kind == "ivf":
        index.nprobe = params["nprobe"]
        index.train(vectors)
    elif kind == "hnsw":
        index.hnsw.efConstruction = params["efConstruction"]
        index.hnsw.efSearch = params["efSearch"]
    index.add(vectors)
    return index, {"type": kind, "factory": factory, "metric": "inner_product", **params}


def recall_at_k(index: faiss.Index, vectors: np.ndarray, k: int = RECALL_K, queries: int = RECALL_QUERIES,
                seed: int = 0) -> float:
    """Recall@k of ``index`` against exact search (``IndexFlatIP``) over the same ``vectors``: the mean share of
    each query's exact k nearest that ``index`` returns, queries a seeded sample of up to ``queries`` vectors."""
    import faiss
    import numpy as np

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    k = min(k, len(vectors))
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    sample = vectors[np.random.default_rng(seed).choice(len(vectors), min(queries, len(vectors)), replace=False)]
    _, truth = exact.search(sample, k)
    _, found = index.search(sample, k)
    return float(np.mean([len(np.intersect1d(t, f)) / k for t, f in zip(truth, found)]))


# -- search ---------------------------------------------------------------------------------------------------

@dataclass
class Embedding:
    """A folder written by :func:`embed`: its record, index and row paths."""

    directory: Path
    record: dict[str, Any]
    index: faiss.Index
    paths: list[str]


@dataclass
class Neighbour:
    rank: int  # 1: the nearest
    similarity: float  # cosine similarity to the query
    path: str  # the image file (NAME[i] for a dataset not of files)
    row: int  # its row in embeddings.npy


def load_embedding(directory: Path) -> Embedding:
    """Read a folder written by :func:`embed`; a folder without ``embed.json`` is one line with the fix."""
    import faiss

    record_file = directory / EMBED_JSON
    if not record_file.is_file():
        where = "no such folder" if not directory.exists() else f"no {EMBED_JSON} in it"
        raise UserError(f"sslcore search {directory}: {where}; give a folder written by sslcore embed TARGET -o DIR")
    try:
        record = json.loads(record_file.read_text())
        index = faiss.read_index(str(directory / INDEX))
        paths = (directory / PATHS).read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError, RuntimeError) as exc:  # faiss raises RuntimeError for a broken or missing file
        reason = " ".join(str(exc).split())[:200]
        raise UserError(f"sslcore search {directory}: cannot read what sslcore embed wrote ({reason}); embed "
                        "again") from None
    if not index.ntotal == len(paths) == record["count"]:
        raise UserError(f"sslcore search {directory}: {INDEX} holds {index.ntotal} vectors, {PATHS} {len(paths)} "
                        f"paths, {EMBED_JSON} says {record['count']}; embed again")
    return Embedding(directory=directory, record=record, index=index, paths=paths)


def search(embedding: Embedding, image: Path, registry: Registry, *, k: int = 10, device: str | None = None
             ) -> list[Neighbour]:
    """``sslcore search``: the ``k`` rows of ``embedding``'s index (:func:`load_embedding`) nearest to ``image``,
    embedded by the backbone and eval transform that embedded the rows (from ``embed.json``)."""
    import numpy as np
    import torch

    from sslcore.commands.evaluate import find_target, load_backbone
    from sslcore.toolkit.images import load_image

    directory = embedding.directory
    count = embedding.index.ntotal
    if not 1 <= k <= count:
        raise UserError(f"sslcore search -k {k}: {directory} holds {count} images; give -k from 1 to {count}")
    try:
        pixels = load_image(str(image))
    except UnreadableImage as exc:
        raise UserError(f"sslcore search {image}: cannot read it as an image ({exc.reason}); give an image file") \
            from None
    record = embedding.record
    weights, config = Path(record["weights"]), Path(record["config"])
    for what, path in (("weights", weights), ("experiment", config)):
        if not path.is_file():
            raise UserError(f"{directory / EMBED_JSON}: the {what} it was embedded with, {path}, is gone; embed "
                            "again with sslcore embed")
    loaded = load_backbone(find_target(weights, registry, config, device, command="search"), registry)
    context = loaded.context(registry)
    with torch.inference_mode(), context.autocast():
        out = loaded.backbone(context.to_device(loaded.augmentation.eval(pixels)[None]))
    query = torch.nn.functional.normalize(out.float(), dim=1).cpu().numpy()  # 1 x D, as embed's rows
    if query.shape[1] != embedding.index.d:
        raise UserError(f"sslcore search: the backbone gives {query.shape[1]}-d features, {directory}'s index "
                        f"holds {embedding.index.d}-d ones; embed again")
    similarities, rows = embedding.index.search(np.ascontiguousarray(query), k)
    return [Neighbour(rank=rank, similarity=float(similarity), path=embedding.paths[row], row=int(row))
            for rank, (similarity, row) in enumerate(zip(similarities[0], rows[0]), start=1)
            if row >= 0]  # -1: an approximate index found fewer than k


def plot_neighbours(image: Path, neighbours: list[Neighbour], output: Path, embedding: Embedding,
                    registry: Registry, columns: int = 10) -> Path:
    """Draw the query beside its neighbours, rows of ``columns`` with their rank and similarity, into ``output``."""
    from matplotlib.figure import Figure

    from sslcore.toolkit.images import load_image

    rows = max(1, math.ceil(len(neighbours) / columns))
    width = min(len(neighbours), columns) + 1
    figure = Figure(figsize=(1.6 * width, 1.9 * rows), dpi=100)
    axes = figure.subplots(rows, width, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(load_image(str(image)))
    axes[0, 0].set_title(f"query\n{image.name}", fontsize=8)
    pixels = _neighbour_images(neighbours, embedding, registry)
    for i, (neighbour, picture) in enumerate(zip(neighbours, pixels)):
        ax = axes[i // columns, 1 + i % columns]
        ax.imshow(picture)
        ax.set_title(f"{neighbour.rank}: {neighbour.similarity:.4f}", fontsize=8)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output)
    return output


def _neighbour_images(neighbours: list[Neighbour], embedding: Embedding, registry: Registry) -> list[np.ndarray]:
    """Each neighbour's image: its file, or item i of the embedded dataset for a dataset not of files."""
    from sslcore.toolkit.images import load_image

    record = embedding.record
    try:
        if record["path_kind"] == "files":
            return [load_image(neighbour.path) for neighbour in neighbours]
        dataset = registry.build("dataset", record["data"])
        if len(dataset) != record["count"] + record["skipped"]:
            raise UserError(f"sslcore search {embedding.directory}: its dataset now holds {len(dataset)} items, "
                            f"{record['count'] + record['skipped']} when embedded; embed again")
        return [dataset[int(neighbour.path.rsplit("[", 1)[1].rstrip("]"))][0] for neighbour in neighbours]
    except UnreadableImage as exc:
        raise UserError(f"sslcore search {embedding.directory}: a neighbour's image cannot be read any more "
                        f"({exc}); embed again") from None
