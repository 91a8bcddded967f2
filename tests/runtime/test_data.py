"""Data loading: digits splits, a fake cifar-100-python folder, image folders, and bad input."""

import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from headsteer.runtime.data import ImageDataset, Splits, load_data
from headsteer.runtime.errors import DataError, InputError


@pytest.fixture(scope="module")
def digits() -> Splits:
    return load_data("digits")


def _image_ids(dataset: ImageDataset) -> set[bytes]:
    """Byte identities of images, to compare splits without relying on indices."""
    return {image.numpy().tobytes() for image in dataset.images}


# --- digits -----------------------------------------------------------------------------------


def test_digits_shapes_range_and_class_names(digits):
    assert digits.class_names == [str(digit) for digit in range(10)]
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    for split in (digits.train, digits.val, digits.test):
        assert split.images.dtype == torch.float32 and split.labels.dtype == torch.int64
        assert split.images.shape[1:] == (3, 32, 32)
        assert 0.0 <= split.images.min() and split.images.max() <= 1.0
        assert torch.equal(split.images[:, 0], split.images[:, 2])  # gray replicated to 3 channels
    assert digits.image_size == (32, 32)
    assert len(digits.mean) == len(digits.std) == 3 and all(s > 0 for s in digits.std)
    assert digits.mean[0] == pytest.approx(digits.train.images.mean().item(), abs=1e-5)


def test_digits_default_split_is_60_20_20_and_stratified(digits):
    assert len(digits.test) == pytest.approx(0.2 * 1797, abs=1)
    assert len(digits.val) == pytest.approx(0.2 * 1797, abs=1)
    overall = torch.bincount(torch.cat([s.labels for s in (digits.train, digits.val, digits.test)])) / 1797
    for split in (digits.train, digits.val, digits.test):
        share = torch.bincount(split.labels, minlength=10) / len(split)
        assert (share > 0).all()
        assert torch.allclose(share, overall, atol=0.01)


def test_digits_splits_are_disjoint(digits):
    # The 1797 digits images are pairwise distinct, so image bytes identify them.
    train, val, test = (_image_ids(s) for s in (digits.train, digits.val, digits.test))
    assert len(train | val | test) == 1797
    assert not (train & val) and not (train & test) and not (val & test)


def test_digits_split_is_determined_by_seed(digits):
    same = load_data("digits", seed=0)
    assert torch.equal(same.test.images, digits.test.images)
    assert torch.equal(same.val.labels, digits.val.labels)
    other = load_data("digits", seed=1)
    assert not torch.equal(other.test.images, digits.test.images)


