"""The core (attention layers, RPE families, invariance helpers) runs with torch alone; the
data loaders name the extra they need when it is missing."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTRAS_ONLY = ("torch_geometric", "yaml", "tqdm", "matplotlib", "ase", "lmdb", "rdkit",
               "pandas", "qm9pack", "sklearn", "e3nn", "scipy")  # fmt: skip

CORE_ONLY = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {EXTRAS_ONLY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Block())
import torch
import geolinrpe, geolinrpe.testing, geolinrpe.data
from geolinrpe import RPEAttention
from geolinrpe.rpe import names
x, pos = torch.randn(2, 7, 24), torch.randn(2, 7, 3)
for rpe in ("flt-kernel", "flt-gm", "flt-radial", "rope", "string", None):
    out = RPEAttention(24, 2, rpe=rpe, pos_dim=3)(x, pos)
    assert out.shape == x.shape and bool(torch.isfinite(out).all()), rpe
try:
    geolinrpe.data.QM9
except ModuleNotFoundError as err:
    assert "geolinrpe[qm9]" in str(err), err
else:
    raise AssertionError("QM9 imported without pandas/PyG")
print("core ok", len(names()), sorted(m for m in sys.modules if m.split(".")[0] in {EXTRAS_ONLY!r}))
"""


def test_core_runs_with_torch_alone():
    done = subprocess.run(
        [sys.executable, "-c", CORE_ONLY], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("[]")  # no extra was imported


def test_extras_pin_nothing_that_clashes_with_mace():
    """mace-torch pins e3nn==0.4.4: geolinrpe needs no e3nn at all (spherical harmonics are
    its own), and the core depends on torch and numpy only (the installed metadata)."""
    declared = requires("geolinrpe") or []
    core = [d.split(">")[0].split("=")[0].strip() for d in declared if "extra ==" not in d]
    assert sorted(core) == ["numpy", "torch"]
    assert not any(d.startswith("e3nn") for d in declared)
    extras = {d.split("extra ==")[1].strip().strip("'\"") for d in declared if "extra ==" in d}
    assert extras >= {"data", "qm9", "train", "all", "test"}
