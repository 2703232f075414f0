"""Test-session settings shared by the doctests (lightningkd/, datamodules/) and tests/."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def scratch_tempdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Send every ``tempfile`` folder (doctests, notebooks, subprocesses) into pytest's own base folder.

    Notebooks and doctests make folders with ``tempfile.mkdtemp`` that nobody deletes; left in /tmp they
    add up run after run. Under pytest's base folder they go with it: removed when the session passes
    (``tmp_path_retention_policy = "failed"``), kept for inspection when a test failed.
    """
    scratch = tmp_path_factory.mktemp("tempfile")
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(scratch)  # child processes: notebook kernels, spawned workers
    tempfile.tempdir = None  # re-read TMPDIR on the next call
    yield
    if before is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before
    tempfile.tempdir = None