def test_digits_split_is_sklearns_seeded_two_stage_split_in_source_order():
    """test is carved from the whole set first, then val from the rest (val_fraction / (1 -
    test_fraction) of it), both by sklearn's stratified split with the seed itself; each split keeps
    the source order. Bundles record only the seed, so another recipe would redraw their splits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    source = load_digits()
    indices = np.arange(len(source.target))
    rest, test = train_test_split(indices, test_size=0.3, random_state=5, stratify=source.target)
    train, val = train_test_split(rest, test_size=0.1 / 0.7, random_state=5, stratify=source.target[rest])
    splits = load_data("digits", image_size=8, seed=5, val_fraction=0.1, test_fraction=0.3)
    for split, expected in ((splits.train, train), (splits.val, val), (splits.test, test)):
        expected = np.sort(expected)
        assert split.labels.tolist() == source.target[expected].tolist()
        assert torch.equal(split.images[:, 0], torch.from_numpy(source.images[expected]).float() / 16)


def test_digits_image_size_and_fractions():
    splits = load_data("digits", image_size=16, val_fraction=0.1, test_fraction=0.3)
    assert splits.train.images.shape[1:] == (3, 16, 16)
    assert len(splits.test) == pytest.approx(0.3 * 1797, abs=1)
    assert len(splits.val) == pytest.approx(0.1 * 1797, abs=1)


def test_non_square_image_size_is_height_then_width(tmp_path):
    """A (height, width) image size, as timm's img_size takes it: digits, and image folders read
    through PIL (whose resize takes width first), come out [3, height, width], rows kept as rows."""
    assert load_data("digits", image_size=(12, 20)).train.images.shape[1:] == (3, 12, 20)
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for index in range(5):  # top half black, bottom half white, 30 wide and 10 high
            pixels = np.zeros((10, 30, 3), dtype=np.uint8)
            pixels[5:] = 255
            Image.fromarray(pixels).save(tmp_path / name / f"{index}.png")
    splits = load_data(f"imagefolder:{tmp_path}", image_size=(8, 16))
    assert splits.image_size == (8, 16) and splits.train.images.shape[1:] == (3, 8, 16)
    image = splits.train.images[0]
    assert image[:, :3].max() == 0.0 and image[:, 5:].min() == 1.0


@pytest.mark.parametrize("image_size", [0, (8, 0), (8,), (8, 8, 8), "8", 8.0, True, (8, True)])
def test_bad_image_sizes_are_refused(image_size):
    with pytest.raises(InputError, match="image_size must be"):
        load_data("digits", image_size=image_size)


def test_batches_cover_the_dataset_once(digits):
    seen = torch.cat([labels for _, labels in digits.test.batches(64, shuffle=True, seed=3)])
    assert torch.equal(seen.sort().values, digits.test.labels.sort().values)
    first_images, _ = next(digits.test.batches(64))
    assert torch.equal(first_images, digits.test.images[:64])
    images, labels = digits.test.tensor_dataset()[5]
    assert torch.equal(images, digits.test.images[5]) and labels == digits.test.labels[5]


def test_shuffled_batches_follow_the_seed_and_a_batch_size_below_1_is_refused(digits):
    def order(seed):
        return torch.cat([labels for _, labels in digits.test.batches(100, shuffle=True, seed=seed)])

    assert torch.equal(order(3), order(3))
    assert not torch.equal(order(3), order(4))
    with pytest.raises(InputError, match="batch_size must be a positive integer; got 0"):
        next(digits.test.batches(0))


def test_image_dataset_refuses_other_channel_counts_and_label_counts():
    with pytest.raises(DataError, match=r"images must be float32 \[N, 3, H, W\]"):
        ImageDataset(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.int64), ["a", "b"])
    with pytest.raises(DataError, match=r"labels must be int64 \[4\] \(one per image\)"):
        ImageDataset(torch.zeros(4, 3, 8, 8), torch.zeros(3, dtype=torch.int64), ["a", "b"])


# --- CIFAR-100 --------------------------------------------------------------------------------


class _Python2StylePickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` opcodes (SHORT_BINSTRING/BINSTRING), as cPickle did."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_python2_str(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_python2_str


def _dump_like_python2(content, path):
    """Pickle `content` the way the original cifar-100-python files were written (Python 2)."""
    buffer = io.BytesIO()
    _Python2StylePickler(buffer, protocol=2).dump(content)
    path.write_bytes(buffer.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))


def _dump_like_python3(content, path):
    """Pickle `content` as a Python 3 re-save would (bytes via _codecs.encode at protocol 2)."""
    with open(path, "wb") as file:
        pickle.dump(content, file, protocol=2)


def _write_fake_cifar100(folder, dump=_dump_like_python2, per_class_train=5, per_class_test=2, classes=4):
    """A cifar-100-python folder in the original layout: `meta`, `train`, `test` dicts with bytes keys."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [f"class{c}".encode() for c in range(classes)]
    dump({b"fine_label_names": names, b"coarse_label_names": [b"all"]}, folder / "meta")
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        labels = [c for c in range(classes) for _ in range(per_class)]
        content = {
            b"batch_label": f"{split} batch".encode(),
            b"filenames": [f"{i}.png".encode() for i in range(len(labels))],
            b"fine_labels": labels,
            b"coarse_labels": [0] * len(labels),
            b"data": rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8),
        }
        dump(content, folder / split)


