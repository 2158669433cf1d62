"""Ready-made DAction listeners, installed as ``dmodel.listeners``.

    from dmodel.listeners import RejectUnauthorized, AuditLog
    RejectUnauthorized().apply("Person:*")
    AuditLog("audit.jsonl").apply("*")

* :class:`RejectUnauthorized`: veto unauthorized updates, deletes and removes.
* :class:`ReadOnlyFields`: veto changes to fields that already hold a value.
* :class:`AuditLog`: JSON lines to a 0600 file or a Redis stream.
* :class:`RunScript`: run a command, with the change in its environment.
* :class:`LogChanges`: a readable log line per change.
"""

from dmodel.listeners.audit import AuditLog
from dmodel.listeners.log import LogChanges
from dmodel.listeners.script import RunScript
from dmodel.listeners.security import ReadOnlyFields, RejectUnauthorized

__all__ = ["AuditLog", "LogChanges", "ReadOnlyFields", "RejectUnauthorized", "RunScript"]
