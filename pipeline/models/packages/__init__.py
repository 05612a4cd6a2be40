"""Model sources: download, verify, cache and safely unpack model packages.

    resolve(name, ModelSource(url=..., md5=...), data_dir, Limits(), progress) -> folder holding index.py
    fetch_all({name: ModelSource}, data_dir, ...) -> {name: folder or ModelLoadError}
    version_of(folder) -> the sha256 workers report: of the archive it came from, else of the folder's files

`sources` defines ModelSource and Limits, `download` fetches one archive over HTTP(S), `archive` unpacks one
without trusting it, `cache` ties them together in `<data dir>/models/<name>/<sha256>/`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.models.packages.archive import model_root, unpack
    from pipeline.models.packages.cache import RECORD, fetch_all, resolve, source_info, version_of
    from pipeline.models.packages.download import download
    from pipeline.models.packages.sources import (
        Limits,
        ModelSource,
        check_integrity,
        choose_url,
        machine_arch,
        parse_md5,
        parse_sha256,
        redact,
        uncovered,
    )

# Loaded on first use: the configuration needs only `sources`, and download/cache/archive pull in
# urllib.request, http.client, ssl, tarfile, zipfile... (in every stage that never downloads).
_WHERE = {"model_root": "archive", "unpack": "archive", "RECORD": "cache", "fetch_all": "cache", "resolve": "cache",
          "source_info": "cache", "version_of": "cache", "download": "download", "Limits": "sources",
          "ModelSource": "sources", "check_integrity": "sources", "choose_url": "sources", "machine_arch": "sources",
          "parse_md5": "sources", "parse_sha256": "sources", "redact": "sources", "uncovered": "sources"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


__all__ = [
    "RECORD",
    "Limits",
    "ModelSource",
    "check_integrity",
    "choose_url",
    "download",
    "fetch_all",
    "machine_arch",
    "model_root",
    "parse_md5",
    "parse_sha256",
    "redact",
    "resolve",
    "source_info",
    "uncovered",
    "unpack",
    "version_of",
]
