"""Hot reload of a model: re-read the config file, re-resolve the model, then replace the workers of every rule
using it one at a time, each new worker serving (new version loaded, `init` done) before an old one stops.

`POST /models/{name}/reload` (the control process) and SIGHUP to `pipeline up` both end in `Reloader.reload`.
Workers are replaced through the fork server's control channel (pipeline.supervision.forkctl): the rule's spare
worker is forked first and loads the new version (each forked worker reads the run dir's config.json, which the
reload rewrote); once it serves, each regular worker is stopped (SIGTERM: it finishes its frame; ingress sends what
it still held again) and forked again (it loads the new version), each serving before the next one stops; then
the spare stops. "Serving" = the new process reports to the stats board. A failure before the spare serves
(config, download, checksum, import, init) leaves the old workers untouched. One reload at a time per run directory
(a file lock); the last result per model is kept in `<run dir>/reloads/<model>.json` for GET /models.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import snapshot
from pipeline.config.schema.behaviour import pool_unit, pooled_model
from pipeline.errors import PipelineError
from pipeline.models import packages
from pipeline.supervision import run_dir as rundir
from pipeline.supervision.forkctl import ForkServer, ForkServerError

if TYPE_CHECKING:  # pipeline.config.load loads pydantic; a stage gets its config from pipeline.config.snapshot
    from pipeline.config.load import Config

log = logging.getLogger("pipeline.reload")

SERVE_TIMEOUT = 120.0  # seconds a new worker may take to load its model and report in
POLL = 0.2
Workers = Callable[[], list[dict[str, Any]]]  # worker snapshots: stage, rule, model, pid, alive, sha256, loaded_at


class ReloadError(PipelineError):
    """The reload failed; the message says why."""


class Busy(PipelineError):
    """Another reload is running on this stack."""


@contextmanager
def _lock(run_dir: Path) -> Iterator[None]:
    fd = rundir.open_lock(rundir.prepare(run_dir) / rundir.RELOAD_LOCK)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy("another reload is running on this stack: try again when it is done") from None
        yield
    finally:
        os.close(fd)


def save(run_dir: Path, record: dict[str, Any]) -> None:
    """Keep the result of a reload for GET /models."""
    path = rundir.reload_record(run_dir, record["model"])
    rundir.write_private(rundir.private_folder(path.parent) / path.name, json.dumps(record, indent=1) + "\n")


def last(run_dir: Path | None, name: str) -> dict[str, Any] | None:
    """The result of the last reload of a model on this stack; None when there was none."""
    try:
        return json.loads(rundir.reload_record(run_dir, name).read_text()) if run_dir else None
    except (OSError, ValueError):
        return None


def _rules_of(cfg: Config) -> list[dict[str, Any]]:
    """The rules of a configuration as plain data, worker counts left out (they may be overridden)."""
    return [r.model_dump(exclude={"workers"}) for r in cfg.rules]


class Reloader:
    """Reloads the models of the stack running `running` (the config it started with) in `run_dir`."""

    def __init__(self, running: Config, run_dir: Path, workers: Workers) -> None:
        self.running, self.run_dir, self.workers = running, run_dir, workers

    def reload(self, name: str, trigger: str = "api", only_if_changed: bool = False) -> dict[str, Any]:
        """Reload one model; return the result, also kept for GET /models. Raise Busy while another runs."""
        record: dict[str, Any] = {"model": name, "trigger": trigger, "ok": False, "started_at": time.time()}
        with _lock(self.run_dir):
            try:
                record.update(self._reload(name, only_if_changed), ok=True)
            except PipelineError as e:
                record["error"] = f"{e}".strip()
                record["running"] = sorted(self._versions(name))  # what still serves
            record["finished_at"] = time.time()
            save(self.run_dir, record)
        if record["ok"]:
            log.info("model %s: version %s serving (%d worker(s) replaced)", name, record["version"][:12],
                     record["workers_replaced"])
        else:
            log.error("model %s: reload failed, the running version stays: %s", name, record["error"])
        return record

    def _reload(self, name: str, only_if_changed: bool) -> dict[str, Any]:
        from pipeline.config import load as config  # pydantic: loaded by the first reload, not by control's start

        cfg = config.load(self.running.source)
        rules = self._rules(cfg, name)
        spec = cfg.models[name]
        folder = packages.resolve(name, spec.source, cfg.default_data_dir(), cfg.packages.limits())
        version, before = packages.version_of(folder), self._versions(name)
        out = {"version": version, "previous": sorted(before), "source": spec.where, "rules": rules,
               "changed": before != {version}, "workers_replaced": 0}
        if only_if_changed and not out["changed"]:
            return out
        self._hand_over(cfg)
        server = ForkServer(self.run_dir)
        try:
            out["workers_replaced"] = sum(self._replace(server, rule) for rule in rules)
        except ForkServerError as e:
            raise ReloadError(str(e)) from None
        finally:
            server.close()
        return out

    def _hand_over(self, cfg: Config) -> None:
        """Rewrite the run dir's config.json with the file's models, which the new workers read (they cannot
        validate the file themselves: they run without the variables that hold secrets)."""
        if not snapshot.rewrite(self.run_dir, self.running.model_copy(update={"models": cfg.models})):
            raise ReloadError(f"the models of {cfg.source} cannot be handed to the workers in {self.run_dir}")

    def _rules(self, cfg: Config, name: str) -> list[str]:
        """The rules using the model; refuse a config whose rules changed (workers find their rule by index)."""
        if name not in cfg.models:
            raise ReloadError(f"model '{name}' is no longer defined in {cfg.source}")
        if _rules_of(cfg) != _rules_of(self.running):
            raise ReloadError(f"the rules in {cfg.source} changed since the stack started: a reload only "
                              "replaces a model's version; restart the stack to apply the new rules")
        own = {r.name: r.workers for r in self.running.rules}  # worker counts as overridden (--workers)
        rules = [r.name for r in cfg.rules if r.model == name and (own.get(r.name) or not r.shared)]
        if name in cfg.pools():
            rules.append(pool_unit(name))  # its pool's processes are replaced as a rule's workers are
        if not rules:
            raise ReloadError(f"no rule uses model '{name}'")
        return rules

    def _replace(self, server: ForkServer, rule: str) -> int:
        """Spare first, then each regular worker of the rule; return how many regular workers were replaced."""
        spare = rundir.spare_slot(rule)
        try:
            self._serving(server, server.call("start_spare", rule=rule)["pid"], spare, rule)
            workers = [w for w in server.call("list", rule=rule)["workers"] if w["index"] is not None]
            for w in workers:
                old = server.call("replace", rule=rule, index=w["index"])["pid"]
                self._serving(server, self._successor(server, w, old), w["name"], rule)
            return len(workers)
        finally:
            try:
                server.call("stop_spare", rule=rule)
            except ForkServerError as e:
                log.warning("could not stop the spare worker of rule %s: %s", rule, e)

    def _successor(self, server: ForkServer, slot: dict[str, Any], old: int) -> int:
        """The pid of the worker forked into `slot` once `old` ended (it finishes its frame first)."""
        deadline = time.monotonic() + SERVE_TIMEOUT
        while time.monotonic() < deadline:
            now = {w["name"]: w["pid"] for w in server.call("list", rule=slot["rule"])["workers"]}
            if now.get(slot["name"]) not in (None, 0, old):
                return now[slot["name"]]
            time.sleep(POLL)
        raise ReloadError(f"the worker {slot['name']} of rule {slot['rule']} was not replaced within "
                          f"{SERVE_TIMEOUT:g}s")

    def _serving(self, server: ForkServer, pid: int, name: str, rule: str) -> None:
        """Wait until the new worker `pid` serves (reports to the stats board); ReloadError when it ended first."""
        deadline = time.monotonic() + SERVE_TIMEOUT
        while time.monotonic() < deadline:
            ended = [e for e in server.call("list", rule=rule)["exits"] if e["pid"] == pid]
            if ended:
                raise ReloadError(f"the new worker {name} of rule {rule} did not start: {self._why(rule, ended[0])}")
            if any(p["pid"] == pid and _reports_for(p, rule) for p in self._live()):
                return
            time.sleep(POLL)
        raise ReloadError(f"the new worker {name} of rule {rule} did not report within {SERVE_TIMEOUT:g}s")

    def _why(self, rule: str, ended: dict[str, Any]) -> str:
        """The reason a worker left in <run dir>/fatal (removed: it was not a stage of the stack failing)."""
        fatal = rundir.fatal_file(self.run_dir, rundir.worker_program(rule))
        try:
            reason = rundir.read_fatal(fatal)[1]
            fatal.unlink()
        except (OSError, ValueError):
            reason = ""
        if ended.get("signal"):
            return reason or f"it was killed by signal {ended['signal']} (see its log)"
        return reason or f"it exited with status {ended.get('code')} (see its log)"

    def _live(self) -> list[dict[str, Any]]:
        try:
            procs = self.workers()
        except (OSError, ValueError, KeyError) as e:  # the control API restarting
            log.debug("worker snapshots unavailable: %s", e)
            return []
        return [p for p in procs if p.get("stage") == "rule" and p.get("alive") and p.get("pid")]

    def _versions(self, name: str) -> set[str]:
        return {p["sha256"] for p in self._live() if p.get("model") == name and p.get("sha256")}


def _reports_for(snap: dict[str, Any], unit: str) -> bool:
    """Whether a worker snapshot is of `unit`: a rule, or a model's pool (which reports under each rule it serves)."""
    model = pooled_model(unit)
    return snap.get("rule") == unit if model is None else snap.get("model") == model


