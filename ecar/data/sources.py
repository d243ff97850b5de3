"""Image sources behind one interface, and the one image preprocessing every job shares.

A source enumerates record keys per split in a fixed order (so shard `i` always holds the same
records and a re-run can skip finished shards without loading them) and loads records by key.
Records carry the raw image (encoded bytes or a uint8 array), the label or None, and where the
record came from; decoding and checks happen in `prepare` so that bad records are quarantined
rather than crash a job.

Sources:
- `fashion_mnist`: Debian's dataset-fashion-mnist idx files (train 60k, test 10k).
- `image_folder`: ROOT/CLASS/*.png|jpg...; or ROOT/SPLIT/CLASS/... with SPLIT in train/test/
  val/validation (ImageNet's train/n01440764/*.JPEG). Label i is the i-th class folder in sorted
  order (the class names are recorded with the shards). Files directly under ROOT (or ROOT/SPLIT)
  have no class: "missing label"; a file that cannot be read is quarantined, not fatal.
- `parquet`: Parquet files with an `image` column (bytes, or a struct with `bytes` as written
  by Hugging Face datasets), a `label` column (int, nullable) and optionally `id`; directly
  under ROOT (one split, "train") or under ROOT/SPLIT/.
"""

from __future__ import annotations

import gzip
import io
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from ecar import storage
from ecar.config import DataConfig, StorageConfig

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLIT_NAMES = ("train", "test", "val", "validation")


class BadImage(ValueError):
    """A record's image cannot be used; the message is the quarantine reason."""


@dataclass(frozen=True)
class ImageRecord:
    id: str
    image: bytes | np.ndarray | None  # encoded file bytes, or a (H, W[, C]) uint8 array
    label: int | None
    source: str  # where it came from (file, or file#row), for the quarantine table
    error: str = ""  # why the file could not be read (vanished, permissions, I/O), else ""


class ImageSource(Protocol):
    name: str

    def splits(self) -> list[str]: ...

    def class_names(self) -> list[str]: ...

    def keys(self, split: str) -> list[str]: ...

    def load(self, split: str, keys: list[str]) -> Iterator[ImageRecord]: ...


