"""Synthetic shapes are balanced, surface-uniform and randomly rotated without changing their
rotation-invariant statistics; readers round-trip hand-written files and reject corrupt ones;
transforms do what they say."""

import numpy as np
import pytest
import torch
from torch_geometric.data import Data
from torch_geometric.transforms import Compose

from geolinrpe.data.point_clouds import (
    SHAPES,
    Center,
    NormalizeScale,
    RandomJitter,
    RandomRotate,
    SyntheticShapes,
    random_rotation,
    read_point_cloud,
)

D64 = torch.float64


def kabsch(a, b):
    """The rotation R minimising |a R^T - b| for centred-or-not point sets about the origin."""
    u, _, vt = torch.linalg.svd(b.T @ a)
    d = torch.sign(torch.det(u @ vt))
    return u @ torch.diag(torch.tensor([1.0, 1.0, d], dtype=a.dtype)) @ vt


# ---------------------------------------------------------------------------- synthetic shapes
def test_shapes_fields_balance_and_determinism():
    ds = SyntheticShapes(num_classes=12, num_points=64, num_samples=60, seed=1)
    assert len(ds) == 60 and ds.classes == [name for name, _, _ in SHAPES]
    labels = torch.cat([ds[i].y for i in range(60)])
    assert torch.bincount(labels, minlength=12).tolist() == [5] * 12
    assert labels[:12].unique().numel() > 3  # shuffled, not 0, 1, 2, ...
    data = ds[7]
    assert data.pos.shape == (64, 3) and data.pos.dtype == torch.float32
    assert data.normal.shape == (64, 3) and data.y.dtype == torch.long
    assert data.part.shape == (64,) and data.part.dtype == torch.long
    assert torch.equal(ds[7].pos, data.pos) and torch.equal(ds[-53].pos, data.pos)
    assert not torch.equal(SyntheticShapes(12, 64, 60, seed=2)[7].pos, data.pos)
    assert ds.num_parts == 16
    for i in range(60):
        d = ds[i]
        y = d.y.item()
        offset, parts = ds.part_offsets[y], SHAPES[y][2]
        assert offset <= d.part.min() and d.part.max() < offset + parts
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticShapes(num_classes=7)
    with pytest.raises(IndexError):
        ds[60]


def test_rotation_changes_nothing_rotation_invariant():
    kwargs = dict(num_classes=8, num_points=128, num_samples=16, noise=0.02, seed=5)
    rotated, upright = (
        SyntheticShapes(rotate=True, **kwargs),
        SyntheticShapes(rotate=False, **kwargs),
    )
    for i in range(16):
        a, b = rotated[i].pos.to(D64), upright[i].pos.to(D64)
        assert not torch.allclose(a, b, atol=1e-2)
        # sorted pairwise distances and radius of gyration are unchanged
        assert torch.allclose(torch.pdist(a).sort().values, torch.pdist(b).sort().values, atol=1e-5)
        gyration = [(p - p.mean(0)).pow(2).sum(1).mean().sqrt() for p in (a, b)]
        assert gyration[0] == pytest.approx(gyration[1].item(), abs=1e-6)
        assert torch.equal(rotated[i].part, upright[i].part)
        # one proper rotation maps the upright cloud and its normals onto the rotated one
        rot = kabsch(b, a)
        assert torch.allclose(b @ rot.T, a, atol=1e-5)
        assert torch.allclose(
            upright[i].normal.to(D64) @ rot.T, rotated[i].normal.to(D64), atol=1e-5
        )


def test_rotations_are_uniformly_random():
    kwargs = dict(num_classes=8, num_points=32, num_samples=400, noise=0.0, seed=0)
    rotated, upright = (
        SyntheticShapes(rotate=True, **kwargs),
        SyntheticShapes(rotate=False, **kwargs),
    )
    rots = torch.stack([kabsch(upright[i].pos.to(D64), rotated[i].pos.to(D64)) for i in range(400)])
    assert torch.allclose(torch.det(rots), torch.ones(400, dtype=D64), atol=1e-6)
    # Haar measure on SO(3): E[R] = 0 and E[R_ij^2] = 1/3 (std of the mean ~ 0.03 for 400)
    assert rots.mean(0).abs().max() < 0.12
    assert torch.allclose(rots.pow(2).mean(0), torch.full((3, 3), 1 / 3, dtype=D64), atol=0.06)
    # the rotated axis of each shape points everywhere: no preferred direction
    axis = rots[:, :, 2]
    assert axis.mean(0).norm() < 0.12


