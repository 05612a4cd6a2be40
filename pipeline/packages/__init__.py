"""Model sources: download, verify, cache and safely unpack model packages.

    resolve(name, ModelSource(url=..., md5=...), data_dir, Limits(), progress) -> folder holding index.py
    fetch_all({name: ModelSource}, data_dir, ...) -> {name: folder or ModelLoadError}

`sources` defines ModelSource and Limits, `download` fetches one archive over HTTP(S), `archive` unpacks one
without trusting it, `cache` ties them together in `<data dir>/models/<name>/<sha256>/`.
"""

from pipeline.packages.archive import model_root, unpack
from pipeline.packages.cache import RECORD, fetch_all, resolve, source_info
from pipeline.packages.download import download
from pipeline.packages.sources import (
    Limits,
    ModelSource,
    choose_url,
    machine_arch,
    parse_md5,
    parse_sha256,
    redact,
)

__all__ = [
    "RECORD",
    "Limits",
    "ModelSource",
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
    "unpack",
]
