"""The run directory: a stack's supervisord files, ipc sockets, the fork server's control socket, `config.json`,
`fatal/` reasons and reload records.

Invariants, held by every process of the stack:
- the directory is a real directory (not a symbolic link) owned by this user, writable by no one else, and
  mode 0700 once `prepare` returned: no other local user can plant a file, a link or a socket in it;
- the default lives in `$XDG_RUNTIME_DIR` when that is a private directory of this user, else in a per-user
  0700 directory under the system's temporary directory, never at a name another user can take first;
- every file the stack writes there is written to a fresh name opened with O_CREAT|O_EXCL|O_NOFOLLOW and
  mode 0600, then renamed over its target (`write_private`); the lock file is opened with O_NOFOLLOW.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import StartupError

if TYPE_CHECKING:
    from pipeline.config.schema.behaviour import ConfigMixin

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


def default(instance: str) -> Path:
    """Where a stack named `instance` keeps its run directory when the config and command line say nothing."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime) and _is_private(Path(runtime)):
        return Path(runtime) / f"pipeline-{instance}"
    return Path(tempfile.gettempdir()) / f"pipeline-{os.geteuid()}" / instance


def chosen(given: str | None, cfg: ConfigMixin) -> Path:
    """The run directory of a command: `--run-dir` made absolute, else the configuration's default."""
    return Path(given).resolve() if given else cfg.default_run_dir()


def prepare(path: Path) -> Path:
    """Create the run directory (0700), or check the one that is there; StartupError naming it when another
    user owns it or may write in it. A per-user parent made by `default` is checked the same way."""
    if path.parent.name == f"pipeline-{os.geteuid()}" and path.parent.parent == Path(tempfile.gettempdir()):
        _claim(path.parent)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    _claim(path)
    return path


def _claim(path: Path) -> None:
    try:
        os.mkdir(path, PRIVATE_DIR)
    except FileExistsError:
        pass
    except OSError as e:
        raise StartupError(f"run directory {path}: cannot create it: {e.strerror}") from None
    st = os.lstat(path)
    problem = _unsafe(st)
    if problem:
        raise StartupError(f"run directory {path}: refused: {problem}; remove it or pass another --run-dir "
                           "(or run_dir: in the config)")
    if stat.S_IMODE(st.st_mode) != PRIVATE_DIR:
        os.chmod(path, PRIVATE_DIR)  # ours and not writable by others: only others' reading is taken away


def _unsafe(st: os.stat_result) -> str:
    """Why a directory with this lstat cannot hold a stack's files, or ''."""
    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    if st.st_uid != os.geteuid():
        return f"it belongs to {_user(st.st_uid)}, not to {_user(os.geteuid())} who runs the stack"
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        return f"group or others may write in it (mode {mode:04o})"
    return ""


def _is_private(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return not _unsafe(st) and not stat.S_IMODE(st.st_mode) & 0o077


def _user(uid: int) -> str:
    import pwd

    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def write_private(path: Path, data: str | bytes) -> None:
    """Replace `path` with `data`, mode 0600: written to a fresh name (O_EXCL|O_NOFOLLOW) renamed over it, so a
    reader sees the old or the new file whole and a link planted at either name is never followed."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, PRIVATE_FILE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def open_lock(path: Path) -> int:
    """A file descriptor on the lock file `path` (created 0600; a symbolic link there is refused: ELOOP)."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE)


def private_folder(path: Path) -> Path:
    """`path` made as a 0700 folder inside the run directory (kept when it is there)."""
    path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    return path


# The layout: every name in the run directory and every supervisord program name, spelled here only.
CONFIG_FILE = "config.json"  # the validated configuration the stages read (pipeline.config.snapshot)
SUPERVISORD_CONF = "supervisord.conf"
SUPERVISORD_LOG = "supervisord.log"
SUPERVISORD_PID = "supervisord.pid"
SUPERVISOR_SOCKET = "supervisor.sock"
FORKSERVER_SOCKET = "forkserver.sock"  # the fork server's control channel (pipeline.supervision.forkctl), mode 0600
FORKSERVER_PROGRAM = "forkserver"  # the supervisord program that forks every local worker
RELOAD_LOCK = "reload.lock"
FATAL = "fatal"  # <program>.txt: "<exit code>\n<reason>" left by a stage before a fatal exit
RELOADS = "reloads"  # <model>.json: the last reload of each model
TAPS = "taps"  # <rule>.json: a recording asked for (control writes it); <rule>.status.json: the tap's (ingress)
CAPTURES = "captures"  # <rule>-<id>.mpk: what a tap recorded (pipeline.rollout.capture)
CANARIES = "canaries"  # <rule>.json: the verdict on a rule's canary in this run (pipeline.trials)


def worker_program(rule: str) -> str:
    """The name a rule's workers go by: their fatal reason file, and the root of their slot names."""
    return f"rule-{rule}"


def worker_slot(rule: str, index: int) -> str:
    """The name of the fork server's worker slot `index` of a rule (logs, control channel, reload errors)."""
    return f"{worker_program(rule)}-{index}"


def spare_slot(rule: str) -> str:
    """The name of a rule's spare worker: forked only by a hot reload (see pipeline.supervision.reload)."""
    return f"spare-{rule}"  # not rule-<name>-spare: a rule may be named "<name>-spare"


def fatal_file(run_dir: Path, program: str) -> Path:
    """Where `program` leaves the reason of its fatal exit for `pipeline up` and reloads."""
    return run_dir / FATAL / f"{program}.txt"


def leave_fatal(run_dir: Path, program: str, exit_code: int, reason: str) -> None:
    """Write the fatal reason file of `program` (private, replaced whole)."""
    path = fatal_file(run_dir, program)
    private_folder(path.parent)
    write_private(path, f"{exit_code}\n{reason}")


def read_object(path: Path) -> dict[str, Any] | None:
    """The JSON object a file of the run directory holds; None when it is missing, unreadable, not JSON, nested too
    deep for the parser, or not an object (another process wrote it: nothing in it is trusted)."""
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def read_fatal(path: Path) -> tuple[int, str]:
    """(exit code, reason) of a fatal reason file; OSError when there is none, ValueError when it is garbled."""
    code, _, reason = path.read_text().partition("\n")
    return int(code), reason.strip()


def clear_fatal(run_dir: Path) -> None:
    """Remove the reasons a previous run left."""
    for old in private_folder(run_dir / FATAL).iterdir():
        old.unlink()


def canary_verdict(run_dir: Path, rule: str) -> Path:
    """The verdict on the canary of `rule` (rolled back, promoted, ended), once egress reached one."""
    return run_dir / CANARIES / f"{rule}.json"


def reload_record(run_dir: Path, model: str) -> Path:
    """The record of the last reload of `model`."""
    return run_dir / RELOADS / f"{model}.json"


def tap_request(run_dir: Path, rule: str) -> Path:
    """Where control asks ingress to record `rule` (present: record; removed: stop)."""
    return run_dir / TAPS / f"{rule}.json"


def tap_status(run_dir: Path, rule: str) -> Path:
    """Where ingress says how the last recording of `rule` goes or ended."""
    return run_dir / TAPS / f"{rule}.status.json"


def capture_file(run_dir: Path, rule: str, request_id: str) -> Path:
    """The capture a tap of `rule` writes for the request `request_id`."""
    return run_dir / CAPTURES / f"{rule}-{request_id}.mpk"
