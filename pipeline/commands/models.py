"""`pipeline convert OLD.yaml` and `pipeline models fetch -c FILE`; `fetch` also serves `pipeline check --fetch`,
`prefetch` serves `pipeline up` (every model once, before supervisord starts N workers that would download it
in parallel)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from pipeline import errors
from pipeline.errors import ConfigError, ModelLoadError
from pipeline.models import packages

if TYPE_CHECKING:  # config.load, config.pyboot (pydantic) and yaml: only in the commands that read a file
    from pipeline.config.load import Config, Loaded
    from pipeline.config.pyboot import Conversion

def add_commands(sub: argparse._SubParsersAction) -> None:
    text = "print the native configuration equivalent to an old runtime's (pyboot, versions 1 to 3) one"
    convert = sub.add_parser("convert", help=text, description=text)
    convert.add_argument("old_config", help="the old YAML configuration file")
    convert.set_defaults(func=cmd_convert)
    text = "model packages: download, verify and cache"
    models = sub.add_parser("models", help=text, description=text)
    actions = models.add_subparsers(dest="models_command", required=True)
    text = "download and verify every model of a configuration (into the cache), without starting anything"
    fetch_cmd = actions.add_parser("fetch", help=text, description=text)
    fetch_cmd.add_argument("-c", "--config", required=True, help="the YAML configuration file")
    fetch_cmd.set_defaults(func=cmd_fetch)


def cmd_convert(args: argparse.Namespace) -> int:
    import yaml

    from pipeline.config import load as config
    from pipeline.config import pyboot

    source = Path(args.old_config).resolve()
    try:
        raw = config.read_yaml(source)
        if not pyboot.is_pyboot(raw):
            raise ConfigError(source, ["not an old-format (pyboot) configuration: it has no mqtts: list, or it has "
                                       "brokers: (a native configuration needs no conversion)"])
        loaded = config.load_file(source)  # the whole file, as `check` validates it
    except ConfigError as e:
        print(e, file=sys.stderr)
        return e.exit_code
    conversion = loaded.conversion
    assert conversion is not None  # is_pyboot said so
    # the stack keeps its name: the same MQTT client ids (ingress's persistent session), run and data directory
    native = {"name": loaded.config.instance, **conversion.native}
    notes = pyboot_notes(conversion)
    text = yaml.safe_dump(native, sort_keys=False, allow_unicode=True, width=120, default_flow_style=None)
    if "${" in yaml.safe_dump({k: v for k, v in conversion.native.items() if k not in pyboot.NATIVE}):
        notes.append("warning: a converted value holds ${...}: a native configuration expands it from the "
                     "environment, the old runtime did not")
    for line in notes:
        print(f"pipeline: {line}", file=sys.stderr)
    print(f"# converted by `pipeline convert` from {source}")
    print("".join(f"# {line}\n" for line in notes), end="")
    print(text, end="")
    return errors.OK


def pyboot_notes(conversion: Conversion) -> list[str]:
    """What `check`, `convert` and `up` say of an old-format file: its version, what was ignored, and a
    warning wherever it behaves differently than under the old runtime."""
    out = [f"old runtime format, version {conversion.version}: converted (README: the old runtime's "
           "configuration files)"]
    if conversion.ignored:
        out.append(f"ignored: {', '.join(conversion.ignored)}")
    out += [f"warning: {w}" for w in conversion.warnings]
    return out


def notes(loaded: Loaded) -> list[str]:
    """What `check` and `up` print of a file: `pyboot_notes` of an old-format one, else `model_notes`."""
    return pyboot_notes(loaded.conversion) if loaded.conversion else model_notes(loaded.config)


def model_notes(cfg: Config) -> list[str]:
    """What `check` and `up` say of a native file's model sources: where integrity rests on md5 alone, where
    `insecure` lets a model in unchecked, and a checksum mapping this machine would refuse (no entry for it)."""
    out = []
    for name, spec in cfg.models.items():
        source, at = spec.source, f"models.{name}"
        if source.path is not None:
            continue
        if source.md5 and not source.sha256:
            out.append(f"warning: {at}.md5: md5 is weak (archives with the same MD5 can be made): give sha256")
        plain = [u for u in [source.url, *(source.urls or {}).values()] if u and urlsplit(u).scheme == "http"]
        allowed = (["plain http"] if plain else []) + ([] if source.sha256 or source.md5 else ["no checksum"])
        if source.insecure and allowed:
            out.append(f"warning: {at}.insecure: the model is fetched with {' and '.join(allowed)}: anyone on the "
                       "way or on the server can change what runs")
        out += [f"warning: {at}.{key}: no entry for this machine ({packages.machine_arch() or 'unknown'}): fetching "
                f"the model here is refused{' unless insecure' if not source.insecure else ''}"
                for key in packages.uncovered(source)]
    return out


def cmd_fetch(args: argparse.Namespace) -> int:
    from pipeline.config import load as config

    try:
        cfg = config.load(args.config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return e.exit_code
    return fetch(cfg)


def fetch(cfg: Config, progress: bool = True) -> int:
    """Download (or find in the cache) and verify every model; one line each; OK, or MODEL_LOAD_ERROR naming
    each failure (model, url, expected and actual digest) on stderr."""
    data_dir = cfg.default_data_dir()
    print(f"models ({data_dir / 'models'}):")
    sources = {name: spec.source for name, spec in cfg.models.items()}
    results = packages.fetch_all(sources, data_dir, cfg.packages.limits(), progress)
    failed = []
    for name, got in results.items():
        if isinstance(got, ModelLoadError):
            failed.append(got)
            print(f"  {name:<16} FAILED  {cfg.models[name].where}")
        else:
            print(f"  {name:<16} OK      sha256 {packages.version_of(got)[:12]}  {got}")
    for e in failed:
        print(f"pipeline: {e}", file=sys.stderr)
    return errors.MODEL_LOAD_ERROR if failed else errors.OK


def prefetch(cfg: Config) -> None:
    """Resolve every model a rule uses (downloads show a progress bar on a terminal); raise ModelLoadError
    naming each failure."""
    used = dict.fromkeys(r.model for r in cfg.rules)
    sources = {name: cfg.models[name].source for name in used}
    results = packages.fetch_all(sources, cfg.default_data_dir(), cfg.packages.limits(), progress=True)
    failed = [str(e) for e in results.values() if isinstance(e, ModelLoadError)]
    if failed:
        raise ModelLoadError("\n".join(failed))
