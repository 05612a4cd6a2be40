"""The one client of supervisord's XML-RPC interface, on the unix socket of a run directory.

xmlrpc.client and supervisor.xmlrpc load with the first client: the control process needs them only during a
reload. A failed request leaves the connection unusable: it is closed, and the next request opens a new one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.supervision import run_dir as rundir


class SupervisorError(PipelineError):
    """supervisord refused a call or did not answer; the message says which call and why."""


class Supervisor:
    """supervisord of the stack in `run_dir`. Owns one XML-RPC connection to its socket."""

    def __init__(self, run_dir: Path) -> None:
        import xmlrpc.client

        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(None, None, serverurl=f"unix://{run_dir / rundir.SUPERVISOR_SOCKET}")
        self.proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def call(self, method: str, *args: Any) -> Any:
        """Call supervisor.<method>; starting a started or stopping a stopped process is not an error.
        SupervisorError when supervisord refuses or does not answer."""
        import http.client
        import xmlrpc.client

        from supervisor.xmlrpc import Faults

        try:
            return getattr(self.proxy.supervisor, method)(*args)
        except xmlrpc.client.Fault as e:
            if e.faultCode in (Faults.ALREADY_STARTED, Faults.NOT_RUNNING):
                return None
            raise SupervisorError(f"supervisord refused {method} {args[0] if args else ''}: {e.faultString}") from None
        except (OSError, http.client.HTTPException, xmlrpc.client.Error) as e:
            self.proxy("transport").close()
            raise SupervisorError(f"supervisord did not answer {method}: {e}") from None

    def alive(self) -> bool:
        """True when a supervisord answers on this run directory's socket, running or still stopping."""
        try:
            return bool(self.call("getState")["statename"])
        except SupervisorError:
            return False

    def processes(self) -> list[dict[str, Any]]:
        """Every process supervisord knows; [] while it does not answer (still starting)."""
        try:
            return self.call("getAllProcessInfo")
        except SupervisorError:
            return []

    def members(self, group: str) -> list[str]:
        """`group:name` of every process of a program group."""
        return [f"{p['group']}:{p['name']}" for p in self.call("getAllProcessInfo") if p["group"] == group]
