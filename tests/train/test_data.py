"""Datasets: the procedural shapes, image folders (and their errors), the resumable batch iterator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastvq.train.data import (
    BatchIterator,
    CorruptImageError,
    load_dataset,
    load_folder,
    make_shapes,
    to_float,
    to_uint8,
)


def test_shapes_are_deterministic_and_well_formed():
    x1, y1 = make_shapes(40, seed=3)
    x2, y2 = make_shapes(40, seed=3)
    x3, _ = make_shapes(40, seed=4)
    assert x1.shape == (40, 3, 32, 32) and x1.dtype == torch.uint8
    assert y1.shape == (40,) and y1.dtype == torch.int64 and set(y1.tolist()) <= {0, 1, 2}
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    # every image has a shape on it: more than one colour
    assert all(len(torch.unique(img.reshape(3, -1), dim=1).T) > 1 for img in x1)


def test_shapes_other_size_and_chunking():
    x, _ = make_shapes(600, seed=0, size=16)  # more than one 512-image chunk
    assert x.shape == (600, 3, 16, 16)
    assert x[512:].float().std() > 0  # the second chunk is drawn too


def test_train_and_validation_do_not_overlap():
    train, val = load_dataset("shapes", num_train=200, num_val=50, seed=1)
    assert len(train) == 200 and len(val) == 50 and train.channels == 3 and val.image_size == 32
    seen = {bytes(img.numpy()) for img in train.images}
    assert not any(bytes(img.numpy()) in seen for img in val.images)


def test_float_round_trip():
    x, _ = make_shapes(4, seed=0)
    f = to_float(x)
    assert f.min() >= -1 and f.max() <= 1
    assert torch.equal(to_uint8(f), x)


def test_batch_iterator_resumes_exactly_and_rolls_over_epochs():
    train, _ = load_dataset("shapes", num_train=50, num_val=4)
    straight = BatchIterator(train, 16, seed=7)
    batches = [next(straight) for _ in range(7)]  # 3 batches per epoch: crosses two epoch boundaries
    first = BatchIterator(train, 16, seed=7)
    for _ in range(4):
        next(first)
    resumed = BatchIterator(train, 16, seed=7, **first.state())
    for expected in batches[4:]:
        got = next(resumed)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert resumed.state()["epoch"] == 2
    with pytest.raises(ValueError, match="batch_size"):
        BatchIterator(train, 51)


def _write_png(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 24, 3), colour, dtype=np.uint8)).save(path)


def test_folder_dataset_reads_images_and_labels_subfolders(tmp_path):
    _write_png(tmp_path / "cats" / "a.png", 10)
    _write_png(tmp_path / "cats" / "b.jpg", 200)
    _write_png(tmp_path / "dogs" / "c.png", 90)
    x, y, num_classes = load_folder(tmp_path, size=16)
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.uint8
    assert y.tolist() == [0, 0, 1] and num_classes == 2
    train, val = load_dataset(str(tmp_path), image_size=16, val_fraction=0.34)
    assert len(train) + len(val) == 3 and len(val) == 1


def test_corrupt_image_raises_an_error_naming_the_file(tmp_path):
    _write_png(tmp_path / "good.png", 10)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(CorruptImageError, match="broken.png") as err:
        load_folder(tmp_path)
    assert err.value.path.name == "broken.png"


def test_truncated_image_raises_the_named_error(tmp_path):
    _write_png(tmp_path / "cut.png", 10)
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptImageError, match="cut.png"):
        load_folder(tmp_path)


def test_folder_warns_about_non_images_and_rejects_empty(tmp_path):
    _write_png(tmp_path / "a.png", 10)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.warns(UserWarning, match="notes.txt"):
        load_folder(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image files"):
        load_folder(empty)
    with pytest.raises(FileNotFoundError):
        load_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="dataset must be"):
        load_dataset("no-such-dataset")


def test_digits_when_sklearn_is_installed():
    pytest.importorskip("sklearn")
    train, val = load_dataset("digits", image_size=16)
    assert train.images.shape[1:] == (3, 16, 16) and train.num_classes == 10
    assert len(train) + len(val) == 1797