@pytest.mark.parametrize("dump", [_dump_like_python2, _dump_like_python3])
def test_cifar100_fake_folder_loads(tmp_path, dump):
    folder = tmp_path / "cifar-100-python"
    _write_fake_cifar100(folder, dump)
    splits = load_data(f"cifar100:{folder}", val_fraction=0.2)
    assert splits.class_names == ["class0", "class1", "class2", "class3"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (16, 4, 8)
    assert splits.train.images.shape[1:] == (3, 32, 32)
    assert torch.bincount(splits.val.labels).tolist() == [1, 1, 1, 1]

    with open(folder / "test", "rb") as file:
        raw = pickle.load(file, encoding="bytes")
    first = torch.from_numpy(raw[b"data"][0].reshape(3, 32, 32)).float() / 255
    assert torch.allclose(splits.test.images[0], first)  # channel-major rows, scaled to [0, 1]

    resized = load_data(f"cifar100:{folder}", image_size=16)
    assert resized.test.images.shape[1:] == (3, 16, 16)


class _RunsShellCommand:
    """A pickle payload that would call os.system on load."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_cifar100_rejects_pickles_that_run_code(tmp_path):
    folder = tmp_path / "cifar-100-python"
    _write_fake_cifar100(folder)
    marker = tmp_path / "pwned"
    with open(folder / "meta", "wb") as file:
        pickle.dump({b"fine_label_names": _RunsShellCommand(f"touch {marker}")}, file, protocol=2)
    with pytest.raises(DataError, match="refusing to unpickle global .*system"):
        load_data(f"cifar100:{folder}")
    assert not marker.exists()


def test_cifar100_missing_and_malformed_files(tmp_path):
    folder = tmp_path / "cifar-100-python"
    _write_fake_cifar100(folder)
    (folder / "test").unlink()
    with pytest.raises(DataError, match="missing CIFAR-100 file .*test"):
        load_data(f"cifar100:{folder}")
    (folder / "test").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="not a readable cifar-100-python pickle"):
        load_data(f"cifar100:{folder}")
    with open(folder / "test", "wb") as file:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"fine_labels": [0, 1]}, file, protocol=2)
    with pytest.raises(DataError, match=r"uint8 array \[N, 3072\]"):
        load_data(f"cifar100:{folder}")


def test_cifar100_val_split_follows_the_seed(tmp_path):
    """val is carved from the train file with the split seed: the same seed draws the same val,
    another seed another (a bundle's recorded seed must keep its training images out of val)."""
    folder = tmp_path / "cifar-100-python"
    _write_fake_cifar100(folder, per_class_train=10)
    first, again, other = (load_data(f"cifar100:{folder}", seed=seed) for seed in (0, 0, 1))
    assert torch.equal(first.val.images, again.val.images)
    assert not torch.equal(first.val.images, other.val.images)
    assert torch.equal(first.test.images, other.test.images)  # the test file is never split


def _rewrite_cifar_test(folder, labels, rows=None):
    rows = len(labels) if rows is None else rows
    _dump_like_python2({b"data": np.zeros((rows, 3072), np.uint8), b"fine_labels": labels}, folder / "test")


def test_cifar100_bad_fine_labels_and_names_are_named(tmp_path):
    """Labels must be integers, one per image, each a class of `meta`: a label past the last class
    (or a float one, silently truncated) would train on a class the data does not name."""
    folder = tmp_path / "cifar-100-python"
    _write_fake_cifar100(folder)
    _rewrite_cifar_test(folder, [0, 1, 2, 4])
    with pytest.raises(DataError, match=r"test has fine labels in \[0, 4\]; expected \[0, 3\]"):
        load_data(f"cifar100:{folder}")
    _rewrite_cifar_test(folder, [-1, 1, 2, 3])
    with pytest.raises(DataError, match=r"test has fine labels in \[-1, 3\]; expected \[0, 3\]"):
        load_data(f"cifar100:{folder}")
    _rewrite_cifar_test(folder, [0.0, 1.5, 2.0, 3.0])
    with pytest.raises(DataError, match=r"test 'fine_labels' must be 4 integers"):
        load_data(f"cifar100:{folder}")
    _rewrite_cifar_test(folder, [0, 1, 2], rows=4)
    with pytest.raises(DataError, match=r"test 'fine_labels' must be 4 integers \(one per image\); got shape \(3,\)"):
        load_data(f"cifar100:{folder}")
    _dump_like_python2({b"fine_label_names": []}, folder / "meta")
    with pytest.raises(DataError, match=r"meta 'fine_label_names' must be a non-empty list"):
        load_data(f"cifar100:{folder}")
    _dump_like_python2([b"class0", b"class1"], folder / "meta")
    with pytest.raises(DataError, match=r"meta holds a list; expected a dict"):
        load_data(f"cifar100:{folder}")


def test_cifar100_duplicate_class_names_are_refused(tmp_path):
    # Two classes of one name could not be told apart by name (steering rows, reports).
    folder = tmp_path / "cifar-100-python"
    _write_fake_cifar100(folder)
    _dump_like_python2({b"fine_label_names": [b"class0", b"class1", b"class1", b"class3"]}, folder / "meta")
    with pytest.raises(DataError, match=r"meta.* names \['class1'\] more than once"):
        load_data(f"cifar100:{folder}")


# --- image folders ----------------------------------------------------------------------------


def _write_png_tree(root, classes=("cat", "dog"), per_class=5, size=(12, 10)):
    rng = np.random.default_rng(1)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_imagefolder_flat_layout_is_split_three_ways(tmp_path):
    _write_png_tree(tmp_path, per_class=10)
    splits = load_data(f"imagefolder:{tmp_path}", image_size=8)
    assert splits.class_names == ["cat", "dog"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 4, 4)
    assert splits.train.images.shape[1:] == (3, 8, 8)
    assert 0.0 <= splits.train.images.min() and splits.train.images.max() <= 1.0
    ids = [_image_ids(s) for s in (splits.train, splits.val, splits.test)]
    assert len(ids[0] | ids[1] | ids[2]) == 20


def test_imagefolder_split_layout_uses_given_splits(tmp_path):
    _write_png_tree(tmp_path / "train", per_class=6)
    _write_png_tree(tmp_path / "test", per_class=2)
    splits = load_data(f"imagefolder:{tmp_path}", image_size=8, val_fraction=0.5)
    # No val folder: val is carved from train.
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 6, 4)
    _write_png_tree(tmp_path / "val", per_class=1)
    splits = load_data(f"imagefolder:{tmp_path}", image_size=8)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 2, 4)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="no class folders"):
        load_data(f"imagefolder:{tmp_path}")
    _write_png_tree(tmp_path / "train", per_class=4)
    _write_png_tree(tmp_path / "test", classes=("cat", "bird"), per_class=1)
    with pytest.raises(DataError, match=r"class folders \['bird'\] that the train split lacks"):
        load_data(f"imagefolder:{tmp_path}", image_size=8)
    (tmp_path / "test" / "bird" / "0.png").unlink()
    (tmp_path / "test" / "bird").rmdir()
    (tmp_path / "train" / "cat" / "0.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"cannot read image .*0\.png"):
        load_data(f"imagefolder:{tmp_path}", image_size=8)


def test_imagefolder_empty_class_folder(tmp_path):
    _write_png_tree(tmp_path, per_class=5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="at least one image"):
        load_data(f"imagefolder:{tmp_path}", image_size=8)


def test_imagefolder_too_few_images_to_stratify(tmp_path):
    _write_png_tree(tmp_path, per_class=2)
    with pytest.raises(DataError, match=r"cannot make a stratified split .*per-class counts \[2, 2\]"):
        load_data(f"imagefolder:{tmp_path}", image_size=8)


def test_imagefolder_val_folder_missing_a_class_is_named(tmp_path):
    _write_png_tree(tmp_path / "train", classes=("cat", "dog", "owl"), per_class=4)
    _write_png_tree(tmp_path / "val", classes=("cat", "dog"), per_class=1)
    _write_png_tree(tmp_path / "test", classes=("cat", "dog", "owl"), per_class=1)
    with pytest.raises(DataError, match=r"the validation split has no image of \['owl'\]"):
        load_data(f"imagefolder:{tmp_path}", image_size=8)


def test_imagefolder_class_too_rare_for_a_split_is_named(tmp_path):
    # 8 + 8 + 3 images: the seeded stratified 60/20/20 split leaves "rare" no test image
    _write_png_tree(tmp_path, classes=("cat", "dog", "rare"), per_class=8)
    for i in range(3, 8):
        (tmp_path / "rare" / f"{i}.png").unlink()
    with pytest.raises(DataError, match=r"the test split has no image of \['rare'\] .*'rare': 3"):
        load_data(f"imagefolder:{tmp_path}", image_size=8)


def test_imagefolder_class_left_out_of_train_is_named(tmp_path):
    # 8 + 8 + 4 images split 20/40/40: "rare" ends up in val and test only, so the model could
    # never learn it
    _write_png_tree(tmp_path, classes=("cat", "dog", "rare"), per_class=8)
    for i in range(4, 8):
        (tmp_path / "rare" / f"{i}.png").unlink()
    with pytest.raises(DataError, match=r"the train split has no image of \['rare'\]"):
        load_data(f"imagefolder:{tmp_path}", image_size=8, val_fraction=0.4, test_fraction=0.4)


def test_imagefolder_with_one_class_is_refused(tmp_path):
    # A one-class "classifier" trains to a constant and has nothing to steer between.
    _write_png_tree(tmp_path, classes=("cat",), per_class=10)
    with pytest.raises(DataError, match=r"only one class \['cat'\]"):
        load_data(f"imagefolder:{tmp_path}", image_size=8)
    _write_png_tree(tmp_path / "split" / "train", classes=("cat",), per_class=10)  # the split layout too
    with pytest.raises(DataError, match=r"train has only one class \['cat'\]"):
        load_data(f"imagefolder:{tmp_path / 'split'}", image_size=8)


def test_imagefolder_mixed_8_bit_modes_load_and_wide_modes_are_refused(tmp_path):
    _write_png_tree(tmp_path, per_class=5)
    rng = np.random.default_rng(2)
    rgb = Image.fromarray(rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8))
    for name, image in (("gray", rgb.convert("L")), ("rgba", rgb.convert("RGBA")), ("palette", rgb.convert("P")),
                        ("bilevel", rgb.convert("1"))):
        image.save(tmp_path / "cat" / f"{name}.png")
    splits = load_data(f"imagefolder:{tmp_path}", image_size=8)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 14
    # A 16-bit grayscale PNG would be clipped to 8 bits (nearly all white), not read.
    wide = (np.arange(120, dtype=np.uint16).reshape(10, 12) * 500).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "dog" / "wide.png")
    with Image.open(tmp_path / "dog" / "wide.png") as reopened:
        assert reopened.mode == "I;16"
    with pytest.raises(DataError, match=r"dog/wide\.png is a PIL mode 'I;16' image"):
        load_data(f"imagefolder:{tmp_path}", image_size=8)


