"""``sslcore embed`` and ``sslcore search`` on real CIFAR-10 test images with a real backbone.pt.

The backbone is the quickstart's ResNet-18 (standard stem, 32 px) at its seeded random initialisation, written as
``sslcore export`` writes one (state_dict + the experiment beside it): search mechanics do not depend on training,
and its features, all within cosine ~0.9 of each other, make a hard case for the approximate indexes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from sslcore.commands import embed as embed_module
from sslcore.commands.cli import main
from sslcore.commands.embed import build_index, recall_at_k

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

#: recall@10 against flat that the approximate indexes reach on 2000 of these vectors at their default search
#: parameters, with a margin (measured: IVF 51 lists, nprobe 32: 0.9996, nprobe 8: 0.94; HNSW32, efSearch 64: 1.0)
IVF_RECALL_BOUND = 0.98
HNSW_RECALL_BOUND = 0.98


def sslcore(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``sslcore ARGV`` in this process: its exit code (2 with the error's lines on stderr for a user error),
    stdout and stderr."""
    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def backbone(cifar10_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """backbone.pt and backbone.yaml, as sslcore export writes them, of the quickstart's encoder at its seed."""
    import torch
    import yaml

    from sslcore.config import load_yaml, resolve
    from sslcore.engine.launch import dry_build
    from sslcore.engine.loop import seed_everything
    from sslcore.registry import Registry

    data, _ = load_yaml(EXAMPLES / "quickstart.yaml")
    data["data"] = {"name": "image_folder", "root": str(cifar10_dir / "train"), "max_per_class": 20}
    resolved = resolve(data, Registry(), source="quickstart.yaml")
    seed_everything(resolved.experiment.seed)
    folder = tmp_path_factory.mktemp("backbone")
    torch.save(dry_build(resolved, Registry()).backbone.state_dict(), folder / "backbone.pt")
    (folder / "backbone.yaml").write_text(yaml.safe_dump(resolved.as_dict(), sort_keys=False))
    return folder / "backbone.pt"


def cifar10_test_block(cifar10_dir: Path, per_class: int) -> str:
    return json.dumps({"name": "image_folder", "root": str(cifar10_dir / "test"), "max_per_class": per_class})


@pytest.fixture(scope="module")
def flat_dir(backbone: Path, cifar10_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """500 test images embedded into an exact index (``--index auto`` below the threshold)."""
    output = tmp_path_factory.mktemp("embedded") / "flat"
    args = argparse.Namespace(target=backbone, data=cifar10_test_block(cifar10_dir, 50), output=output, config=None,
                              index="auto", threshold=embed_module.DEFAULT_THRESHOLD, device="cpu", batch_size=128,
                              plugin=[])
    assert embed_module.cmd_embed(args) == 0
    return output


def test_embed_writes_an_exact_index_where_every_image_finds_itself(flat_dir: Path, backbone: Path) -> None:
    import faiss

    record = json.loads((flat_dir / "embed.json").read_text())
    assert (record["count"], record["dim"], record["skipped"]) == (500, 512, 0)
    assert record["index"] == {"type": "flat", "factory": "Flat", "metric": "inner_product"}
    assert record["recall"] is None and record["weights"] == str(backbone.resolve())
    assert record["data"]["max_per_class"] == 50 and record["experiment"] == "quickstart"
    vectors = np.load(flat_dir / "embeddings.npy")
    assert vectors.shape == (500, 512) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    paths = (flat_dir / "paths.txt").read_text().splitlines()
    labels = np.load(flat_dir / "labels.npy")
    assert len(paths) == 500 and all(Path(p).is_file() for p in paths)
    assert [record["classes"][label] for label in labels] == [Path(p).parent.name for p in paths]

    index = faiss.read_index(str(flat_dir / "index.faiss"))
    similarities, rows = index.search(vectors, 2)
    assert (rows[:, 0] == np.arange(500)).all(), "an image's nearest neighbour is not itself"
    assert similarities[:, 0].min() > 0.9999 and (similarities[:, 1] < similarities[:, 0]).all()


def test_search_prints_the_query_first_and_draws_it_beside_its_neighbours(
        flat_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    paths = (flat_dir / "paths.txt").read_text().splitlines()
    query = paths[123]
    code, out, err = sslcore(capsys, "search", str(flat_dir), query, "-k", "5", "--device", "cpu")
    assert code == 0, err
    lines = out.splitlines()
    picture_file = flat_dir / f"search_{Path(query).stem}.png"
    assert len(lines) == 6 and lines[-1] == f"wrote {picture_file}", out
    rank, similarity, path = lines[0].split()
    assert (rank, path) == ("1", query) and float(similarity) > 0.999
    assert [int(line.split()[0]) for line in lines[:5]] == [1, 2, 3, 4, 5]
    similarities = [float(line.split()[1]) for line in lines[:5]]
    assert similarities == sorted(similarities, reverse=True) and similarities[1] < 0.999
    picture = np.asarray(Image.open(picture_file).convert("L"), dtype=np.float32)
    assert picture.shape[1] > 3 * picture.shape[0]  # the query and 5 neighbours in a row
    assert picture.std() > 20, "the picture is blank"


def test_ivf_and_hnsw_recall_against_flat(backbone: Path, cifar10_dir: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    import faiss

    output = tmp_path / "ivf"
    code, out, err = sslcore(capsys, "embed", str(backbone), "--data", cifar10_test_block(cifar10_dir, 200),
                             "-o", str(output), "--index", "ivf", "--device", "cpu")
    assert code == 0, err
    record = json.loads((output / "embed.json").read_text())
    assert record["index"] == {"type": "ivf", "factory": "IVF51,Flat", "metric": "inner_product", "nlist": 51,
                               "nprobe": embed_module.IVF_NPROBE}  # 2000 vectors / 39 per list
    assert record["recall"]["k"] == 10 and record["recall"]["queries"] == 1000
    assert record["recall"]["value"] >= IVF_RECALL_BOUND, record["recall"]
    assert f"recall@10 {record['recall']['value']:.3f} against flat" in out
    assert faiss.read_index(str(output / "index.faiss")).nprobe == embed_module.IVF_NPROBE  # searched as measured

    vectors = np.load(output / "embeddings.npy")
    hnsw, params = build_index(vectors, "hnsw")
    assert params["efSearch"] == embed_module.HNSW_EF_SEARCH and hnsw.hnsw.efSearch == params["efSearch"]
    assert recall_at_k(hnsw, vectors) >= HNSW_RECALL_BOUND
    assert build_index(vectors[:100], "auto", threshold=99)[1]["type"] == "hnsw"
    assert build_index(vectors[:100], "auto", threshold=100)[1]["type"] == "flat"


def test_recall_counts_what_the_index_misses() -> None:
    """recall_at_k against an index that returns the exact neighbours of other vectors."""
    import faiss

    vectors = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    faiss.normalize_L2(vectors)
    exact, _ = build_index(vectors, "flat")
    assert recall_at_k(exact, vectors, k=10, queries=50) == 1.0
    shuffled = faiss.IndexFlatIP(16)
    shuffled.add(np.ascontiguousarray(vectors[::-1]))  # rows in reverse: every returned id is another vector
    assert recall_at_k(shuffled, vectors, k=10, queries=50) < 0.2


@pytest.mark.parametrize(("argv", "message"), [
    (["embed", "{backbone}", "--data", "{name: image_folder, root: /tmp, max_per_clas: 5}", "-o", "{tmp}/out"],
     "sslcore embed --data: max_per_clas: unknown key 'max_per_clas' — did you mean 'max_per_class'?"),
    (["embed", "{backbone}", "--data", "{tmp}/no_such_folder", "-o", "{tmp}/out"],
     "sslcore embed --data {tmp}/no_such_folder: no such folder; give a folder of images"),
    (["search", "{tmp}/no_such_folder", "{tmp}/query.png"],
     "sslcore search {tmp}/no_such_folder: no such folder; give a folder written by sslcore embed"),
    (["search", "{tmp}", "{tmp}/query.png"], "sslcore search {tmp}: no embed.json in it"),
    (["search", "{flat}", "{tmp}/query.png", "-k", "501"], "-k 501: {flat} holds 500 images; give -k from 1 to 500"),
    (["search", "{flat}", "{backbone}"], "sslcore search {backbone}: cannot read it as an image"),
])
def test_user_errors_are_one_line(argv: list[str], message: str, backbone: Path, flat_dir: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    names = {"backbone": str(backbone), "tmp": str(tmp_path), "flat": str(flat_dir)}
    code, _, err = sslcore(capsys, *(arg.replace("{backbone}", names["backbone"]).replace("{tmp}", names["tmp"])
                                     .replace("{flat}", names["flat"]) for arg in argv))
    assert code == 2 and err.count("\n") == 1, err
    assert message.format(**names) in err, err
