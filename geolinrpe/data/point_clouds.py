r"""Point clouds: synthetic shape classification, file readers and transforms.

Axes: n points, p position dim (3), F faces.

* :class:`SyntheticShapes`: points sampled uniformly on the surfaces of up to 12 shape families
  with random shape parameters, scale, noise and a uniformly random rotation per sample, so a
  classifier must be rotation invariant to generalise. No point-cloud benchmark ships in a
  package; this is the offline stand-in (ModelNet-like files load with
  :func:`read_point_cloud`).
* :func:`read_point_cloud`: ``.ply`` (ascii, binary little/big endian), ``.off``, ``.xyz`` /
  ``.txt`` (whitespace or comma separated columns) and ``.npy``.
* Transforms (callables on a PyG ``Data``, composable with
  :class:`torch_geometric.transforms.Compose`): :class:`Center`, :class:`NormalizeScale`,
  :class:`RandomRotate`, :class:`RandomJitter`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torch_geometric.data import Data
from torch_geometric.transforms import BaseTransform

__all__ = [
    "SHAPES",
    "Center",
    "NormalizeScale",
    "RandomJitter",
    "RandomRotate",
    "SyntheticShapes",
    "random_rotation",
    "read_point_cloud",
]


# --------------------------------------------------------------------------- surface samplers
# Each sampler draws its random shape parameters and returns points [n, 3], unit normals
# [n, 3] and local part ids [n], with points uniform over the surface area.


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _sphere_dirs(rng: np.random.Generator, n: int) -> np.ndarray:
    return _unit(rng.normal(size=(n, 3)))


def _rejection(rng, n: int, propose: Callable, accept_prob: Callable):
    """Draw ``n`` proposals accepted with probability ``accept_prob(proposal)``."""
    chunks, have = [], 0
    while have < n:
        cand = propose(2 * (n - have) + 16)
        keep = rng.random(len(cand)) < accept_prob(cand)
        chunks.append(cand[keep])
        have += int(keep.sum())
    return np.concatenate(chunks)[:n]


def _pick(rng, n: int, areas) -> np.ndarray:
    """Which surface piece each point lies on, proportional to area."""
    areas = np.asarray(areas, dtype=np.float64)
    return rng.choice(len(areas), size=n, p=areas / areas.sum())


def _disc(rng, n: int, radius: float) -> np.ndarray:
    """Uniform points ``[n, 2]`` in a disc."""
    r = radius * np.sqrt(rng.random(n))
    phi = rng.uniform(0, 2 * np.pi, n)
    return np.stack([r * np.cos(phi), r * np.sin(phi)], 1)


def _sample_sphere(rng, n):
    d = _sphere_dirs(rng, n)
    return d, d, np.zeros(n, np.int64)


def _sample_ellipsoid(rng, n):
    axes = np.array([1.0, rng.uniform(0.5, 0.75), rng.uniform(0.2, 0.4)])
    a, b, c = axes
    # area element of (a u_x, b u_y, c u_z) over the unit sphere is |grad| of the map
    weights = np.array([b * c, a * c, a * b])
    g_max = weights.max()

    def accept(u):
        return np.linalg.norm(u * weights, axis=1) / g_max

    u = _rejection(rng, n, lambda m: _sphere_dirs(rng, m), accept)
    return u * axes, _unit(u / axes), np.zeros(n, np.int64)


def _sample_torus(rng, n):
    big, small = 1.0, rng.uniform(0.2, 0.4)

    def propose(m):
        return rng.uniform(0, 2 * np.pi, m)

    theta = _rejection(
        rng, n, propose, lambda t: (big + small * np.cos(t)) / (big + small)
    )  # area element (R + r cos theta)
    phi = rng.uniform(0, 2 * np.pi, n)
    normal = np.stack([np.cos(theta) * np.cos(phi), np.cos(theta) * np.sin(phi), np.sin(theta)], 1)
    center = np.stack([big * np.cos(phi), big * np.sin(phi), np.zeros(n)], 1)
    return center + small * normal, normal, np.zeros(n, np.int64)


def _sample_box(rng, n):
    half = rng.uniform(0.3, 0.8, 3)
    areas = np.repeat([half[1] * half[2], half[0] * half[2], half[0] * half[1]], 2)
    face = _pick(rng, n, areas)
    axis, sign = face // 2, np.where(face % 2 == 0, 1.0, -1.0)
    pts = rng.uniform(-1, 1, (n, 3)) * half
    pts[np.arange(n), axis] = sign * half[axis]
    normal = np.zeros((n, 3))
    normal[np.arange(n), axis] = sign
    return pts, normal, np.zeros(n, np.int64)


def _sample_cylinder(rng, n):
    r, h = rng.uniform(0.3, 0.6), rng.uniform(0.8, 1.6)
    piece = _pick(rng, n, [2 * np.pi * r * h, np.pi * r**2, np.pi * r**2])
    phi = rng.uniform(0, 2 * np.pi, n)
    side = np.stack([r * np.cos(phi), r * np.sin(phi), rng.uniform(-h / 2, h / 2, n)], 1)
    cap = np.concatenate([_disc(rng, n, r), np.zeros((n, 1))], 1)
    cap[:, 2] = np.where(piece == 1, h / 2, -h / 2)
    pts = np.where((piece == 0)[:, None], side, cap)
    normal = np.stack([np.cos(phi), np.sin(phi), np.zeros(n)], 1)
    cap_normal = np.zeros((n, 3))
    cap_normal[:, 2] = np.where(piece == 1, 1.0, -1.0)
    normal = np.where((piece == 0)[:, None], normal, cap_normal)
    return pts, normal, (piece > 0).astype(np.int64)  # 0 side, 1 caps


def _sample_cone(rng, n):
    r, h = rng.uniform(0.4, 0.8), rng.uniform(0.8, 1.5)
    slant = math.hypot(r, h)
    piece = _pick(rng, n, [np.pi * r * slant, np.pi * r**2])
    t = np.sqrt(rng.random(n))  # distance from the apex / height: density grows linearly
    phi = rng.uniform(0, 2 * np.pi, n)
    lateral = np.stack([t * r * np.cos(phi), t * r * np.sin(phi), h / 2 - t * h], 1)
    base = np.concatenate([_disc(rng, n, r), np.full((n, 1), -h / 2)], 1)
    pts = np.where((piece == 0)[:, None], lateral, base)
    normal = np.stack([h * np.cos(phi), h * np.sin(phi), np.full(n, r)], 1) / slant
    normal = np.where((piece == 0)[:, None], normal, np.array([0.0, 0.0, -1.0]))
    return pts, normal, piece.astype(np.int64)  # 0 lateral, 1 base


def _sample_capsule(rng, n):
    r, length = rng.uniform(0.25, 0.45), rng.uniform(0.6, 1.2)
    piece = _pick(rng, n, [2 * np.pi * r * length, 4 * np.pi * r**2])
    phi = rng.uniform(0, 2 * np.pi, n)
    radial = np.stack([np.cos(phi), np.sin(phi), np.zeros(n)], 1)
    side = r * radial
    side[:, 2] = rng.uniform(-length / 2, length / 2, n)
    d = _sphere_dirs(rng, n)  # hemispheres: a sphere split at its equator
    cap = r * d
    cap[:, 2] += np.where(d[:, 2] >= 0, length / 2, -length / 2)
    pts = np.where((piece == 0)[:, None], side, cap)
    normal = np.where((piece == 0)[:, None], radial, d)
    return pts, normal, piece.astype(np.int64)  # 0 side, 1 caps


def _sample_disc(rng, n):
    r = rng.uniform(0.8, 1.2)
    pts = np.concatenate([_disc(rng, n, r), np.zeros((n, 1))], 1)
    normal = np.tile([0.0, 0.0, 1.0], (n, 1))
    return pts, normal, np.zeros(n, np.int64)


def _sample_triangles(rng, n, vertices, faces):
    """Uniform points on a mesh of equal-area triangles (regular polyhedra)."""
    face = rng.integers(len(faces), size=n)
    a, b, c = (vertices[faces[face, k]] for k in range(3))
    u, v = rng.random(n), rng.random(n)
    flip = u + v > 1
    u, v = np.where(flip, 1 - u, u), np.where(flip, 1 - v, v)
    pts = a + u[:, None] * (b - a) + v[:, None] * (c - a)
    normal = _unit(np.cross(b - a, c - a))
    normal *= np.sign(np.sum(normal * a, axis=1, keepdims=True))  # outward
    return pts, normal, np.zeros(n, np.int64)


_TETRA_V = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], float) / math.sqrt(3)
_TETRA_F = np.array([[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]])
_OCTA_V = np.concatenate([np.eye(3), -np.eye(3)])
_OCTA_F = np.array([[i, j, k] for i in (0, 3) for j in (1, 4) for k in (2, 5)])


def _sample_tetrahedron(rng, n):
    return _sample_triangles(rng, n, _TETRA_V, _TETRA_F)


def _sample_octahedron(rng, n):
    return _sample_triangles(rng, n, _OCTA_V, _OCTA_F)


def _sample_helix(rng, n):
    radius, tube = rng.uniform(0.4, 0.6), rng.uniform(0.08, 0.14)
    turns, rise = rng.uniform(2.0, 3.0), rng.uniform(0.08, 0.12)  # rise per radian
    t_max = 2 * np.pi * turns
    speed = math.hypot(radius, rise)
    kappa = radius / speed**2  # curvature; the tube's area element is (1 - kappa r cos theta)
    t = rng.uniform(0, t_max, n)
    theta = _rejection(
        rng,
        n,
        lambda m: rng.uniform(0, 2 * np.pi, m),
        lambda th: (1 - kappa * tube * np.cos(th)) / (1 + kappa * tube),
    )
    curve = np.stack([radius * np.cos(t), radius * np.sin(t), rise * (t - t_max / 2)], 1)
    tangent = np.stack([-radius * np.sin(t), radius * np.cos(t), np.full(n, rise)], 1) / speed
    principal = np.stack([-np.cos(t), -np.sin(t), np.zeros(n)], 1)
    binormal = np.cross(tangent, principal)
    normal = np.cos(theta)[:, None] * principal + np.sin(theta)[:, None] * binormal
    return curve + tube * normal, normal, np.zeros(n, np.int64)


def _sample_dome(rng, n):
    piece = _pick(rng, n, [2 * np.pi, np.pi])
    d = _sphere_dirs(rng, n)
    d[:, 2] = np.abs(d[:, 2])
    base = np.concatenate([_disc(rng, n, 1.0), np.zeros((n, 1))], 1)
    pts = np.where((piece == 0)[:, None], d, base)
    normal = np.where((piece == 0)[:, None], d, np.array([0.0, 0.0, -1.0]))
    pts[:, 2] -= 0.5  # centre the height range
    return pts, normal, piece.astype(np.int64)  # 0 curved, 1 base


#: Shape families in class order: ``(name, sampler, number of parts)``. Parts are surface
#: pieces a rotation-invariant model can tell apart (curved side vs flat caps/base).
SHAPES: tuple[tuple[str, Callable, int], ...] = (
    ("sphere", _sample_sphere, 1),
    ("torus", _sample_torus, 1),
    ("box", _sample_box, 1),
    ("cylinder", _sample_cylinder, 2),
    ("cone", _sample_cone, 2),
    ("ellipsoid", _sample_ellipsoid, 1),
    ("helix", _sample_helix, 1),
    ("disc", _sample_disc, 1),
    ("capsule", _sample_capsule, 2),
    ("tetrahedron", _sample_tetrahedron, 1),
    ("octahedron", _sample_octahedron, 1),
    ("dome", _sample_dome, 2),
)


def _rotation_np(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random rotation (Haar measure on SO(3)) from a random unit quaternion."""
    w, x, y, z = _unit(rng.normal(size=4))
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


