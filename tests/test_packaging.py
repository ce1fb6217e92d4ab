"""pyproject.toml: the license is an SPDX expression (PEP 639), and the build backend it asks for reads it."""

import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_license_is_an_spdx_string_that_the_required_setuptools_reads():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from packaging.requirements import Requirement

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert data["project"]["license"] == "Apache-2.0"  # a TOML table is deprecated by setuptools 77
    (setuptools,) = [Requirement(r) for r in data["build-system"]["requires"] if Requirement(r).name == "setuptools"]
    # setuptools reads a string license from 77.0 on (77.0.3: clear errors with older packaging); 76 refuses it
    assert not setuptools.specifier.contains("76.1.0") and setuptools.specifier.contains("77.0.3")
