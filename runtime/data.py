"""Image classification data: the embedded `digits` set, a CIFAR-100 folder, or an image folder.

Every loader returns `Splits`: train/validation/test `ImageDataset`s holding float32 images in
[0, 1] (not normalized) plus the per-channel mean/std of the train split, which the model bundle
records as its input normalization. Nothing is ever downloaded.

Specs accepted by `load_data`:

- ``digits``: scikit-learn's bundled handwritten digits (1797 8x8 images, 10 classes), replicated
  to 3 channels and resized to 32x32 by default; seeded stratified 60/20/20 train/val/test split.
- ``cifar100:PATH``: the standard ``cifar-100-python`` folder (``train``, ``test``, ``meta``),
  read with a restricted unpickler; the ``train`` file is split into train/val, ``test`` is test.
- ``imagefolder:PATH``: ``PATH/train/<class>/*.png`` (optionally ``PATH/val``, ``PATH/test``;
  a missing one is carved from train), or a flat ``PATH/<class>/*.png`` split 60/20/20.

Every class must have images in every split (a `DataError` names the classes that lack them):
steering settings are chosen per class on val and reported per class on test, so a class missing
from either would silently go unsteered or unreported.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

from headsteer.runtime.bundle import repeated_names
from headsteer.runtime.engine import wide_mode_problem
from headsteer.runtime.errors import DataError, InputError

ACCEPTED_SPECS = "'digits', 'cifar100:PATH' (a cifar-100-python folder) or 'imagefolder:PATH'"
DEFAULT_VAL_FRACTION = 0.2
DEFAULT_TEST_FRACTION = 0.2
DIGITS_IMAGE_SIZE = 32
CIFAR_IMAGE_SIZE = 32
IMAGEFOLDER_IMAGE_SIZE = 224


@dataclass
class ImageDataset:
    """Labelled images: `images` float32 [N, 3, H, W] in [0, 1], `labels` int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.float32 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise DataError(
                f"images must be float32 [N, 3, H, W]; got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise DataError(
                f"labels must be int64 [{self.images.shape[0]}] (one per image); "
                f"got {self.labels.dtype} {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the images."""
        return tuple(self.images.shape[-2:])

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ImageDataset:
        """The images at `indices`, same class names."""
        index = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        return ImageDataset(self.images[index], self.labels[index], self.class_names)

    def tensor_dataset(self) -> TensorDataset:
        """(image, label) pairs for a torch `DataLoader`."""
        return TensorDataset(self.images, self.labels)

    def batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (images, labels) batches; with `shuffle`, in an order fixed by `seed`."""
        if batch_size < 1:
            raise InputError(f"batch_size must be a positive integer; got {batch_size}")
        if shuffle:
            order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        else:
            order = torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            index = order[start : start + batch_size]
            yield self.images[index], self.labels[index]


@dataclass
class Splits:
    """Train/validation/test datasets and the input normalization computed on train."""

    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def class_names(self) -> list[str]:
        return self.train.class_names

    @property
    def image_size(self) -> tuple[int, int]:
        return self.train.image_size


def check_seed(seed, what: str = "seed") -> None:
    """InputError unless `seed` is an integer scikit-learn's split takes, [0, 2**32 - 1]; `what`
    names it (e.g. "--seed")."""
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise InputError(f"{what} must be an integer in [0, 2**32 - 1]; got {seed!r}")


def load_data(
    spec: str,
    *,
    image_size: int | tuple[int, int] | None = None,
    seed: int = 0,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    progress: bool = True,
) -> Splits:
    """Load the data set named by `spec` and split it reproducibly for `seed`.

    `val_fraction`/`test_fraction` are the shares of the pool a split is carved from: the whole
    set for `digits` and flat image folders, the ``train`` file or folder when the data brings
    its own test (and for image folders, val) split. `image_size`, a side length or a (height,
    width) pair, defaults to 32 for digits and CIFAR-100 and to 224 for image folders. `progress`:
    show a bar while reading image folders.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty data spec; expected {ACCEPTED_SPECS}")
    if image_size is not None:
        image_size = _height_width(image_size)
    check_seed(seed)  # (before any image is read: another seed is no failed stratified split)
    for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < fraction < 1:
            raise InputError(f"{name} must be strictly between 0 and 1; got {fraction}")
    if val_fraction + test_fraction >= 1:
        raise InputError(
            f"val_fraction + test_fraction must leave data for training; got {val_fraction} + {test_fraction}"
        )

    kind, _, path = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "digits" and not path:
        return _load_digits(image_size or _height_width(DIGITS_IMAGE_SIZE), seed, val_fraction, test_fraction)
    if kind in ("cifar100", "imagefolder"):
        if not path.strip():
            raise DataError(f"data spec {spec!r} names no folder; expected '{kind}:PATH'")
        folder = Path(path.strip()).expanduser()
        if not folder.is_dir():
            raise DataError(f"data spec {spec!r}: folder {folder} does not exist or is not a directory")
        if kind == "cifar100":
            return _load_cifar100(folder, image_size or _height_width(CIFAR_IMAGE_SIZE), seed, val_fraction)
        return _load_imagefolder(
            folder, image_size or _height_width(IMAGEFOLDER_IMAGE_SIZE), seed, val_fraction, test_fraction, progress
        )
    raise DataError(f"unknown data spec {spec!r}; expected {ACCEPTED_SPECS}")


# --- digits -----------------------------------------------------------------------------------


def _load_digits(image_size: tuple[int, int], seed: int, val_fraction: float, test_fraction: float) -> Splits:
    """scikit-learn's digits (values 0..16) as 3-channel [0, 1] images, split 3 ways."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)
    images = _resize(gray.expand(-1, 3, -1, -1).contiguous(), image_size)
    labels = torch.from_numpy(digits.target).long()
    full = ImageDataset(images, labels, [str(name) for name in digits.target_names])
    train, val, test = _stratified_partition(full.labels, val_fraction, test_fraction, seed)
    return _make_splits(full.subset(train), full.subset(val), full.subset(test))


# --- CIFAR-100 --------------------------------------------------------------------------------

# The only globals the cifar-100-python pickles (or a modern re-pickling of them) reference:
# numpy's array and dtype reconstructors, and the codec Python 3 uses for bytes in protocol 2.
_CIFAR_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy array/dtype reconstructors, never arbitrary code."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_ALLOWED_GLOBALS:
            raise DataError(
                f"refusing to unpickle global {module}.{name}: a cifar-100-python file holds only "
                "dicts, lists, bytes and numpy arrays"
            )
        return super().find_class(module, name)


def _read_cifar_pickle(path: Path) -> dict[str, object]:
    """Read one cifar-100-python file into a dict with str keys, executing no pickled code."""
    if not path.is_file():
        raise DataError(
            f"missing CIFAR-100 file {path}; expected a cifar-100-python folder with train, test and meta"
        )
    try:
        with path.open("rb") as file:
            content = _RestrictedUnpickler(file, encoding="bytes").load()
    except DataError:
        raise
    except Exception as error:
        raise DataError(f"{path} is not a readable cifar-100-python pickle: {error}") from error
    if not isinstance(content, dict):
        raise DataError(f"{path} holds a {type(content).__name__}; expected a dict")
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in content.items()}


def _cifar_field(content: dict[str, object], key: str, path: Path) -> object:
    if key not in content:
        raise DataError(f"{path} has no {key!r} entry; found {sorted(map(str, content))}")
    return content[key]


def _read_cifar_split(path: Path, class_names: list[str], image_size: tuple[int, int]) -> ImageDataset:
    """Images (rows of 3072 uint8, channel-major 3x32x32) and fine labels of one CIFAR file."""
    content = _read_cifar_pickle(path)
    data = _cifar_field(content, "data", path)
    fine_labels = _cifar_field(content, "fine_labels", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise DataError(f"{path} 'data' must be a uint8 array [N, 3072]; got {type(data).__name__} {shape}")
    labels = np.asarray(fine_labels)
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{path} 'fine_labels' must be {data.shape[0]} integers (one per image); got shape {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise DataError(
            f"{path} has fine labels in [{labels.min()}, {labels.max()}]; "
            f"expected [0, {len(class_names) - 1}]"
        )
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()).float().div_(255.0)
    return ImageDataset(_resize(images, image_size), torch.from_numpy(labels.astype(np.int64)), class_names)


def _load_cifar100(folder: Path, image_size: tuple[int, int], seed: int, val_fraction: float) -> Splits:
    """The cifar-100-python folder: fine labels; `train` split into train/val, `test` as test."""
    meta_path = folder / "meta"
    names = _cifar_field(_read_cifar_pickle(meta_path), "fine_label_names", meta_path)
    if not isinstance(names, list) or not names:
        raise DataError(f"{meta_path} 'fine_label_names' must be a non-empty list of names")
    class_names = [name.decode("utf-8") if isinstance(name, bytes) else str(name) for name in names]
    _check_class_names(class_names, meta_path)
    train_file = _read_cifar_split(folder / "train", class_names, image_size)
    test = _read_cifar_split(folder / "test", class_names, image_size)
    train, val, _ = _stratified_partition(train_file.labels, val_fraction, 0.0, seed)
    return _make_splits(train_file.subset(train), train_file.subset(val), test)


# --- image folders ----------------------------------------------------------------------------


def _load_imagefolder(
    folder: Path, image_size: tuple[int, int], seed: int, val_fraction: float, test_fraction: float,
    progress: bool = True,
) -> Splits:
    """An ImageFolder tree: `train/`[`val/`, `test/`] of class folders, or class folders directly."""
    if (folder / "train").is_dir():
        # Any other folder beside train/ (say validation/) would be ignored without a word.
        others = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir()
                        and not _skipped(entry.name) and entry.name not in ("train", "val", "test"))
        if others:
            raise DataError(
                f"{folder} has folders {others} beside train/; with train/ it may hold only val/ and "
                "test/ (rename a validation folder to val/), without it only class folders"
            )
        class_names, class_to_idx = _find_classes(folder / "train")
        _check_class_names(class_names, folder / "train")
        pool = _read_image_tree(folder / "train", class_names, class_to_idx, image_size, progress)
        given = {
            split: _read_image_tree(folder / split, class_names, class_to_idx, image_size, progress)
            for split in ("val", "test")
            if (folder / split).is_dir()
        }
        carve_val = 0.0 if "val" in given else val_fraction
        carve_test = 0.0 if "test" in given else test_fraction
        train, val, test = _stratified_partition(pool.labels, carve_val, carve_test, seed)
        return _make_splits(
            pool.subset(train),
            given["val"] if "val" in given else pool.subset(val),
            given["test"] if "test" in given else pool.subset(test),
        )
    class_names, class_to_idx = _find_classes(folder)
    _check_class_names(class_names, folder)
    pool = _read_image_tree(folder, class_names, class_to_idx, image_size, progress)
    train, val, test = _stratified_partition(pool.labels, val_fraction, test_fraction, seed)
    return _make_splits(pool.subset(train), pool.subset(val), pool.subset(test))


def _check_class_names(class_names: list[str], source: Path) -> None:
    """DataError unless `source` names at least two classes, each once: with one, a model has
    nothing to classify or steer between; two of one name could not be told apart by the steering
    rows and per-class reports, which go by name."""
    repeated = repeated_names(class_names)
    if repeated:
        raise DataError(f"{source} names {repeated} more than once; class names must be distinct")
    if len(class_names) < 2:
        raise DataError(f"{source} has only one class {class_names}; a classifier needs at least two")


# Names an image tree may hold that are not data: besides hidden ones (.DS_Store,
# .ipynb_checkpoints/), what macOS zips and Windows Explorer leave behind.
_OS_LITTER = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})


def _skipped(name: str) -> bool:
    """Whether a file or folder of an image tree is left out: hidden, or OS litter."""
    return name.startswith(".") or name in _OS_LITTER


def _find_classes(folder: Path) -> tuple[list[str], dict[str, int]]:
    """The class folders of `folder`, sorted, and their indices (torchvision's `find_classes`, but
    leaving out hidden folders and OS litter, which it would take as classes)."""
    try:
        class_names = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not _skipped(entry.name))
    except OSError as error:
        raise DataError(f"cannot list {folder}: {error.strerror or error}") from error
    if not class_names:
        raise DataError(f"no class folders in {folder}; expected {folder}/<class>/<image> (or train/<class>/<image>)")
    return class_names, {name: index for index, name in enumerate(class_names)}


def _class_files(folder: Path, class_to_idx: dict[str, int]) -> tuple[list[tuple[str, int]], list[Path]]:
    """(image path, class index) of every image under `folder`/<class>/ at any depth, in sorted
    order, and the other files there (no image extension), which reading would skip without a
    word; hidden files and folders and OS litter are left out of both."""
    samples, strays = [], []
    for name, index in sorted(class_to_idx.items()):
        walked = []
        for root, folders, files in os.walk(folder / name, followlinks=True):
            folders[:] = [entry for entry in folders if not _skipped(entry)]
            walked.append((root, files))
        # (sorted by folder path, then file name: torchvision's make_dataset order, which the splits
        # of earlier bundles were drawn over; a split seed must keep drawing the same split)
        for root, files in sorted(walked):
            for file in sorted(files):
                if _skipped(file):
                    continue
                path = Path(root) / file
                if file.lower().endswith(IMG_EXTENSIONS):
                    samples.append((str(path), index))
                else:
                    strays.append(path)
    return samples, strays


def _read_image_tree(
    folder: Path, class_names: list[str], class_to_idx: dict[str, int], image_size: tuple[int, int],
    progress: bool = True,
) -> ImageDataset:
    """Every image under `folder`/<class>/, as RGB resized to `image_size` (height, width)."""
    found, _ = _find_classes(folder)
    unknown = sorted(set(found) - set(class_to_idx))
    if unknown:
        raise DataError(
            f"{folder} has class folders {unknown} that the train split lacks; "
            f"its class folders must be among the train split's {class_names}"
        )
    samples, strays = _class_files(folder, {name: class_to_idx[name] for name in found})
    if strays:
        listed = ", ".join(str(path) for path in strays[:5]) + (" ..." if len(strays) > 5 else "")
        raise DataError(
            f"{folder} holds {len(strays)} files that are not images by their extension ({listed}); "
            f"class folders may hold only {', '.join(IMG_EXTENSIONS)} files (hidden files and folders, "
            f"{', '.join(sorted(_OS_LITTER))} are left out): remove or convert the others"
        )
    empty = sorted(set(found) - {class_names[index] for _, index in samples})
    if empty:
        raise DataError(f"{folder}: no valid file for the classes {', '.join(empty)}; every class folder needs at "
                        f"least one image ({', '.join(IMG_EXTENSIONS)})")
    images = torch.empty(len(samples), 3, *image_size)
    bar = tqdm(samples, desc=f"loading {folder.name}", unit="img", disable=not progress)
    for position, (path, _) in enumerate(bar):
        images[position] = _read_image(Path(path), image_size)
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return ImageDataset(images, labels, class_names)


def _read_image(path: Path, image_size: tuple[int, int]) -> torch.Tensor:
    """One image file as float32 [3, height, width] in [0, 1] (PIL bilinear resize, antialiased).
    Any 8-bit mode (gray, palette, RGBA, ...) is converted to RGB; a wider one (16-bit, float) is
    refused, as the engine refuses it, since 8-bit conversion would clip it, not scale it."""
    try:
        with Image.open(path) as image:
            problem = wide_mode_problem(image, f"image {path}", tensor_hint=False)
            if problem is None:
                height, width = image_size
                rgb = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)  # (PIL: width first)
    except Exception as error:
        raise DataError(f"cannot read image {path}: {error}") from error
    if problem is not None:
        raise DataError(problem)
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)


# --- shared -----------------------------------------------------------------------------------


def _height_width(image_size) -> tuple[int, int]:
    """(height, width) from a side length or a (height, width) pair of positive integers, as timm
    takes `img_size`; anything else is an InputError."""
    pair = (image_size, image_size) if isinstance(image_size, (int, np.integer)) else image_size
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or not all(isinstance(side, (int, np.integer)) and not isinstance(side, bool) and side >= 1
                       for side in pair)):
        raise InputError(f"image_size must be a positive integer or a (height, width) pair of them; got {image_size!r}")
    return int(pair[0]), int(pair[1])


def _resize(images: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased resize of [N, 3, h, w] to [N, 3, height, width]; a no-op at that size."""
    if tuple(images.shape[-2:]) == image_size:
        return images
    resized = F.interpolate(images, size=image_size, mode="bilinear", antialias=True, align_corners=False)
    return resized.clamp_(0.0, 1.0)


def _stratified_partition(
    labels: torch.Tensor, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded, stratified train/val/test indices; a zero fraction gives an empty split."""
    indices = np.arange(len(labels))
    strata = labels.numpy()
    try:
        rest, test = _split_off(indices, strata, test_fraction, seed)
        train, val = _split_off(rest, strata[rest], val_fraction / (1.0 - test_fraction), seed)
    except ValueError as error:
        counts = np.bincount(strata)
        raise DataError(
            f"cannot make a stratified split (val {val_fraction}, test {test_fraction}) "
            f"of {len(labels)} images with per-class counts {counts.tolist()}: {error}; "
            "each split needs at least one image of every class"
        ) from error
    return np.sort(train), np.sort(val), np.sort(test)


def _split_off(
    indices: np.ndarray, strata: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split `fraction` of `indices` off, stratified by `strata`: (kept, split off)."""
    if fraction == 0:
        return indices, indices[:0]
    kept, split = train_test_split(indices, test_size=fraction, random_state=seed, stratify=strata)
    return kept, split


def _check_every_class_present(train: ImageDataset, val: ImageDataset, test: ImageDataset) -> None:
    """DataError naming the classes some split has no image of (per-class steering is chosen on
    val and reported on test, so such a class would silently go unsteered or unreported)."""
    splits = {"train": train, "validation": val, "test": test}
    counts = {name: torch.bincount(s.labels, minlength=train.num_classes).tolist() for name, s in splits.items()}
    missing = {
        name: [train.class_names[c] for c, n in enumerate(per_class) if n == 0] for name, per_class in counts.items()
    }
    missing = {name: classes for name, classes in missing.items() if classes}
    if not missing:
        return
    where = "; ".join(f"the {name} split has no image of {classes[:10]}" + (" ..." if len(classes) > 10 else "")
                      for name, classes in missing.items())
    images = {c: sum(counts[name][i] for name in counts) for i, c in enumerate(train.class_names)}
    short = {c: images[c] for classes in missing.values() for c in classes}
    raise DataError(
        f"{where} (images per class in all splits: {short}); every split needs at least one image of "
        "every class: give those classes more images, or (image folders) val/ and test/ folders "
        "that hold them"
    )


def _make_splits(train: ImageDataset, val: ImageDataset, test: ImageDataset) -> Splits:
    """Bundle the splits with the per-channel mean/std of the train images."""
    if len(train) == 0:
        raise DataError("the train split is empty; expected at least one image per class")
    _check_every_class_present(train, val, test)
    mean = train.images.mean(dim=(0, 2, 3))
    std = train.images.std(dim=(0, 2, 3))
    if not torch.all(std > 0):
        raise DataError(f"train images have a constant channel (std {std.tolist()}); cannot normalize")
    return Splits(train, val, test, tuple(mean.tolist()), tuple(std.tolist()))


# --- what a bundle records of its data ---------------------------------------------------------


def data_record(spec: str, split_seed: int) -> dict:
    """A bundle's `extra["data"]`: the data spec it was trained on and the seed of its
    train/val/test split, so later stages and `eval` split the same way (another seed would
    put training images into their validation or test split)."""
    return {"spec": spec, "split_seed": int(split_seed)}


def recorded_split_seed(extra: dict) -> int | None:
    """The split seed a bundle's `extra["data"]` records (bundles written from 2026-11-27 on), else None."""
    record = extra.get("data") if isinstance(extra, dict) else None
    seed = record.get("split_seed") if isinstance(record, dict) else None
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def guessed_split_seed(extra: dict) -> int | None:
    """For a bundle that records no split seed: the `seed` of its first training stage, which split
    that stage's data (each stage then split with its own --seed, so this is a guess); else None."""
    for stage in extra.get("stages", []) if isinstance(extra, dict) else []:
        seed = stage.get("config", {}).get("seed") if isinstance(stage, dict) else None
        if isinstance(seed, int) and not isinstance(seed, bool):
            return seed
    return None


def resolve_split_seed(extra: dict, asked: int | None, option: str, default: int) -> tuple[int, str]:
    """(seed, where it came from) to split the data of a bundle with `extra` on: the seed it
    records; InputError if `asked` (the value of `option`) differs from it, since another split
    would put the bundle's training images into validation and test. A bundle that records none:
    `asked`, else the guess from its first stage, else `default`."""
    recorded = recorded_split_seed(extra)
    if recorded is not None:
        if asked is not None and asked != recorded:
            raise InputError(
                f"{option} {asked}: the bundle was trained on the split made with seed {recorded}; another "
                f"split would put its training images into validation and test. Leave {option} out "
                f"(or pass {recorded})"
            )
        return recorded, "recorded in the bundle"
    if asked is not None:
        return asked, f"from {option}; the bundle records no split seed"
    guessed = guessed_split_seed(extra)
    if guessed is not None:
        return guessed, (f"guessed from the bundle's first training stage (it records no split seed); "
                         f"pass {option} to choose another")
    return default, f"default {default}: the bundle records no split seed; pass {option} to choose another"