class SyntheticShapes(Dataset):
    r"""Shape classification (and part segmentation) on noisy, randomly rotated point clouds.

    Sample ``i`` is a shape family ``y`` (classes balanced: exactly
    ``num_samples / num_classes`` each, in shuffled order) with random shape parameters
    (aspect ratios, radii, turns), scaled by a random factor in [0.75, 1.25], ``num_points``
    points drawn uniformly over the surface area, Gaussian noise of std ``noise`` added, and
    (with ``rotate``) a uniformly random rotation about the origin applied. Points and
    normals are then rotated alike. Samples are generated on access from
    ``(seed, i)``: the same index always gives the same cloud, and the rotation uses its
    own random stream, so ``rotate=False`` gives exactly the unrotated cloud.

    Families (:data:`SHAPES`, the first ``num_classes``): sphere, torus, box, cylinder, cone,
    ellipsoid, helix (a tube), disc, capsule, tetrahedron, octahedron, dome (hemisphere +
    base).

    Args:
        num_classes: 8 to 12.
        num_points: points per cloud.
        num_samples: dataset length.
        noise: standard deviation of the Gaussian noise (shapes are about 2 units across).
        rotate: apply a random rotation to each sample.
        seed: seed of the whole dataset.
        transform: a callable on each ``Data``, applied on access.

    Each item is a ``Data`` with ``pos [n, 3]`` float32, ``normal [n, 3]`` float32 (unit
    surface normals of the noiseless surface, rotated with the points), ``y [1]`` long (the
    class) and ``part [n]`` long: a global part id, ``part_offsets[y] + local part``
    (curved side vs flat caps/base for cylinder, cone, capsule and dome; one part
    otherwise), ``num_parts`` in total.
    """

    def __init__(
        self,
        num_classes: int = 10,
        num_points: int = 512,
        num_samples: int = 1000,
        noise: float = 0.01,
        rotate: bool = True,
        seed: int = 0,
        transform: Callable[[Data], Data] | None = None,
    ) -> None:
        if not 8 <= num_classes <= len(SHAPES):
            raise ValueError(f"num_classes must be in [8, {len(SHAPES)}], got {num_classes}")
        for name, value in (("num_points", num_points), ("num_samples", num_samples)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.num_classes = num_classes
        self.num_points = num_points
        self.num_samples = num_samples
        self.noise = float(noise)
        self.rotate = rotate
        self.seed = seed
        self.transform = transform
        self.classes = [name for name, _, _ in SHAPES[:num_classes]]
        parts = [k for _, _, k in SHAPES[:num_classes]]
        self.part_offsets = [int(v) for v in np.cumsum([0] + parts[:-1])]
        self.num_parts = int(sum(parts))
        labels = np.arange(num_samples) % num_classes
        self.labels = np.random.default_rng([seed, 0]).permutation(labels)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> Data:
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for {self.num_samples} samples")
        i = i % self.num_samples
        y = int(self.labels[i])
        rng = np.random.default_rng([self.seed, 1, i])
        pts, normal, part = SHAPES[y][1](rng, self.num_points)
        pts = pts * rng.uniform(0.75, 1.25)
        pts = pts + self.noise * rng.normal(size=pts.shape)
        if self.rotate:
            rot = _rotation_np(np.random.default_rng([self.seed, 2, i]))
            pts, normal = pts @ rot.T, normal @ rot.T
        data = Data(
            pos=torch.as_tensor(pts, dtype=torch.float32),
            normal=torch.as_tensor(normal, dtype=torch.float32),
            y=torch.tensor([y], dtype=torch.long),
            part=torch.as_tensor(part + self.part_offsets[y], dtype=torch.long),
        )
        return data if self.transform is None else self.transform(data)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.num_samples}, classes={self.num_classes}, "
            f"points={self.num_points}, noise={self.noise}, rotate={self.rotate})"
        )


