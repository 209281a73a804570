r"""Point-cloud scenes whose labels need global context: ``ContextScenes``.

Axes: n points, K objects.

A scene is a box of side ``box`` holding ``num_objects`` densely sampled objects (random
families of :data:`~geolinrpe.data.SHAPES`, radius ``object_radius``, randomly rotated), each
of one of two kinds (0 "grey" or 1 "red"), given to the model as a per-point colour ``x``
(one-hot kind, like the RGB ``feat`` of Pointcept scenes). The label of every point of
object ``a`` is

.. math::

    y_a = \mathbb{1}\bigl[\exists\, b \ne a:\ \mathrm{kind}_b = 1,\ |c_a - c_b| < R\bigr]

(``c`` the object centres, ``R = reach``): "is another red object within ``R`` of mine".
Placement keeps centres at least ``2 object_radius + gap`` apart and keeps the
centre-to-centre distance of every pair with a red member out of ``[R - margin, R + margin]``,
so no label sits on the decision boundary. (The rule "an object of the *other* kind within
``R``" is an XOR of the point's own kind and its surroundings; in a first test, FLT stayed at
60% on it after 300 steps where it reached 79% on this rule.)

Why a local model cannot solve it, by construction: objects are ``gap`` apart from surface to
surface, while a local stage of ``k``-NN or radius message passing over a densely sampled
object sees only points of its own object (its neighbours lie within ``k``-NN distances of
order ``object_radius / sqrt(points per object)``, far below ``gap``). What a point's own
object shows (its kind, shape, points) is independent of the kinds of the objects at
distance ``>= 2 object_radius + gap``, so a local model can do no better than the prior of
``y`` given its own kind and its position in the box (objects near the walls have fewer
neighbours). A global model without positional information (linear attention without RPE)
sees the scene's fraction of red points but not which objects are near which, so it can only
use that fraction. A model whose attention weights depend on ``r_i - r_j`` can average the
colour over a ball of radius about ``R`` around each point, which answers the question.

The defaults (48 objects in a box of side 16, ``R = 3.6``) give 51.1% positive points
(300 scenes; per-scene spread 9%) and are used by ``benchmarks/point_cloud_scale.py``.
Many objects per scene give many nearly independent labels per training step. Scenes are
generated on access from ``(seed, i)``; train, valid and test splits are disjoint index ranges
of one dataset or datasets with different seeds. The object placement and kinds are drawn
before the points, so scenes of one seed and index at different ``num_points`` hold the same
objects and labels, sampled at different densities.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset
from torch_geometric.data import Data

from .point_clouds import SHAPES, _rotation_np

__all__ = ["ContextScenes"]

#: shape families of the objects (compact ones: every point within ``object_radius``)
OBJECT_FAMILIES = ("sphere", "box", "cylinder", "cone", "ellipsoid", "capsule", "octahedron")
_SAMPLERS = {name: sampler for name, sampler, _ in SHAPES}


class ContextScenes(Dataset):
    r"""Scenes of ``num_points`` points whose per-point labels depend on objects far away.

    See the module docstring for the label and why local models cannot predict it.

    Args:
        num_points: points per scene (split as evenly as possible over the objects).
        num_samples: number of scenes.
        num_objects: objects per scene (default 48).
        box: side of the cubic scene (default 16.0).
        object_radius: radius of each object (default 0.6; shapes are scaled to fit in it).
        reach: ``R`` of the label (default 3.6).
        margin: no different-kind centre distance lies within ``margin`` of ``R``
            (default 0.25).
        gap: smallest surface-to-surface distance between objects (default 1.0).
        noise: Gaussian noise added to the points (default 0.005).
        seed: seed of the dataset (scene ``i`` is generated from ``(seed, i)``).
        transform: a callable on each ``Data``, applied on access.

    Each item is a ``Data`` with ``pos [n, 3]`` float32 (in ``[0, box]^3``), ``x [n, 2]``
    float32 (one-hot kind: the colour), ``y [n]`` long (the label), ``object [n]`` long
    (object id within the scene) and ``centers [K, 3]`` float32 (which PyG batches by
    concatenation, like any ``[K, ...]`` field).
    """

    def __init__(
        self,
        num_points: int = 8192,
        num_samples: int = 100,
        num_objects: int = 48,
        box: float = 16.0,
        object_radius: float = 0.6,
        reach: float = 3.6,
        margin: float = 0.25,
        gap: float = 1.0,
        noise: float = 0.005,
        seed: int = 0,
        transform: Callable[[Data], Data] | None = None,
    ) -> None:
        for name, value in (
            ("num_points", num_points),
            ("num_samples", num_samples),
            ("num_objects", num_objects),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_points < num_objects:
            raise ValueError(f"num_points ({num_points}) must be >= num_objects ({num_objects})")
        for name, value in (("box", box), ("object_radius", object_radius), ("reach", reach)):
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        for name, value in (("margin", margin), ("gap", gap), ("noise", noise)):
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
        if box <= 2 * object_radius:
            raise ValueError(f"box ({box}) must exceed 2 * object_radius ({object_radius})")
        self.num_points = num_points
        self.num_samples = num_samples
        self.num_objects = num_objects
        self.box = float(box)
        self.object_radius = float(object_radius)
        self.reach = float(reach)
        self.margin = float(margin)
        self.gap = float(gap)
        self.noise = float(noise)
        self.seed = seed
        self.transform = transform

    def __len__(self) -> int:
        return self.num_samples

    def _place(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Object centres ``[K, 3]`` and kinds ``[K]`` under the spacing and margin rules
        (sequential rejection; a scene that cannot be completed is redrawn)."""
        lo, hi = self.object_radius, self.box - self.object_radius
        spacing = 2 * self.object_radius + self.gap
        for _ in range(100):
            centres, kinds = [], []
            for _ in range(self.num_objects):
                kind = int(rng.integers(2))
                for _ in range(1000):
                    c = rng.uniform(lo, hi, 3)
                    if centres:
                        dist = np.linalg.norm(np.asarray(centres) - c, axis=1)
                        red = (np.asarray(kinds) == 1) | (kind == 1)
                        if (dist < spacing).any() or (
                            np.abs(dist[red] - self.reach) <= self.margin
                        ).any():
                            continue
                    centres.append(c)
                    kinds.append(kind)
                    break
                else:
                    break
            if len(centres) == self.num_objects:
                return np.asarray(centres), np.asarray(kinds)
        raise RuntimeError(
            f"could not place {self.num_objects} objects in a box of side {self.box} "
            f"(object_radius {self.object_radius}, gap {self.gap}): make the box larger"
        )

    def labels(self, centres: np.ndarray, kinds: np.ndarray) -> np.ndarray:
        """Per-object labels ``[K]``: another object of kind 1 within ``reach``."""
        dist = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
        np.fill_diagonal(dist, np.inf)
        return ((dist < self.reach) & (kinds[None] == 1)).any(1).astype(np.int64)

    def __getitem__(self, i: int) -> Data:
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for {self.num_samples} scenes")
        i = i % self.num_samples
        rng = np.random.default_rng([self.seed, 3, i])
        centres, kinds = self._place(rng)
        label = self.labels(centres, kinds)
        sizes = np.full(self.num_objects, self.num_points // self.num_objects)
        sizes[: self.num_points % self.num_objects] += 1
        points = []
        for size, centre in zip(sizes, centres, strict=True):
            family = OBJECT_FAMILIES[int(rng.integers(len(OBJECT_FAMILIES)))]
            pts = _SAMPLERS[family](rng, int(size))[0]
            pts = pts / max(np.linalg.norm(pts, axis=1).max(), 1e-12)  # within the unit ball
            pts = pts @ _rotation_np(rng).T * self.object_radius + centre
            points.append(pts + self.noise * rng.normal(size=pts.shape))
        obj = np.repeat(np.arange(self.num_objects), sizes)
        data = Data(
            pos=torch.as_tensor(np.concatenate(points), dtype=torch.float32),
            x=torch.nn.functional.one_hot(torch.as_tensor(kinds[obj]), 2).float(),
            y=torch.as_tensor(label[obj]),
            object=torch.as_tensor(obj),
            centers=torch.as_tensor(centres, dtype=torch.float32),
        )
        return data if self.transform is None else self.transform(data)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.num_samples}, points={self.num_points}, "
            f"objects={self.num_objects}, box={self.box}, reach={self.reach})"
        )
