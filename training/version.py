"""The installed package's version, read from its metadata (pyproject.toml is the one source).

Written into run.json (``producer``) and every export's metadata (``swat.version``).
"""
from __future__ import annotations

from importlib import metadata

__all__ = ["SWAT_VERSION"]


def _installed_version() -> str:
    try:
        return metadata.version("swat")
    except metadata.PackageNotFoundError:  # a source tree used without `pip install -e .`
        return "0+unknown"


SWAT_VERSION = _installed_version()