# ------------------------------------------------------------------------------------ readers
_PLY_TYPES = {
    "char": "i1",
    "int8": "i1",
    "uchar": "u1",
    "uint8": "u1",
    "short": "i2",
    "int16": "i2",
    "ushort": "u2",
    "uint16": "u2",
    "int": "i4",
    "int32": "i4",
    "uint": "u4",
    "uint32": "u4",
    "float": "f4",
    "float32": "f4",
    "double": "f8",
    "float64": "f8",
}


class _PlyElement:
    def __init__(self, name: str, count: int) -> None:
        self.name, self.count = name, count
        self.properties: list[tuple[str, str, str | None]] = []  # (name, type, list count type)


def _ply_header(path: Path, raw: bytes) -> tuple[str, list[_PlyElement], int, int]:
    """Parse the header: ``(format, elements, body offset, header line count)``."""
    end = raw.find(b"end_header")
    if not raw.startswith(b"ply") or end < 0:
        raise ValueError(f"{path}: not a PLY file (no 'ply' magic or no 'end_header')")
    newline = raw.find(b"\n", end)
    body = len(raw) if newline < 0 else newline + 1
    lines = raw[:end].decode("ascii", errors="replace").splitlines()
    fmt, elements = None, []
    for number, line in enumerate(lines, 1):
        words = line.split()
        if not words or words[0] in ("ply", "comment", "obj_info"):
            continue
        try:
            if words[0] == "format":
                fmt = words[1]
                if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
                    raise ValueError(f"unknown format {fmt!r}")
            elif words[0] == "element":
                count = int(words[2])
                if count < 0:
                    raise ValueError("negative count")
                elements.append(_PlyElement(words[1], count))
            elif words[0] == "property":
                if not elements:
                    raise ValueError("property before any element")
                if words[1] == "list":
                    count_t, item_t, name = _PLY_TYPES[words[2]], _PLY_TYPES[words[3]], words[4]
                    elements[-1].properties.append((name, item_t, count_t))
                else:
                    elements[-1].properties.append((words[2], _PLY_TYPES[words[1]], None))
            else:
                raise ValueError(f"unknown keyword {words[0]!r}")
        except KeyError as exc:
            raise ValueError(
                f"{path}: bad PLY header line {number} {line!r}: unknown property type {exc}"
            ) from None
        except (IndexError, ValueError) as exc:
            raise ValueError(f"{path}: bad PLY header line {number} {line!r}: {exc}") from None
    if fmt is None:
        raise ValueError(f"{path}: PLY header has no 'format' line")
    return fmt, elements, body, len(lines) + 1