# ----- preprocessing ------------------------------------------------------------------------
def decode_image(image: bytes | np.ndarray) -> Image.Image:
    """A fully decoded PIL image; raises BadImage for undecodable or truncated data."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise BadImage(f"unsupported array image {image.dtype} {image.shape}")
        return Image.fromarray(image)
    try:
        picture = Image.open(io.BytesIO(image))
        picture.load()  # decode now: a truncated file fails here, not later in a worker
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError ... for bad bytes
        raise BadImage(f"undecodable image: {type(error).__name__}: {error}") from None
    return picture


def to_mode(picture: Image.Image, channels: int) -> Image.Image:
    """Grayscale ("L") for 1 channel, RGB for 3; alpha and palettes are flattened by PIL."""
    mode = "L" if channels == 1 else "RGB"
    return picture if picture.mode == mode else picture.convert(mode)


def center_crop(picture: Image.Image, size: int) -> Image.Image:
    """The size x size center crop as ADM and DiT make their ImageNet images (`center_crop_arr`):
    halve with a box filter while the shorter side is at least 2 * size (anti-aliased, cheap
    on large photos), bicubic-resize the shorter side to exactly `size`, crop the center."""
    while min(picture.size) >= 2 * size:
        picture = picture.resize(tuple(side // 2 for side in picture.size), resample=Image.Resampling.BOX)
    scale = size / min(picture.size)
    picture = picture.resize(tuple(round(side * scale) for side in picture.size), resample=Image.Resampling.BICUBIC)
    left, top = (picture.size[0] - size) // 2, (picture.size[1] - size) // 2
    return picture.crop((left, top, left + size, top + size))


def to_array(picture: Image.Image) -> np.ndarray:
    """(H, W, C) uint8 with C = 1 or 3."""
    array = np.asarray(picture, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def encode_png(array_HWC: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array_HWC[:, :, 0] if array_HWC.shape[2] == 1 else array_HWC).save(buffer, format="PNG")
    return buffer.getvalue()


# ----- Fashion-MNIST --------------------------------------------------------------------------
def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


@lru_cache(maxsize=2)
def _fashion_mnist_arrays(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    paths = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [posixpath.join(root, f"{prefix}-{kind}{ext}") for ext in (".gz", "")]
        found = [p for p in candidates if storage.exists(p)]
        if not found:
            raise FileNotFoundError(
                f"Fashion-MNIST file {candidates[0]} is missing "
                "(apt-get install dataset-fashion-mnist, or set data.source_uri)"
            )
        paths.append(found[0])
    return _read_idx(paths[0]), _read_idx(paths[1])


class FashionMNISTSource:
    name = "fashion_mnist"

    def __init__(self, root: str = "") -> None:
        self.root = root or FASHION_MNIST_ROOT

    def splits(self) -> list[str]:
        return ["train", "test"]

    def class_names(self) -> list[str]:
        return list(FASHION_MNIST_CLASSES)

    def keys(self, split: str) -> list[str]:
        images, _ = _fashion_mnist_arrays(self.root, split)
        return [f"{split}/{i:06d}" for i in range(len(images))]

    def load(self, split: str, keys: list[str]) -> Iterator[ImageRecord]:
        images, labels = _fashion_mnist_arrays(self.root, split)
        for key in keys:
            index = int(key.rsplit("/", 1)[1])
            yield ImageRecord(key, images[index], int(labels[index]), f"fashion_mnist:{key}")


# ----- a folder tree --------------------------------------------------------------------------
class ImageFolderSource:
    name = "image_folder"

    def __init__(self, uri: str, storage_config: StorageConfig | None = None) -> None:
        if not uri:
            raise FileNotFoundError("data.source_uri must name the image folder")
        self.uri, self.storage = storage.absolute(uri), storage_config  # read by workers elsewhere
        self.fs, self.root = storage.fsspec_fs(uri, storage_config)
        if not self.fs.isdir(self.root):
            raise FileNotFoundError(f"image folder {uri} does not exist")
        subfolders = self._subfolders(self.root)
        self.split_folders = [s for s in subfolders if s in SPLIT_NAMES]
        class_root = (
            posixpath.join(self.root, "train")
            if "train" in self.split_folders
            else (posixpath.join(self.root, self.split_folders[0]) if self.split_folders else self.root)
        )
        self.classes = self._subfolders(class_root)

    def _subfolders(self, path: str) -> list[str]:
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False) if self.fs.isdir(p))

    def splits(self) -> list[str]:
        return self.split_folders or ["train"]

    def class_names(self) -> list[str]:
        return list(self.classes)

    def keys(self, split: str) -> list[str]:
        base = posixpath.join(self.root, split) if self.split_folders else self.root
        files = self.fs.find(base)
        return sorted(posixpath.relpath(f, base) for f in files if not posixpath.basename(f).startswith("."))

    def load(self, split: str, keys: list[str]) -> Iterator[ImageRecord]:
        base = posixpath.join(self.root, split) if self.split_folders else self.root
        for key in keys:
            folder = key.split("/")[0] if "/" in key else None
            label = self.classes.index(folder) if folder in self.classes else None
            uri = storage.join(self.uri, split, key) if self.split_folders else storage.join(self.uri, key)
            try:
                image, error = self.fs.cat_file(posixpath.join(base, key)), ""
            except OSError as failure:  # one bad file (a dangling link, a permission) must not end the job
                image, error = None, f"{type(failure).__name__}: {failure}"
            yield ImageRecord(f"{split}/{key}", image, label, uri, error)


# ----- Parquet shards -------------------------------------------------------------------------
class ParquetSource:
    name = "parquet"

    def __init__(
        self,
        uri: str,
        storage_config: StorageConfig | None = None,
        num_classes: int = 0,
        class_names: list[str] | None = None,
    ) -> None:
        if not uri:
            raise FileNotFoundError("data.source_uri must name the Parquet folder")
        self.uri, self.storage = storage.absolute(uri), storage_config  # read by workers elsewhere
        if not storage.exists(uri, storage_config):
            raise FileNotFoundError(f"Parquet source {uri} does not exist")
        top = storage.list_files(uri, ".parquet", storage_config)
        fs, root = storage.fsspec_fs(uri, storage_config)
        folders = [posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False) if fs.isdir(p)]
        self.split_folders = [] if top else sorted(f for f in folders if f in SPLIT_NAMES)
        if not top and not self.split_folders:
            raise FileNotFoundError(f"no .parquet files under {uri} or its train/test folders")
        self.names = class_names or [str(i) for i in range(num_classes)]

    def splits(self) -> list[str]:
        return self.split_folders or ["train"]

    def class_names(self) -> list[str]:
        return list(self.names)

    def _files(self, split: str) -> list[str]:
        folder = storage.join(self.uri, split) if self.split_folders else self.uri
        return storage.list_files(folder, ".parquet", self.storage)

    def keys(self, split: str) -> list[str]:
        keys = []
        for file in self._files(split):
            fs, path = storage.arrow_fs(file, self.storage)
            rows = pq.ParquetFile(path, filesystem=fs).metadata.num_rows
            keys += [f"{posixpath.basename(file)}#{row}" for row in range(rows)]
        return keys

    def load(self, split: str, keys: list[str]) -> Iterator[ImageRecord]:
        folder = storage.join(self.uri, split) if self.split_folders else self.uri
        table_name, table = None, None
        for key in keys:
            name, row = key.rsplit("#", 1)
            if name != table_name:  # keys come sorted by file, so each file is read once per shard
                table_name, table = name, read_image_table(storage.join(folder, name), self.storage)
            record = table[int(row)]
            yield ImageRecord(
                record.get("id") or f"{split}/{key}",
                record["image"],
                record["label"],
                f"{storage.join(folder, name)}#{row}",
            )


def read_image_table(uri: str, storage_config: StorageConfig | None = None) -> list[dict]:
    """Rows of an image Parquet file as dicts with `image` (bytes or None), `label` (int or
    None) and `id` (str or None); a missing column reads as None in every row."""
    fs, path = storage.arrow_fs(uri, storage_config)
    table = pq.read_table(path, filesystem=fs)
    columns = set(table.column_names)
    if "image" not in columns:
        raise ValueError(f"{uri} has no `image` column (columns: {', '.join(sorted(columns))})")
    images = table.column("image").to_pylist()
    images = [i.get("bytes") if isinstance(i, dict) else i for i in images]
    labels = table.column("label").to_pylist() if "label" in columns else [None] * len(images)
    ids = table.column("id").to_pylist() if "id" in columns else [None] * len(images)
    return [{"id": i, "image": im, "label": lab} for i, im, lab in zip(ids, images, labels)]


def open_source(data: DataConfig, storage_config: StorageConfig | None = None, num_classes: int = 0) -> ImageSource:
    """The source `data.source` names, at `data.source_uri`."""
    if data.source == "fashion_mnist":
        return FashionMNISTSource(data.source_uri)
    if data.source == "image_folder":
        return ImageFolderSource(data.source_uri, storage_config)
    return ParquetSource(data.source_uri, storage_config, num_classes=num_classes)