def test_surfaces_are_sampled_uniformly_with_correct_normals():
    n = 2000
    ds = SyntheticShapes(num_classes=12, num_points=n, num_samples=12, noise=0.0, rotate=False)
    convex = {"sphere", "box", "cylinder", "cone", "ellipsoid", "capsule", "tetrahedron"}
    convex |= {"octahedron", "dome"}
    for i in range(12):
        data = ds[i]
        name = ds.classes[data.y.item()]
        pos, normal = data.pos.to(D64), data.normal.to(D64)
        assert torch.allclose(normal.norm(dim=1), torch.ones(n, dtype=D64), atol=1e-5)
        # the normal is the direction of least spread among each point's 12 neighbours
        nearest = torch.cdist(pos, pos).topk(12, largest=False).indices
        local = pos[nearest] - pos[nearest].mean(1, keepdim=True)
        least = torch.linalg.eigh(local.transpose(1, 2) @ local).eigenvectors[:, :, 0]
        agreement = (least * normal).sum(1).abs()
        assert agreement.median() > 0.98, name
        if name in convex:  # and it points outwards
            assert ((pos - pos.mean(0)) * normal).sum(1).min() > 0, name
    # cylinder: the share of cap points equals the caps' share of the area
    cylinders = SyntheticShapes(8, 4000, 8, noise=0.0, rotate=False)
    data = next(cylinders[i] for i in range(8) if cylinders.classes[cylinders[i].y] == "cylinder")
    r = data.pos[:, :2].norm(dim=1).max().item()
    h = (data.pos[:, 2].max() - data.pos[:, 2].min()).item()
    caps = (data.part == data.part.max()).double().mean().item()
    want = r / (r + h)  # 2 pi r^2 / (2 pi r^2 + 2 pi r h)
    assert caps == pytest.approx(want, abs=4 * (want * (1 - want) / 4000) ** 0.5)
    # sphere: uniform directions have mean ~ 0 and second moment I/3
    sphere = next(d for d in (ds[i] for i in range(12)) if d.y.item() == 0)
    u = torch.nn.functional.normalize(sphere.pos.to(D64), dim=1)
    assert u.mean(0).norm() < 0.1
    assert torch.allclose(u.T @ u / n, torch.eye(3, dtype=D64) / 3, atol=0.03)


# ----------------------------------------------------------------------------------- readers
@pytest.fixture
def cloud():
    gen = torch.Generator().manual_seed(0)
    pos = torch.randn(7, 3, generator=gen).numpy().astype(np.float32)
    normal = torch.randn(7, 3, generator=gen).numpy().astype(np.float32)
    faces = [[0, 1, 2], [2, 3, 4, 5]]  # a triangle and a quad
    return pos, normal, faces


def ply_header(fmt, n, with_faces, vertex_type="float"):
    lines = ["ply", f"format {fmt} 1.0", "comment written by hand", f"element vertex {n}"]
    lines += [f"property {vertex_type} {k}" for k in ("x", "y", "z", "nx", "ny", "nz")]
    lines += ["property uchar red"]  # ignored
    if with_faces:
        lines += ["element face 2", "property list uchar int vertex_indices"]
    return ("\n".join(lines + ["end_header"]) + "\n").encode()


def write_ply_ascii(path, pos, normal, faces):
    rows = [
        " ".join(repr(float(v)) for v in (*p, *q)) + " 7" for p, q in zip(pos, normal, strict=True)
    ]
    rows += [" ".join(map(str, [len(f), *f])) for f in faces]
    path.write_bytes(ply_header("ascii", len(pos), True) + ("\n".join(rows) + "\n").encode())


def write_ply_binary(path, pos, normal, faces, endian="<", vertex_type=("float", "f4")):
    name = "binary_little_endian" if endian == "<" else "binary_big_endian"
    dtype = np.dtype(
        [(k, endian + vertex_type[1]) for k in ("x", "y", "z", "nx", "ny", "nz")] + [("red", "u1")]
    )
    table = np.zeros(len(pos), dtype)
    for j, k in enumerate(("x", "y", "z")):
        table[k], table["n" + k] = pos[:, j], normal[:, j]
    body = table.tobytes()
    for f in faces:
        body += np.uint8(len(f)).tobytes() + np.asarray(f, endian + "i4").tobytes()
    path.write_bytes(ply_header(name, len(pos), True, vertex_type[0]) + body)