def _ply_ascii(path, text: str, elements, first_line: int) -> dict[str, dict[str, np.ndarray]]:
    lines = text.splitlines()
    out, row = {}, 0
    for element in elements:
        columns: dict[str, list] = {name: [] for name, _, _ in element.properties}
        scalar = all(count_t is None for _, _, count_t in element.properties)
        width = len(element.properties)
        for k in range(element.count):
            while row < len(lines) and not lines[row].strip():
                row += 1
            where = f"line {first_line + row + 1} ({element.name} {k})"
            if row >= len(lines):
                raise ValueError(
                    f"{path}: truncated: expected {element.count} {element.name} lines, "
                    f"file ends after {k} ({where})"
                )
            words = lines[row].split()
            row += 1
            if scalar and len(words) != width:
                raise ValueError(f"{path}: {where}: expected {width} values, got {len(words)}")
            try:
                at = 0
                for name, _, count_t in element.properties:
                    if count_t is None:
                        columns[name].append(float(words[at]))
                        at += 1
                    else:
                        m = int(words[at])
                        columns[name].append([int(w) for w in words[at + 1 : at + 1 + m]])
                        if len(columns[name][-1]) != m:
                            raise IndexError
                        at += 1 + m
            except (ValueError, IndexError):
                raise ValueError(f"{path}: {where}: cannot parse {lines[row - 1]!r}") from None
        out[element.name] = columns
    return out