def test_imagefolder_non_image_files_are_named(tmp_path):
    _write_png_tree(tmp_path, per_class=5)
    (tmp_path / ".DS_Store").write_bytes(b"finder")  # hidden files are not data
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"finder")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    Image.new("RGB", (10, 12)).save(tmp_path / "cat" / "extra.gif")
    with pytest.raises(DataError, match=r"2 files that are not images .*cat/extra\.gif.*dog/notes\.txt"):
        load_data(f"imagefolder:{tmp_path}", image_size=8)
    (tmp_path / "dog" / "notes.txt").unlink()
    (tmp_path / "cat" / "extra.gif").unlink()
    splits = load_data(f"imagefolder:{tmp_path}", image_size=8)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 10


def test_imagefolder_reads_upper_case_extensions_and_linked_folders(tmp_path):
    """Cameras write IMG_0001.JPG; a class folder may link in a folder kept elsewhere. Both are
    images of the class, as torchvision's ImageFolder reads them (not stray files, not skipped)."""
    _write_png_tree(tmp_path / "data", per_class=5)
    Image.new("RGB", (12, 10), (200, 10, 10)).save(tmp_path / "data" / "cat" / "IMG_0001.PNG")
    _write_png_tree(tmp_path / "elsewhere", classes=("more",), per_class=5)
    (tmp_path / "data" / "dog" / "linked").symlink_to(tmp_path / "elsewhere" / "more", target_is_directory=True)
    splits = load_data(f"imagefolder:{tmp_path / 'data'}", image_size=8)
    counts = sum(torch.bincount(s.labels, minlength=2) for s in (splits.train, splits.val, splits.test))
    assert counts.tolist() == [6, 10]


