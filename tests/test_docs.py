"""The Python blocks of the docs pages run as they are (each block in a fresh namespace)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["docs/reproducing.md"]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _blocks():
    for page in PAGES:
        for number, match in enumerate(BLOCK.finditer((ROOT / page).read_text()), start=1):
            yield pytest.param(match.group(1), id=f"{page}#{number}")


@pytest.mark.parametrize("code", list(_blocks()))
def test_docs_block_runs(code, capsys):
    exec(compile(code, "<docs>", "exec"), {"__name__": "__docs__"})