def _ply_binary(path, raw: bytes, offset: int, elements, endian: str):
    out = {}
    for element in elements:
        props = element.properties
        scalar = all(count_t is None for _, _, count_t in props)
        left = len(raw) - offset
        if scalar:
            dtype = np.dtype([(name, endian + t) for name, t, _ in props])
            need = dtype.itemsize * element.count
            if left < need:
                raise ValueError(
                    f"{path}: truncated binary {element.name} data: {element.count} "
                    f"{element.name}s need {need} bytes, {left} left "
                    f"({element.name} {left // max(dtype.itemsize, 1)} is incomplete)"
                )
            table = np.frombuffer(raw, dtype=dtype, count=element.count, offset=offset)
            out[element.name] = {name: table[name] for name, _, _ in props}
            offset += need
            continue
        columns: dict[str, list] = {name: [] for name, _, _ in props}
        for k in range(element.count):
            for name, t, count_t in props:
                size = np.dtype(count_t or t).itemsize
                if offset + size > len(raw):
                    raise ValueError(
                        f"{path}: truncated binary {element.name} data at {element.name} {k}"
                    )
                if count_t is None:
                    columns[name].append(np.frombuffer(raw, endian + t, 1, offset)[0])
                    offset += size
                    continue
                m = int(np.frombuffer(raw, endian + count_t, 1, offset)[0])
                offset += size
                item = np.dtype(endian + t)
                if offset + m * item.itemsize > len(raw):
                    raise ValueError(
                        f"{path}: truncated binary {element.name} data at {element.name} {k}"
                    )
                columns[name].append(np.frombuffer(raw, item, m, offset).tolist())
                offset += m * item.itemsize
        out[element.name] = columns
    return out


