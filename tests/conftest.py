"""Fixtures every test package shares."""

import os

import pytest


@pytest.fixture(scope="session")
def data_dir():
    d = os.environ.get("TANBR_DATA_DIR")
    assert d, "set TANBR_DATA_DIR to the GLUE copy (e.g. ../shared/data/glue)"
    return d
