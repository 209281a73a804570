r"""OC20 (Open Catalyst 2020) adsorbate-catalyst structures in their three on-disk formats.

The Open Catalyst 2020 dataset (Chanussot et al., ACS Catalysis 2021,
https://arxiv.org/abs/2010.09990) holds DFT relaxations of adsorbates on catalyst slabs.
:class:`OC20` reads the files users download (``datasets/oc20/README.md``), detecting the
format from the path:

* **legacy LMDB** (the IS2RE/S2EF releases): one ``data.lmdb`` file (IS2RE) or a folder of
  ``data.NNNN.lmdb`` shards (S2EF); keys ``"0".."n-1"`` and an optional ``length``; values
  pickled PyG :class:`~torch_geometric.data.Data` (also pickles from PyG 1.x).
* **ASE-DB LMDB** (``.aselmdb``, current fairchem; one file or a folder of them): keys are
  row ids from 1 plus ``nextid``, ``deleted_ids``, ``metadata``; values zlib-compressed JSON
  rows (ASE's ``__ndarray__`` encoding or plain lists).
* **S2EF extxyz** (the raw S2EF release): ``<k>.extxyz`` (or ``.extxyz.xz``) frames beside
  ``<k>.txt`` (or ``.txt.xz``) lines ``random<sid>,frame<fid>,<reference energy>``.

Every item is a :class:`~torch_geometric.data.Data` with the same fields whatever the format
(n atoms; energies in eV, lengths in Angstrom, forces in eV/Angstrom):

=================  ====================  ================================================
field              shape, dtype          meaning
=================  ====================  ================================================
``z``              [n] long              atomic numbers (1..118)
``pos``            [n, 3] float32        Cartesian positions (Angstrom)
``cell``           [1, 3, 3] float32     lattice vectors as rows (Angstrom)
``pbc``            [1, 3] bool           periodic directions (all True when not stored)
``tags``           [n] long              as stored: OC20 uses 0 subsurface, 1 surface,
                                         2 adsorbate (see "Tags" below)
``fixed``          [n] bool              atoms held fixed during the relaxation
``natoms``         int                   n
``sid``            int                   system id (``random<sid>``)
``y_relaxed``      [1] float32           IS2RE: relaxed adsorption energy (eV)
``y_init``         [1] float32           IS2RE: adsorption energy of ``pos`` (eV), if stored
``pos_relaxed``    [n, 3] float32        IS2RE: relaxed positions (Angstrom), if stored
``y``              [1] float32           S2EF: adsorption-referenced energy of ``pos`` (eV)
``force``          [n, 3] float32        S2EF: forces on the atoms (eV/Angstrom)
``fid``            int                   S2EF: frame index in the relaxation, if stored
=================  ====================  ================================================

Adsorption-referenced energies are DFT total energies minus the clean slab and the gas-phase
references of the adsorbate's atoms; the extxyz files and ASE-DB rows that carry total
energies also carry that reference (``.txt`` column 3, row ``data["ref_energy"]``), and the
loader subtracts it so ``y`` means the same in every format. Precomputed graph fields of the
legacy files (``edge_index``, ``cell_offsets``, ``distances``) are not carried over: models
here build their own neighbourhoods.

**Tags.** OC20's files tag atoms 0 (subsurface), 1 (surface) and 2 (adsorbate). Files written
from ASE's own slab builders (``ase.build.fcc111`` and friends) tag the slab's layers 1, 2,
3, ... from the top and adsorbates 0. Tags are read as stored (any 32-bit integer) and never
remapped; the models in :mod:`geolinrpe.models` do not read tags, so they mean only what a
user's own transform or loss makes of them (map ASE's convention to OC20's with
``torch.where`` if your code relies on OC20's).

**Safety** (``SECURITY.md``). Files are read without memory maps (:mod:`.lmdb_file`): a
damaged or truncated LMDB file raises :class:`OC20FormatError` naming it, never a signal.
A record may allocate at most :func:`record_budget` of its size while it is decoded, and
counts it declares (``length``, ``nextid``) are checked against the entries present before
anything is allocated; compressed values and ``.xz`` files may only expand within a bound.

.. warning::
    Legacy LMDB values are pickles, and unpickling runs code named in the file. The default
    ``safe=True`` admits only the classes OC20 records need and raises
    :class:`UnsafePickleError` otherwise; ``safe=False`` unpickles with :mod:`pickle` and must
    only be used for files from a source you trust. ASE-DB and extxyz files are plain data.

Modules: :mod:`.dataset` (:class:`OC20`), one per format (:mod:`.legacy_lmdb`,
:mod:`.aselmdb`, :mod:`.extxyz`), :mod:`.lmdb_file` (the LMDB reader), :mod:`.safe_pickle`,
:mod:`.records` (checks shared by every format), :mod:`.synthetic` (writers of test data).
"""

from .dataset import OC20
from .lmdb_file import LMDBFile
from .records import OC20FormatError, record_budget
from .safe_pickle import UnsafePickleError
from .synthetic import (
    FORMATS,
    SyntheticSystem,
    gas_references,
    make_synthetic,
    synthetic_systems,
    write_aselmdb,
    write_oc20,
)

__all__ = [
    "FORMATS",
    "OC20",
    "LMDBFile",
    "OC20FormatError",
    "SyntheticSystem",
    "UnsafePickleError",
    "gas_references",
    "make_synthetic",
    "record_budget",
    "synthetic_systems",
    "write_aselmdb",
    "write_oc20",
]