def _faces_to_triangles(path, polygons, num_vertices: int, where: str) -> Tensor:
    """Polygons (lists of vertex ids) -> fan-triangulated ``face [3, F]``."""
    tris = []
    for k, poly in enumerate(polygons):
        if len(poly) < 3:
            raise ValueError(f"{path}: {where} {k} has {len(poly)} vertices (need >= 3)")
        tris += [(poly[0], poly[j], poly[j + 1]) for j in range(1, len(poly) - 1)]
    face = torch.tensor(tris, dtype=torch.long).reshape(-1, 3).t().contiguous()
    if face.numel() and (face.min() < 0 or face.max() >= num_vertices):
        k = int(((face < 0) | (face >= num_vertices)).any(0).nonzero()[0])
        raise ValueError(f"{path}: a {where} refers to a vertex out of range (triangle {k})")
    return face


def _read_ply(path: Path) -> dict:
    raw = path.read_bytes()
    fmt, elements, offset, header_lines = _ply_header(path, raw)
    if fmt == "ascii":
        body = raw[offset:].decode("ascii", errors="replace")
        tables = _ply_ascii(path, body, elements, header_lines)
    else:
        endian = "<" if fmt == "binary_little_endian" else ">"
        tables = _ply_binary(path, raw, offset, elements, endian)
    vertex = tables.get("vertex")
    if vertex is None or not all(k in vertex for k in "xyz"):
        raise ValueError(f"{path}: PLY file has no 'vertex' element with x, y, z properties")
    out = {"pos": np.stack([np.asarray(vertex[k], np.float64) for k in "xyz"], 1)}
    if all(k in vertex for k in ("nx", "ny", "nz")):
        out["normal"] = np.stack([np.asarray(vertex[k], np.float64) for k in ("nx", "ny", "nz")], 1)
    face = tables.get("face")
    if face is not None:
        key = next((k for k in ("vertex_indices", "vertex_index") if k in face), None)
        if key is not None:
            out["face"] = _faces_to_triangles(path, face[key], len(out["pos"]), "face")
    out["where"] = "vertex"
    return out


