"""RunScript: run a command for every committed change."""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
from collections.abc import Iterable, Sequence
from typing import Any

from dmodel.actions import Context, DAction
from dmodel.errors import ConfigurationError

from ._context import need
from ._values import redact, to_json

__all__ = ["RunScript"]

logger = logging.getLogger(__name__)

_EVENTS = ("created", "updated", "deleted")
_TAIL = 500


class RunScript(DAction):
    """Run ``command`` after each committed create, update or delete it matches.

    ``command`` is an argument list, or a string split with :func:`shlex.split`; it
    is never run through a shell. The change is passed in the environment (on top of
    this process's own): ``DMODEL_EVENT`` (``created``, ``updated`` or ``deleted``),
    ``DMODEL_OBJECT_ID``, ``DMODEL_FIELD`` (empty for ``created``),
    ``DMODEL_OLD_VALUE`` and ``DMODEL_NEW_VALUE`` (JSON; a delete's value is the old
    one), ``DMODEL_CALLER_ID`` and ``DMODEL_UPDATE_ID``. ``events`` narrows which
    events run the command.

    The command runs synchronously on the thread that applies updates, so the node
    waits for it: keep it short, or let it hand the work off. After ``timeout``
    seconds its whole process group is killed. A non-zero exit, a timeout or a
    command that cannot start is logged as a warning with the end of its stderr,
    never raised. Removes have no after-callback, so they run nothing.
    """

    def __init__(
        self,
        command: str | Sequence[str],
        timeout: float = 10,
        *,
        events: Iterable[str] = _EVENTS,
    ) -> None:
        argv = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
        if not argv:
            raise ConfigurationError("RunScript needs a non-empty command")
        if not timeout > 0:
            raise ConfigurationError(f"RunScript timeout must be positive, got {timeout!r}")
        chosen = frozenset(events)
        if not chosen <= set(_EVENTS):
            raise ConfigurationError(
                f"RunScript events must be among {_EVENTS}, got {sorted(chosen)}"
            )
        self.argv = argv
        self.timeout = timeout
        self.events = chosen

    def on_created(self, object_id: str, key: str, context: Context | None = None) -> None:
        self._run("created", object_id, "", None, None, need(context))

    def on_updated(
        self, object_id: str, field: str, old_value: Any, new_value: Any,
        context: Context | None = None,
    ) -> None:
        self._run("updated", object_id, field, old_value, new_value, need(context))

    def on_deleted(
        self, object_id: str, field: str, value: Any, context: Context | None = None
    ) -> None:
        self._run("deleted", object_id, field, value, None, need(context))

    def _run(
        self,
        event: str,
        object_id: str,
        field: str,
        old_value: Any,
        new_value: Any,
        context: Context,
    ) -> None:
        if event not in self.events:
            return
        change = {
            "DMODEL_EVENT": event,
            "DMODEL_OBJECT_ID": object_id,
            "DMODEL_FIELD": field,
            "DMODEL_OLD_VALUE": to_json(redact(old_value, context)),
            "DMODEL_NEW_VALUE": to_json(redact(new_value, context)),
            "DMODEL_CALLER_ID": context.caller_id,
            "DMODEL_UPDATE_ID": context.update_id,
        }
        # The environment cannot carry NUL; JSON already escapes it in the values.
        env = {**os.environ, **{k: v.replace("\0", "\\0") for k, v in change.items()}}
        where = f"{self.argv[0]} for {event} {object_id}{':' + field if field else ''}"
        try:
            proc = subprocess.Popen(
                self.argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except (OSError, ValueError) as exc:
            logger.warning("RunScript could not start %s: %s", where, exc)
            return
        try:
            out, err = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
            logger.warning(
                "RunScript killed %s after %ss; stderr: %s", where, self.timeout, _tail(err)
            )
            return
        if proc.returncode != 0:
            logger.warning(
                "RunScript %s exited with %s; stderr: %s", where, proc.returncode, _tail(err)
            )
        else:
            logger.debug("RunScript %s done; stdout: %s", where, _tail(out))


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    # The command may have started children that hold our pipes open; kill them too.
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except ProcessLookupError:
        pass


def _tail(data: bytes | None) -> str:
    text = (data or b"").decode("utf-8", "replace").strip()
    return text[-_TAIL:] if text else "(empty)"