def assert_round_trip(data, pos, normal=None, faces=None):
    assert data.pos.dtype == torch.float32
    assert torch.equal(data.pos, torch.as_tensor(pos))
    if normal is not None:
        assert torch.equal(data.normal, torch.as_tensor(normal))
    if faces is not None:
        triangles = [[0, 1, 2], [2, 3, 4], [2, 4, 5]]  # the quad is fan-triangulated
        assert data.face.dtype == torch.long and data.face.t().tolist() == triangles


def test_ply_round_trips(tmp_path, cloud):
    pos, normal, faces = cloud
    write_ply_ascii(tmp_path / "a.ply", pos, normal, faces)
    assert_round_trip(read_point_cloud(tmp_path / "a.ply"), pos, normal, faces)
    write_ply_binary(tmp_path / "le.ply", pos, normal, faces, "<")
    assert_round_trip(read_point_cloud(tmp_path / "le.ply"), pos, normal, faces)
    write_ply_binary(tmp_path / "be.ply", pos, normal, faces, ">", ("double", "f8"))
    assert_round_trip(read_point_cloud(str(tmp_path / "be.ply")), pos, normal, faces)
    # points only, no normals, Windows line ends in the header
    header = "ply\r\nformat ascii 1.0\r\nelement vertex 2\r\nproperty float x\r\n"
    header += "property float y\r\nproperty float z\r\nend_header\r\n"
    (tmp_path / "p.ply").write_text(header + "1 2 3\r\n4 5 6\r\n")
    data = read_point_cloud(tmp_path / "p.ply")
    assert (
        data.pos.tolist() == [[1, 2, 3], [4, 5, 6]] and "normal" not in data and "face" not in data
    )


def test_off_xyz_npy_round_trips(tmp_path, cloud):
    pos, normal, faces = cloud
    vertices = "\n".join(" ".join(repr(float(v)) for v in p) for p in pos)
    polygons = "\n".join(" ".join(map(str, [len(f), *f])) for f in faces)
    (tmp_path / "a.off").write_text(f"OFF\n# comment\n{len(pos)} 2 0\n{vertices}\n{polygons}\n")
    assert_round_trip(read_point_cloud(tmp_path / "a.off"), pos, faces=faces)
    # ModelNet40's header glitch: counts glued to 'OFF'
    (tmp_path / "m.off").write_text(f"OFF{len(pos)} 2 0\n{vertices}\n{polygons}\n")
    assert_round_trip(read_point_cloud(tmp_path / "m.off"), pos, faces=faces)
    with_normals = "\n".join(
        " ".join(repr(float(v)) for v in (*p, *q)) for p, q in zip(pos, normal, strict=True)
    )
    (tmp_path / "n.off").write_text(f"NOFF\n{len(pos)} 0 0\n{with_normals}\n")
    assert_round_trip(read_point_cloud(tmp_path / "n.off"), pos, normal)

    (tmp_path / "a.xyz").write_text(vertices + "\n")
    assert_round_trip(read_point_cloud(tmp_path / "a.xyz"), pos)
    (tmp_path / "n.txt").write_text(with_normals.replace(" ", ",") + "\n")  # ModelNet .txt
    assert_round_trip(read_point_cloud(tmp_path / "n.txt"), pos, normal)
    colours = read_point_cloud(tmp_path / "n.txt", normals=False)  # 6 columns, not normals
    assert "normal" not in colours and torch.equal(colours.x, torch.as_tensor(normal))

    np.save(tmp_path / "a.npy", pos)
    assert_round_trip(read_point_cloud(tmp_path / "a.npy"), pos)
    np.save(tmp_path / "n.npy", np.concatenate([pos, normal, pos[:, :1]], 1).astype(np.float64))
    data = read_point_cloud(tmp_path / "n.npy", normals=True)
    assert_round_trip(data, pos, normal)
    assert torch.equal(data.x, torch.as_tensor(pos[:, :1]))


def corrupt(path, text_or_bytes):
    if isinstance(text_or_bytes, bytes):
        path.write_bytes(text_or_bytes)
    else:
        path.write_text(text_or_bytes)
    return path


