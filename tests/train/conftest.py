import pytest

from geolinrpe.data.qm9 import QM9


@pytest.fixture(scope="session")
def qm9_root(tmp_path_factory):
    """A QM9 cache of the first 160 molecules (built once for the training tests)."""
    root = tmp_path_factory.mktemp("qm9")
    QM9(str(root), max_molecules=160, log=False)
    return root