def _content_lines(path: Path) -> list[tuple[int, str]]:
    """Non-empty lines without ``#`` comments, with their 1-based line numbers."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            lines.append((number, line))
    return lines


def _read_off(path: Path) -> dict:
    lines = _content_lines(path)
    if not lines:
        raise ValueError(f"{path}: empty file")
    number, first = lines[0]
    header = re.match(r"(ST)?C?N?4?n?OFF", first)
    if header is None:
        raise ValueError(f"{path}: line {number}: expected an 'OFF' header, got {first!r}")
    prefix = header.group(0)
    if "4" in prefix or "n" in prefix:
        raise ValueError(f"{path}: line {number}: only 3D OFF files are supported ({prefix})")
    rest = first[len(prefix) :].split()  # ModelNet writes 'OFF490 518 0' on one line
    pos_line = 1
    if not rest:
        if len(lines) < 2:
            raise ValueError(f"{path}: no vertex/face counts after the header")
        number, counts_line = lines[1]
        rest, pos_line = counts_line.split(), 2
    try:
        nv, nf = int(rest[0]), int(rest[1])
    except (IndexError, ValueError):
        raise ValueError(f"{path}: line {number}: expected 'vertices faces edges' counts") from None
    has_normal = "N" in prefix[:-3]
    width = 6 if has_normal else 3
    if len(lines) < pos_line + nv + nf:
        raise ValueError(
            f"{path}: truncated: header promises {nv} vertices and {nf} faces, "
            f"found {len(lines) - pos_line} data lines"
        )
    values = np.empty((nv, width))
    for k in range(nv):
        number, line = lines[pos_line + k]
        words = line.split()
        try:
            if len(words) < width:
                raise ValueError
            values[k] = [float(w) for w in words[:width]]
        except ValueError:
            raise ValueError(
                f"{path}: line {number} (vertex {k}): expected {width} numbers, got {line!r}"
            ) from None
    polygons = []
    for k in range(nf):
        number, line = lines[pos_line + nv + k]
        try:
            words = line.split()
            m = int(words[0])
            poly = [int(w) for w in words[1 : 1 + m]]
            if len(poly) != m:
                raise ValueError
        except (ValueError, IndexError):
            raise ValueError(f"{path}: line {number} (face {k}): cannot parse {line!r}") from None
        polygons.append(poly)
    out = {"pos": values[:, :3], "where": "vertex"}
    if has_normal:
        out["normal"] = values[:, 3:6]
    if nf:
        out["face"] = _faces_to_triangles(path, polygons, nv, "face")
    return out


def _read_table(path: Path) -> dict:
    lines = _content_lines(path)
    if not lines:
        raise ValueError(f"{path}: empty file")
    rows, width = [], None
    for k, (number, line) in enumerate(lines):
        words = line.replace(",", " ").split()
        if k == 0 and len(words) == 1 and words[0].isdigit():
            raise ValueError(
                f"{path}: line {number}: looks like a molecular XYZ file (atom count, then "
                "'element x y z' lines): read it with geolinrpe.data.molecules.from_ase"
            )
        try:
            row = [float(w) for w in words]
        except ValueError:
            raise ValueError(f"{path}: line {number} (point {k}): not numbers: {line!r}") from None
        if width is None:
            width = len(row)
            if width < 3:
                raise ValueError(f"{path}: line {number}: need at least 3 columns (x y z)")
        elif len(row) != width:
            raise ValueError(
                f"{path}: line {number} (point {k}): expected {width} columns, got {len(row)}"
            )
        rows.append(row)
    return {"table": np.asarray(rows, dtype=np.float64), "where": "point"}


def _read_npy(path: Path) -> dict:
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError, OSError, EOFError, ...
        raise ValueError(
            f"{path}: not a readable .npy file ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(array, np.ndarray) or array.ndim != 2 or array.shape[1] < 3:
        raise ValueError(f"{path}: expected an array [n, >=3], got shape {np.shape(array)}")
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{path}: expected a numeric array, got dtype {array.dtype}")
    return {"table": array.astype(np.float64), "where": "row"}


def read_point_cloud(path: str | os.PathLike, normals: bool | None = None) -> Data:
    r"""Read a point cloud (or the vertices of a mesh) into a ``Data``.

    Formats, by suffix:

    * ``.ply``: ascii, ``binary_little_endian`` or ``binary_big_endian``; the ``vertex``
      element's ``x y z`` (any numeric type), ``nx ny nz`` when present; a ``face`` element
      (``vertex_indices`` lists) becomes ``face``. Other properties are ignored.
    * ``.off`` (also ``NOFF``/``COFF``, and ModelNet's ``OFF<nv> <nf> <ne>`` header glitch):
      vertices, normals for ``NOFF``, faces.
    * ``.xyz``, ``.txt``, ``.csv``: one point a line, whitespace or comma separated, ``#``
      comments.
    * ``.npy``: an array ``[n, k]``, ``k >= 3``.

    For ``.xyz``/``.txt``/``.csv``/``.npy`` the columns are ``x y z`` then, with
    ``normals=True`` (or ``None`` and exactly 6 columns, the layout of ModelNet's resampled
    files), ``nx ny nz``; remaining columns go to ``x``. Pass ``normals=False`` for
    6-column files whose extra columns are not normals (e.g. colours).

    Args:
        path: the file.
        normals: how to read columns 4-6 of a table (see above).

    Returns:
        ``Data`` with ``pos [n, 3]`` float32 and, when present, ``normal [n, 3]`` float32,
        ``x [n, k-3]`` float32 (extra columns) and ``face [3, F]`` long (triangles; polygons
        are fan-triangulated).

    Raises:
        ValueError: unknown suffix, corrupt, truncated or non-finite content, or values
            beyond float32's range (``|x| > 3.4e38``, which would become ``inf``); the
            message names the file, the field and the line or element.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such point-cloud file: {path}")
    suffix = path.suffix.lower()
    readers = {".ply": _read_ply, ".off": _read_off, ".npy": _read_npy}
    readers.update(dict.fromkeys((".xyz", ".txt", ".csv", ".pts"), _read_table))
    if suffix not in readers:
        raise ValueError(f"{path}: unknown point-cloud suffix {suffix!r}; known: {sorted(readers)}")
    content = readers[suffix](path)
    where = content.pop("where")
    if "table" in content:
        table = content.pop("table")
        use_normals = table.shape[1] == 6 if normals is None else normals
        if use_normals and table.shape[1] < 6:
            raise ValueError(f"{path}: normals=True needs 6 columns, got {table.shape[1]}")
        content["pos"] = table[:, :3]
        start = 3
        if use_normals:
            content["normal"], start = table[:, 3:6], 6
        if table.shape[1] > start:
            content["x"] = table[:, start:]
    if len(content["pos"]) == 0:
        raise ValueError(f"{path}: no points")
    data = Data()
    for key, value in content.items():
        if isinstance(value, Tensor):
            data[key] = value
            continue
        # check after the cast: finite float64 values beyond float32's range (|x| > 3.4e38)
        # become inf there
        tensor = torch.as_tensor(value, dtype=torch.float32)
        finite = torch.isfinite(tensor).all(dim=1)
        if not bool(finite.all()):
            k = int((~finite).nonzero()[0, 0])
            row = np.asarray(value[k], dtype=np.float64)
            bad = float(row[~torch.isfinite(tensor[k]).numpy()][0])
            kind = "non-finite" if not np.isfinite(bad) else "out of float32 range"
            raise ValueError(f"{path}: {kind} {key} at {where} {k} ({bad!r})")
        data[key] = tensor
    return data


# --------------------------------------------------------------------------------- transforms
def random_rotation(
    dim: int = 3, generator: torch.Generator | None = None, dtype=torch.float64
) -> Tensor:
    """A uniformly random rotation matrix ``[dim, dim]`` (``dim`` 2 or 3; Haar measure)."""
    if dim == 2:
        angle = 2 * math.pi * torch.rand((), generator=generator, dtype=torch.float64)
        c, s = torch.cos(angle), torch.sin(angle)
        return torch.stack([torch.stack([c, -s]), torch.stack([s, c])]).to(dtype)
    if dim != 3:
        raise ValueError(f"random rotations are for dim 2 or 3, got {dim}")
    w, x, y, z = torch.nn.functional.normalize(
        torch.randn(4, generator=generator, dtype=torch.float64), dim=0
    )
    rot = torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)]),
            torch.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)]),
            torch.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]),
        ]
    )
    return rot.to(dtype)


