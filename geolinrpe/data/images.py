r"""Images as sets of patch tokens on a 2D grid.

Axes: N images, C channels, H/W pixels, ph/pw patch height/width, r/q patch row/column.

An image ``[C, H, W]`` becomes ``H/ph x W/pw`` tokens in row-major order: token ``r * (W/pw) + q``
holds the pixels ``[:, r*ph:(r+1)*ph, q*pw:(q+1)*pw]`` flattened in ``(C, ph, pw)`` order
(:meth:`torch.Tensor.unfold`'s order), and its position is ``(r, q)`` in patch units, so a
relative positional encoding sees patch offsets. Images of different sizes give different
numbers of tokens, which packed or padded batches (:mod:`geolinrpe.data.batching`) handle.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torch_geometric.data import Data

__all__ = ["FITS", "ImagePatches", "image_to_patches", "load_digits_patches", "patches_to_image"]

FITS = ("error", "crop", "pad")


def _pair(patch_size: int | Sequence[int]) -> tuple[int, int]:
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    for v in (ph, pw):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"patch_size must be a positive int or a pair, got {patch_size!r}")
    return int(ph), int(pw)


def image_to_patches(
    image: Tensor, patch_size: int | Sequence[int], fit: str = "error"
) -> tuple[Tensor, Tensor]:
    r"""One image -> patch tokens and their grid positions.

    Args:
        image: ``[C, H, W]`` (or ``[H, W]``, one channel).
        patch_size: ``ph`` or ``(ph, pw)``.
        fit: what to do when ``H`` or ``W`` is not a multiple of the patch size:
            ``"error"`` (default) raises a :class:`ValueError`; ``"crop"`` drops the last
            rows/columns; ``"pad"`` adds zero rows/columns at the bottom/right. Both keep
            patch ``(r, q)`` anchored at pixel ``(r*ph, q*pw)``.

    Returns:
        ``x [R*Q, C*ph*pw]`` and ``pos [R*Q, 2]`` (row, column) float, with ``R = H/ph``
        and ``Q = W/pw`` (after cropping or padding).
    """
    ph, pw = _pair(patch_size)
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    if image.dim() == 2:
        image = image[None]
    if image.dim() != 3:
        raise ValueError(f"an image must be [C, H, W] or [H, W], got {list(image.shape)}")
    _, h, w = image.shape
    if h % ph or w % pw:
        if fit == "error":
            raise ValueError(
                f"image size {h}x{w} is not divisible by patch size {ph}x{pw}; "
                "pass fit='crop' or fit='pad'"
            )
        if fit == "crop":
            image = image[:, : h - h % ph, : w - w % pw]
        else:
            image = torch.nn.functional.pad(image, (0, -w % pw, 0, -h % ph))
        _, h, w = image.shape
    if h == 0 or w == 0:
        raise ValueError(f"image of size {h}x{w} (after fit={fit!r}) has no patches")
    c = image.shape[0]
    rows, cols = h // ph, w // pw
    # [C, R, Q, ph, pw] -> [R, Q, C, ph, pw] -> [R*Q, C*ph*pw]
    x = image.unfold(1, ph, ph).unfold(2, pw, pw).permute(1, 2, 0, 3, 4)
    x = x.reshape(rows * cols, c * ph * pw)
    r, q = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    pos = torch.stack([r.reshape(-1), q.reshape(-1)], dim=1).to(torch.float32)
    return x, pos


def patches_to_image(
    x: Tensor, pos: Tensor, patch_size: int | Sequence[int], channels: int
) -> Tensor:
    r"""Inverse of :func:`image_to_patches`: ``x [n, C*ph*pw]``, ``pos [n, 2]`` -> image
    ``[C, H, W]`` with ``H = (max row + 1) * ph``, ``W = (max column + 1) * pw`` (missing
    patches are zero). Tokens may come in any order.
    """
    ph, pw = _pair(patch_size)
    if x.dim() != 2 or x.shape[1] != channels * ph * pw:
        raise ValueError(f"x must be [n, {channels * ph * pw}], got {list(x.shape)}")
    grid = pos.round().long()
    rows, cols = int(grid[:, 0].max()) + 1, int(grid[:, 1].max()) + 1
    image = x.new_zeros(rows, cols, channels, ph, pw)
    image[grid[:, 0], grid[:, 1]] = x.view(-1, channels, ph, pw)
    # [R, Q, C, ph, pw] -> [C, R, ph, Q, pw]
    return image.permute(2, 0, 3, 1, 4).reshape(channels, rows * ph, cols * pw)


def _to_chw(image: Any, channels_last: bool) -> Tensor:
    """A tensor, array or PIL image -> float32 ``[C, H, W]``; integer pixels scale to [0, 1]."""
    if hasattr(image, "getbands") and not isinstance(image, (Tensor, np.ndarray)):  # PIL
        array = np.asarray(image)
        image = torch.from_numpy(array.copy())
        if image.dim() == 3:  # PIL is [H, W, C]
            image = image.permute(2, 0, 1)
    else:
        image = torch.as_tensor(image)
        if image.dim() == 3 and channels_last:
            image = image.permute(2, 0, 1)
    if image.dim() == 2:
        image = image[None]
    if image.dim() != 3:
        raise ValueError(f"an image must be [C, H, W] or [H, W], got {list(image.shape)}")
    if image.dtype == torch.bool:
        image = image.to(torch.float32)
    elif not image.is_floating_point():
        scale = 255.0 if image.dtype == torch.uint8 else float(torch.iinfo(image.dtype).max)
        image = image.to(torch.float32) / scale
    return image.to(torch.float32)


class ImagePatches(Dataset):
    r"""A dataset of images as patch tokens: each item is a PyG ``Data`` with

    * ``x [R*Q, C*ph*pw]`` float32: the patches (``(C, ph, pw)`` order, see the module doc),
    * ``pos [R*Q, 2]`` float32: each patch's (row, column) on the patch grid,
    * ``y [1]`` long: the label, when there is one.

    Args:
        images_or_dataset: images ``[N, C, H, W]`` (tensor or ndarray; ``[N, H, W]`` is one
            channel), a sequence of images, or any dataset yielding ``(image, label)`` or
            images, where an image is a ``[C, H, W]``/``[H, W]`` tensor or array or a PIL
            image. Integer pixels (e.g. ``uint8``) are scaled to [0, 1]; float pixels are
            kept as they are.
        patch_size: ``ph`` or ``(ph, pw)``.
        labels: ``[N]`` labels, one per image (they replace labels a dataset yields).
        fit: ``"error"``, ``"crop"`` or ``"pad"`` when an image's size is not a multiple of
            the patch size (see :func:`image_to_patches`).
        channels_last: images (tensors/arrays) are ``[..., H, W, C]`` instead of
            ``[..., C, H, W]``.
        transform: a callable on each ``Data`` (PyG-style), applied on access.

    Items are made on access, so wrapping a large dataset costs nothing up front.
    """

    def __init__(
        self,
        images_or_dataset: Any,
        patch_size: int | Sequence[int],
        labels: Any = None,
        fit: str = "error",
        channels_last: bool = False,
        transform: Callable[[Data], Data] | None = None,
    ) -> None:
        self.patch_size = _pair(patch_size)
        if fit not in FITS:
            raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
        self.fit = fit
        self.channels_last = channels_last
        self.transform = transform
        source = images_or_dataset
        self._stacked = isinstance(source, (Tensor, np.ndarray))
        if self._stacked:
            source = torch.as_tensor(source)
            if source.dim() == 3:  # [N, H, W]
                source = source[:, None] if not channels_last else source[..., None]
            if source.dim() != 4:
                raise ValueError(
                    f"images must be [N, C, H, W] or [N, H, W], got {list(source.shape)}"
                )
            if channels_last:
                source = source.permute(0, 3, 1, 2)
            h, w = source.shape[-2:]
            ph, pw = self.patch_size
            if fit == "error" and (h % ph or w % pw):  # fail now, not on first access
                raise ValueError(
                    f"image size {h}x{w} is not divisible by patch size {ph}x{pw}; "
                    "pass fit='crop' or fit='pad'"
                )
        if labels is not None:
            labels = torch.as_tensor(np.asarray(labels)).reshape(-1)
            if labels.numel() != len(source):
                raise ValueError(f"got {labels.numel()} labels for {len(source)} images")
        self.source = source
        self.labels = labels

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> Data:
        item = self.source[i]
        label = None
        if self._stacked:
            image = _to_chw(item, False)
        else:
            if isinstance(item, (tuple, list)):
                if len(item) < 1 or len(item) > 2:
                    raise ValueError(f"item {i}: expected (image, label), got {len(item)} values")
                image, label = (item[0], item[1]) if len(item) == 2 else (item[0], None)
            else:
                image = item
            image = _to_chw(image, self.channels_last)
        if self.labels is not None:
            label = self.labels[i]
        try:
            x, pos = image_to_patches(image, self.patch_size, self.fit)
        except ValueError as exc:
            raise ValueError(f"image {i}: {exc}") from None
        data = Data(x=x, pos=pos)
        if label is not None:
            data.y = torch.as_tensor(label, dtype=torch.long).reshape(1)
        return data if self.transform is None else self.transform(data)

    @classmethod
    def from_image_folder(
        cls,
        root: str | os.PathLike,
        patch_size: int | Sequence[int],
        fit: str = "error",
        image_transform: Callable | None = None,
        transform: Callable[[Data], Data] | None = None,
    ) -> ImagePatches:
        r"""Patches of an ImageFolder tree (``root/<class>/<image>``; classes sorted by name,
        labels ``0..K-1``), read with ``torchvision.datasets.ImageFolder``.

        Args:
            root: the folder.
            patch_size: ``ph`` or ``(ph, pw)``.
            fit: see :func:`image_to_patches`; images may differ in size.
            image_transform: a torchvision transform on each PIL image (e.g. ``Resize``).
            transform: a callable on each ``Data``.

        Raises:
            ImportError: torchvision is not installed (``pip install geolinrpe[vision]``
                or ``pip install torchvision``).
        """
        try:
            from torchvision.datasets import ImageFolder
        except ImportError as exc:
            raise ImportError(
                "ImagePatches.from_image_folder needs torchvision, which is optional: "
                "pip install 'geolinrpe[vision]' (or pip install torchvision)"
            ) from exc
        folder = ImageFolder(root, transform=image_transform)
        dataset = cls(folder, patch_size, fit=fit, transform=transform)
        dataset.classes = list(folder.classes)
        return dataset


def load_digits_patches(patch_size: int | Sequence[int] = 2, **kwargs: Any) -> ImagePatches:
    r"""scikit-learn's 1,797 handwritten 8x8 digits (shipped with the package, offline) as
    patch tokens: ``x [64/(ph*pw), ph*pw]`` with pixels scaled from 0..16 to [0, 1],
    ``pos [64/(ph*pw), 2]``, ``y [1]`` the digit 0-9.

    Args:
        patch_size: a divisor of 8 (1, 2, 4, 8) or a pair of them; others need
            ``fit="crop"``/``"pad"``.
        **kwargs: passed on to :class:`ImagePatches` (``fit``, ``transform``).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    return ImagePatches(images, patch_size, labels=digits.target, **kwargs)