def test_imagefolder_with_a_constant_channel_is_refused(tmp_path):
    """Normalization divides by the train split's per-channel std: a channel that never varies
    (here red, always 0) is a DataError, not inf/nan inputs."""
    rng = np.random.default_rng(3)
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for index in range(5):
            pixels = rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
            pixels[..., 0] = 0
            Image.fromarray(pixels).save(tmp_path / name / f"{index}.png")
    with pytest.raises(DataError, match="constant channel"):
        load_data(f"imagefolder:{tmp_path}", image_size=8)


def test_imagefolder_split_layout_refuses_other_folders(tmp_path):
    # "validation/" beside train/ would be ignored and val carved from train instead.
    _write_png_tree(tmp_path / "train", per_class=6)
    _write_png_tree(tmp_path / "validation", per_class=2)
    _write_png_tree(tmp_path / "test", per_class=2)
    with pytest.raises(DataError, match=r"folders \['validation'\] beside train/"):
        load_data(f"imagefolder:{tmp_path}", image_size=8)


def test_imagefolder_split_folder_without_images_is_named(tmp_path):
    _write_png_tree(tmp_path / "train", per_class=6)
    (tmp_path / "val" / "cat").mkdir(parents=True)
    (tmp_path / "val" / "dog").mkdir()
    with pytest.raises(DataError, match=r"val: .*no valid file for the classes cat, dog"):
        load_data(f"imagefolder:{tmp_path}", image_size=8)