def http_workers(cfg: Config) -> Workers:
    """Worker snapshots read from the control API's GET /models (for `pipeline up`, which has no board)."""
    from pipeline.control.hosts import local_url, pinned_context

    url = f"{local_url(cfg.control)}/models"
    context = pinned_context(cfg.control)
    token = cfg.control.token.get_secret_value() if cfg.control.token else None
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    def fetch() -> list[dict[str, Any]]:
        import urllib.request

        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5, context=context) as r:
            doc = json.loads(r.read())
        return [{"stage": "rule", **w} for m in doc["models"] for w in m.get("workers", [])]

    return fetch


def on_sighup(cfg: Config, run_dir: Path) -> threading.Thread:
    """SIGHUP to `pipeline up`: reload, in a thread, every model whose version changed."""

    def run() -> None:
        reloader = Reloader(cfg, run_dir, http_workers(cfg))
        log.info("SIGHUP: reloading the models whose version changed in %s", cfg.source)
        for name in dict.fromkeys(r.model for r in cfg.rules):  # the models in use
            try:
                result = reloader.reload(name, "sighup", only_if_changed=True)
            except Busy as e:
                log.warning("SIGHUP ignored: %s", e)
                return
            if result["ok"] and not result["changed"]:
                log.info("model %s: unchanged (version %s)", name, result["version"][:12])

    thread = threading.Thread(target=run, daemon=True, name="reload")
    thread.start()
    return thread