def test_readers_reject_corrupt_files(tmp_path, cloud):
    pos, normal, faces = cloud
    write_ply_ascii(tmp_path / "good.ply", pos, normal, faces)
    lines = (tmp_path / "good.ply").read_text().splitlines()
    header_lines = lines.index("end_header") + 1
    short = lines.copy()
    short[header_lines + 2] = "1.0 2.0"  # vertex 2 loses values
    cases = {
        corrupt(tmp_path / "short.ply", "\n".join(short)): rf"line {header_lines + 3} \(vertex 2\)",
        corrupt(tmp_path / "cut.ply", "\n".join(lines[: header_lines + 4])): "truncated",
        corrupt(
            tmp_path / "words.ply",
            "\n".join(lines).replace("property uchar red", "property uchr red"),
        ): "line 11 .*unknown property type 'uchr'",
        corrupt(tmp_path / "nomagic.ply", "hello\n"): "not a PLY file",
    }
    write_ply_binary(tmp_path / "bin.ply", pos, normal, faces)
    raw = (tmp_path / "bin.ply").read_bytes()
    body_start = raw.index(b"end_header\n") + len(b"end_header\n")
    cases[corrupt(tmp_path / "bincut.ply", raw[: body_start + 25 * 4])] = r"vertex 4 is incomplete"
    cases[corrupt(tmp_path / "facecut.ply", raw[:-3])] = "truncated binary face data at face 1"
    bad_face = raw[:-4] + np.int32(99).tobytes()
    cases[corrupt(tmp_path / "badface.ply", bad_face)] = "out of range"
    vertices = "\n".join(" ".join(map(str, p)) for p in pos)
    cases[corrupt(tmp_path / "cut.off", f"OFF\n7 2 0\n{vertices}\n3 0 1 2\n")] = "truncated"
    cases[corrupt(tmp_path / "bad.off", f"OFF\n7 0 0\n{vertices.replace('0.', 'x.', 1)}\n")] = (
        r"line 3 \(vertex 0\)"
    )
    cases[corrupt(tmp_path / "head.off", "OF\n1 0 0\n0 0 0\n")] = "OFF"
    cases[corrupt(tmp_path / "ragged.xyz", "0 0 0\n1 1 1\n2 2\n")] = (
        r"line 3 \(point 2\): expected 3"
    )
    cases[corrupt(tmp_path / "text.xyz", "0 0 0\n1 one 1\n")] = "line 2"
    cases[corrupt(tmp_path / "water.xyz", "3\n\nO 0 0 0\nH 0 0 1\nH 0 1 0\n")] = "from_ase"
    cases[corrupt(tmp_path / "nan.xyz", "0 0 0\n1 nan 1\n")] = "non-finite pos at point 1"
    cases[corrupt(tmp_path / "junk.npy", b"\x93NUMPY garbage")] = "not a readable .npy"
    np.save(tmp_path / "flat.npy", np.zeros(6))
    cases[tmp_path / "flat.npy"] = r"expected an array \[n, >=3\]"
    cases[corrupt(tmp_path / "cloud.las", "x")] = "unknown point-cloud suffix"
    for path, message in cases.items():
        with pytest.raises(ValueError, match=message) as info:
            read_point_cloud(path)
        assert path.name in str(info.value)
    with pytest.raises(FileNotFoundError):
        read_point_cloud(tmp_path / "missing.ply")