def test_imagefolder_progress_bar_can_be_hidden(tmp_path, capsys):
    _write_png_tree(tmp_path, per_class=5)
    load_data(f"imagefolder:{tmp_path}", image_size=8, progress=False)
    assert "loading" not in capsys.readouterr().err
    load_data(f"imagefolder:{tmp_path}", image_size=8)
    assert "loading" in capsys.readouterr().err


# --- specs and arguments ----------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["mnist", "digits:extra", "", "imagenet:/data"])
def test_unknown_spec_names_the_accepted_ones(spec):
    with pytest.raises(DataError, match="expected 'digits', 'cifar100:PATH'"):
        load_data(spec)


@pytest.mark.parametrize("spec", ["cifar100", "cifar100:", "imagefolder:  "])
def test_spec_without_folder(spec):
    with pytest.raises(DataError, match="names no folder"):
        load_data(spec)


def test_spec_kind_ignores_case_and_spaces_and_path_expands_home(tmp_path, monkeypatch):
    assert len(load_data(" Digits ", image_size=8).test) == 360
    _write_png_tree(tmp_path / "pets", per_class=5)
    monkeypatch.setenv("HOME", str(tmp_path))
    splits = load_data("ImageFolder: ~/pets", image_size=8)
    assert splits.class_names == ["cat", "dog"]


def test_spec_with_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_data(f"cifar100:{tmp_path / 'nowhere'}")


