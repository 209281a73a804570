"""Images -> patch tokens: exact patch contents and grid positions, reconstruction, size
validation, PIL inputs and the optional torchvision folder reader."""

import sys

import numpy as np
import pytest
import torch

from geolinrpe.data.images import (
    ImagePatches,
    image_to_patches,
    load_digits_patches,
    patches_to_image,
)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    return load_digits()


def test_patch_layout_by_hand():
    image = torch.arange(2 * 4 * 6, dtype=torch.float32).view(2, 4, 6)
    x, pos = image_to_patches(image, 2)
    assert x.shape == (6, 8) and pos.shape == (6, 2) and pos.dtype == torch.float32
    assert pos.tolist() == [[r, q] for r in range(2) for q in range(3)]  # row-major
    # token 4 is row 1, column 1: pixels [:, 2:4, 2:4] in (c, ph, pw) order
    assert torch.equal(x[4], image[:, 2:4, 2:4].reshape(-1))
    x, pos = image_to_patches(image, (4, 3))  # rectangular patches
    assert x.shape == (2, 24) and pos.tolist() == [[0, 0], [0, 1]]
    assert torch.equal(x[1], image[:, :, 3:6].reshape(-1))


@pytest.mark.parametrize("patch_size", [1, 2, 4, (2, 4), 8])
def test_digits_patches_reconstruct_images(digits, patch_size):
    dataset = load_digits_patches(patch_size)
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    assert len(dataset) == 1797
    for i in (0, 5, 1796):
        data = dataset[i]
        assert data.x.shape == (64 // (ph * pw), ph * pw) and data.x.dtype == torch.float32
        assert data.pos.shape == (64 // (ph * pw), 2)
        assert data.y.tolist() == [int(digits.target[i])]
        want = torch.as_tensor(digits.images[i], dtype=torch.float32)
        perm = torch.randperm(len(data.x))  # positions, not token order, place the patches
        image = patches_to_image(data.x[perm], data.pos[perm], patch_size, channels=1)
        assert torch.equal(image[0] * 16, want)
    assert 0.0 <= dataset[3].x.min() and dataset[3].x.max() <= 1.0


def test_tensor_array_and_channels_last_inputs_agree():
    images = torch.rand(5, 3, 6, 9)
    labels = torch.arange(5)
    a = ImagePatches(images, 3, labels=labels)
    b = ImagePatches(images.numpy(), (3, 3), labels=labels.numpy())
    c = ImagePatches(images.permute(0, 2, 3, 1).contiguous(), 3, labels=labels, channels_last=True)
    for i in range(5):
        for other in (b[i], c[i]):
            assert torch.equal(a[i].x, other.x) and torch.equal(a[i].pos, other.pos)
        assert a[i].y.item() == i and a[i].x.shape == (6, 27)
        assert torch.equal(patches_to_image(a[i].x, a[i].pos, 3, 3), images[i])
    gray = ImagePatches(torch.rand(2, 4, 4), 2)  # [N, H, W]: one channel, no labels
    assert gray[1].x.shape == (4, 4) and "y" not in gray[1]


def test_integer_pixels_scale_to_unit_range():
    pixels = torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8)
    data = ImagePatches(pixels, 2)[1]
    assert torch.equal(patches_to_image(data.x, data.pos, 2, 1), pixels[1].float() / 255)


def test_size_not_divisible_raises_or_crops_or_pads():
    images = torch.rand(2, 1, 5, 7)
    with pytest.raises(ValueError, match="5x7 is not divisible by patch size 2x2"):
        ImagePatches(images, 2)
    with pytest.raises(ValueError, match="patch_size"):
        ImagePatches(images, 0)
    with pytest.raises(ValueError, match="fit"):
        ImagePatches(images, 2, fit="resize")
    with pytest.raises(ValueError, match="labels"):
        ImagePatches(images, 1, labels=[0, 1, 2])
    cropped = ImagePatches(images, 2, fit="crop")[0]
    assert cropped.x.shape == (2 * 3, 4)
    assert torch.equal(patches_to_image(cropped.x, cropped.pos, 2, 1), images[0, :, :4, :6])
    padded = ImagePatches(images, 2, fit="pad")[0]
    assert padded.x.shape == (3 * 4, 4) and padded.pos.max(0).values.tolist() == [2, 3]
    image = patches_to_image(padded.x, padded.pos, 2, 1)
    assert torch.equal(image[:, :5, :7], images[0]) and image[:, 5:].abs().sum() == 0
    assert image[:, :, 7:].abs().sum() == 0


def write_png_folder(root):
    """``root/<class>/<k>.png`` RGB images of two sizes; returns {path: (pixels, class)}."""
    from PIL import Image

    rng = np.random.default_rng(0)
    written = {}
    for label, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for k, (h, w) in enumerate([(4, 6), (6, 4)]):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            path = root / name / f"{k}.png"
            Image.fromarray(pixels).save(path)
            written[path] = (pixels, label)
    return written


def test_pil_images_from_png_files(tmp_path):
    from PIL import Image

    written = write_png_folder(tmp_path)
    items = [(Image.open(path), label) for path, (_, label) in written.items()]
    dataset = ImagePatches(items, 2)  # any sequence of (image, label)
    for data, (pixels, label) in zip(dataset, written.values(), strict=True):
        want = torch.as_tensor(pixels).permute(2, 0, 1).float() / 255
        assert data.y.item() == label and data.x.shape[1] == 12
        assert torch.equal(patches_to_image(data.x, data.pos, 2, 3), want)
    grayscale = ImagePatches([Image.open(next(iter(written))).convert("L")], 2)
    assert grayscale[0].x.shape == (6, 4) and "y" not in grayscale[0]


def test_image_folder_without_torchvision_names_the_extra(tmp_path, monkeypatch):
    write_png_folder(tmp_path)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(ImportError, match=r"torchvision.*geolinrpe\[vision\]"):
        ImagePatches.from_image_folder(tmp_path, 2)


def test_image_folder_with_torchvision(tmp_path):
    pytest.importorskip(
        "torchvision", reason="needs the optional extra geolinrpe[vision] (torchvision)"
    )
    written = write_png_folder(tmp_path)
    dataset = ImagePatches.from_image_folder(tmp_path, 2)
    assert dataset.classes == ["cat", "dog"] and len(dataset) == 4
    for data, (pixels, label) in zip(dataset, written.values(), strict=True):
        want = torch.as_tensor(pixels).permute(2, 0, 1).float() / 255
        assert data.y.item() == label
        assert torch.equal(patches_to_image(data.x, data.pos, 2, 3), want)