@pytest.mark.parametrize("value", [1e300, 1e39, -1e39])
def test_readers_refuse_values_beyond_float32(tmp_path, cloud, value):
    """Finite float64 values that the float32 cast would turn into inf are refused, naming
    the file, the field and the point."""
    pos, normal, faces = (a.astype(np.float64) if i < 2 else a for i, a in enumerate(cloud))
    for field, row in (("pos", 3), ("normal", 5)):
        p, q = pos.copy(), normal.copy()
        (p if field == "pos" else q)[row, 1] = value
        text = "\n".join(
            " ".join(repr(float(v)) for v in (*a, *b)) for a, b in zip(p, q, strict=True)
        )
        write_ply_ascii(tmp_path / f"{field}.ply", p, q, faces)
        write_ply_binary(tmp_path / f"{field}.b.ply", p, q, faces, ">", ("double", "f8"))
        files = {
            tmp_path / f"{field}.ply": "vertex",
            tmp_path / f"{field}.b.ply": "vertex",
            corrupt(tmp_path / f"{field}.off", f"NOFF\n{len(p)} 0 0\n{text}\n"): "vertex",
            corrupt(tmp_path / f"{field}.xyz", text + "\n"): "point",
            corrupt(tmp_path / f"{field}.csv", text.replace(" ", ",") + "\n"): "point",
        }
        np.save(tmp_path / f"{field}.npy", np.concatenate([p, q], 1))
        files[tmp_path / f"{field}.npy"] = "row"
        for path, where in files.items():
            message = f"{path}: out of float32 range {field} at {where} {row} ({value!r})"
            with pytest.raises(ValueError) as info:
                read_point_cloud(path)
            assert str(info.value) == message
    # extra columns (x) too; the largest float32 values are kept
    table = np.concatenate([pos, normal, pos[:, :1]], 1)
    table[2, 6] = value
    np.save(tmp_path / "x.npy", table)
    with pytest.raises(ValueError, match=r"x.npy: out of float32 range x at row 2 "):
        read_point_cloud(tmp_path / "x.npy")
    table[2, 6] = 3.0e38
    table[0, 0] = -3.0e38
    np.save(tmp_path / "max.npy", table)
    data = read_point_cloud(tmp_path / "max.npy", normals=True)
    assert data.x[2, 0].item() == pytest.approx(3.0e38, rel=1e-6)
    assert data.pos[0, 0].item() == pytest.approx(-3.0e38, rel=1e-6)


# -------------------------------------------------------------------------------- transforms
def test_center_and_normalize_scale():
    data = Data(pos=torch.randn(50, 3, dtype=D64) * 3 + 5)
    original = data.pos.clone()
    centred = Center()(data)
    assert torch.allclose(centred.pos.mean(0), torch.zeros(3, dtype=D64), atol=1e-12)
    assert torch.equal(data.pos, original)  # the input is not modified
    scaled = NormalizeScale()(data)
    assert scaled.pos.norm(dim=1).max().item() == pytest.approx(1.0)
    assert torch.allclose(scaled.pos.mean(0), torch.zeros(3, dtype=D64), atol=1e-12)
    ratio = torch.pdist(scaled.pos) / torch.pdist(original)  # a similarity transform
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))
    single = NormalizeScale()(Data(pos=torch.ones(1, 3)))
    assert torch.equal(single.pos, torch.zeros(1, 3))


def test_random_rotate_is_a_uniform_proper_rotation():
    pos, normal = torch.randn(40, 3, dtype=D64), torch.randn(40, 3, dtype=D64)
    data = Data(pos=pos, normal=normal)
    out = RandomRotate(torch.Generator().manual_seed(1))(data)
    again = RandomRotate(torch.Generator().manual_seed(1))(data)
    assert torch.equal(out.pos, again.pos) and not torch.allclose(out.pos, pos)
    rot = kabsch(pos, out.pos)
    assert torch.allclose(pos @ rot.T, out.pos, atol=1e-10)
    assert torch.allclose(normal @ rot.T, out.normal, atol=1e-10)
    assert torch.det(rot).item() == pytest.approx(1.0)
    gen = torch.Generator().manual_seed(2)
    rots = torch.stack([random_rotation(3, gen) for _ in range(2000)])
    assert rots.mean(0).abs().max() < 0.05  # Haar: E[R] = 0
    eye = torch.eye(3, dtype=D64).expand_as(rots)
    assert torch.allclose(rots @ rots.transpose(1, 2), eye, atol=1e-12)
    flat = RandomRotate()(Data(pos=torch.randn(10, 2)))
    assert flat.pos.shape == (10, 2)


def test_random_jitter_and_compose():
    data = Data(pos=torch.zeros(20000, 3, dtype=D64))
    noisy = RandomJitter(0.1)(data)
    assert noisy.pos.std().item() == pytest.approx(0.1, rel=0.03)
    clipped = RandomJitter(0.1, clip=0.05)(data)
    assert clipped.pos.abs().max() <= 0.05 and clipped.pos.abs().max() == 0.05
    with pytest.raises(ValueError):
        RandomJitter(-1.0)
    pipeline = Compose([RandomRotate(), RandomJitter(0.01), NormalizeScale()])
    ds = SyntheticShapes(num_classes=8, num_points=100, num_samples=8, transform=pipeline)
    for i in range(8):
        assert ds[i].pos.norm(dim=1).max().item() == pytest.approx(1.0, abs=1e-6)