@pytest.mark.parametrize(
    "arguments",
    [
        {"image_size": 0},
        {"val_fraction": 0.0},
        {"test_fraction": 1.5},
        {"val_fraction": 0.5, "test_fraction": 0.5},
    ],
)
def test_bad_arguments_are_input_errors(arguments):
    with pytest.raises(InputError):
        load_data("digits", **arguments)


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5])
def test_bad_seed_is_an_input_error(seed):
    # Not a split problem: sklearn takes seeds in [0, 2**32 - 1] only.
    with pytest.raises(InputError, match=r"seed must be an integer in \[0, 2\*\*32 - 1\]"):
        load_data("digits", seed=seed)


def test_numpy_integer_seeds_are_taken():
    splits = load_data("digits", image_size=8, seed=np.int64(1))
    assert torch.equal(splits.test.labels, load_data("digits", image_size=8, seed=1).test.labels)


def test_resolve_split_seed_trusts_only_a_recorded_seed():
    """A recorded split seed wins and another is refused; a bundle that records none takes the
    asked seed, else the guess from its first stage, else the default, and says which."""
    from headsteer.runtime.data import data_record, resolve_split_seed

    recorded = {"data": data_record("digits", 3), "stages": [{"config": {"seed": 9}}]}
    assert resolve_split_seed(recorded, None, "--seed", default=0) == (3, "recorded in the bundle")
    assert resolve_split_seed(recorded, 3, "--seed", default=0)[0] == 3
    with pytest.raises(InputError, match=r"--split-seed 4: the bundle was trained on the split made with seed 3"):
        resolve_split_seed(recorded, 4, "--split-seed", default=0)
    older = {"stages": [{"recipe": "backbone", "config": {"seed": 9}}]}
    seed, origin = resolve_split_seed(older, None, "--seed", default=0)
    assert seed == 9 and origin.startswith("guessed from the bundle's first training stage")
    assert resolve_split_seed(older, 5, "--seed", default=0) == (5, "from --seed; the bundle records no split seed")
    assert resolve_split_seed({}, None, "--split-seed", default=7)[0] == 7
    assert resolve_split_seed({"data": {"split_seed": True}}, None, "--seed", default=0)[0] == 0
    assert resolve_split_seed({"stages": [{"config": {"seed": True}}]}, None, "--seed", default=7)[0] == 7


def test_imagefolder_leaves_out_hidden_folders_and_os_litter(tmp_path):
    """What macOS zips, Windows Explorer and Jupyter leave in an image tree is not data: no class,
    no stray file, no split folder."""
    _write_png_tree(tmp_path / "train", per_class=6)
    _write_png_tree(tmp_path / "test", per_class=2)
    (tmp_path / "__MACOSX" / "train").mkdir(parents=True)  # beside train/
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()  # would be a class
    (tmp_path / "train" / "cat" / ".ipynb_checkpoints").mkdir()  # inside a class
    (tmp_path / "train" / "cat" / ".ipynb_checkpoints" / "notes-checkpoint.txt").write_text("x")
    (tmp_path / "train" / "dog" / "Thumbs.db").write_bytes(b"thumbnails")
    (tmp_path / "test" / "cat" / "desktop.ini").write_text("[.ShellClassInfo]")
    splits = load_data(f"imagefolder:{tmp_path}", image_size=8)
    assert splits.class_names == ["cat", "dog"]
    assert len(splits.train) + len(splits.val) == 12 and len(splits.test) == 4


def test_imagefolder_reads_files_in_torchvisions_order(tmp_path):
    """Samples come in torchvision's make_dataset order (folder path, then file name), over which
    earlier bundles' splits were drawn: the same seed must still draw the same split."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    from headsteer.runtime.data import _class_files

    for relative in ("cat/a/x.png", "cat/a b/y.png", "cat/z.png", "cat/a/x2.png", "cat/A/q.png", "dog/1.png",
                     "dog/sub/2.png", "dog/sub-2/3.png"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / relative)
    classes = {"cat": 0, "dog": 1}
    assert _class_files(tmp_path, classes) == (make_dataset(tmp_path, classes, extensions=IMG_EXTENSIONS), [])