class Center(BaseTransform):
    r"""Subtract the centroid: ``pos [n, p] -> pos - mean(pos)``."""

    def forward(self, data: Data) -> Data:
        data.pos = data.pos - data.pos.mean(dim=0, keepdim=True)
        return data


class NormalizeScale(BaseTransform):
    r"""Centre, then scale into the unit ball: ``max_i |pos_i| = 1`` (a single point, or all
    points equal, is only centred)."""

    def forward(self, data: Data) -> Data:
        pos = data.pos - data.pos.mean(dim=0, keepdim=True)
        radius = pos.norm(dim=-1).max()
        data.pos = pos / radius if radius > 0 else pos
        return data


class RandomRotate(BaseTransform):
    r"""Rotate ``pos [n, p]`` (and ``normal`` when present) by a uniformly random rotation
    about the origin (Haar measure on SO(3), or a uniform angle for ``p = 2``).

    Unlike :class:`torch_geometric.transforms.RandomRotate` (one axis, bounded angle), this
    draws from all rotations, the augmentation for a rotation-invariant task.

    Args:
        generator: a :class:`torch.Generator` for reproducible draws (default: global RNG).
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def forward(self, data: Data) -> Data:
        rot = random_rotation(data.pos.shape[-1], self.generator, data.pos.dtype)
        data.pos = data.pos @ rot.T
        if getattr(data, "normal", None) is not None:
            data.normal = data.normal @ rot.T.to(data.normal.dtype)
        return data


class RandomJitter(BaseTransform):
    r"""Add Gaussian noise of std ``std`` to ``pos``, clipped to ``[-clip, clip]`` when
    ``clip`` is given.

    Args:
        std: noise standard deviation.
        clip: bound on each coordinate's noise (``None``: no bound).
        generator: a :class:`torch.Generator` for reproducible draws.
    """

    def __init__(
        self, std: float = 0.01, clip: float | None = None, generator: torch.Generator | None = None
    ) -> None:
        if std < 0 or (clip is not None and clip <= 0):
            raise ValueError(f"need std >= 0 and clip > 0 or None, got std={std}, clip={clip}")
        self.std, self.clip, self.generator = std, clip, generator

    def forward(self, data: Data) -> Data:
        noise = torch.randn(data.pos.shape, generator=self.generator, dtype=data.pos.dtype).mul_(
            self.std
        )
        if self.clip is not None:
            noise = noise.clamp_(-self.clip, self.clip)
        data.pos = data.pos + noise.to(data.pos.device)
        return data

    def __repr__(self) -> str:
        return f"{type(self).__name__}(std={self.std}, clip={self.clip})"
