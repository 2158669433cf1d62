"""Listeners (DAction): the PyDinemic walkthrough's three, and the ready-made ones.

Two nodes in one process; the updates of one are handed to the other the way the
network would. Run:

    python examples/listeners.py

The listener classes below take no arguments, so a peer can load them from this file:

    dmodel peer --models examples/listeners.py \\
                --listener 'examples/listeners.py:Greeter:Person:[id]' \\
                --listener 'examples/listeners.py:Guard:Person:*' --unauthorized-policy listeners
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from pathlib import Path

import dmodel
from dmodel import listeners


class Person(dmodel.DModel):
    name = dmodel.DField("name", False)
    salary = dmodel.DField("salary", True)


class Greeter(dmodel.DAction):
    """PyDinemic's ListenerPersonCreate: apply to ``Person:[id]``."""

    def on_create(self, object_id: str, key: str) -> None:
        print(f"  Greeter: Hey! New object was created. Its ID is: {object_id}")


class ChangeReporter(dmodel.DAction):
    """PyDinemic's ListenerPersonUpdated: apply to ``Person:[id]:*``."""

    def on_authorized_updated(self, object_id: str, field: str, old_value: object,
                              new_value: object) -> None:
        print(f"  ChangeReporter: somebody changed {field} of {object_id} "
              f"from {old_value!r} to {new_value!r}")


class Guard(dmodel.DAction):
    """PyDinemic's ListenerPersonPreventUnauthorized: apply to ``Person:*``.

    It matters on nodes (or models) whose policy is ``listeners``; with the default
    policy, ``reject``, the node refuses unauthorized updates by itself.
    """

    def on_unauthorized_update(self, object_id: str, field: str, old_value: object,
                               new_value: object) -> None:
        print("  Guard: Ops! Somebody wanted to make an unauthorized change")
        raise PermissionError(f"Update of field {field} was blocked")


def ship(src: dmodel.Node, dst: dmodel.Node) -> None:
    """Hand every update of ``src`` to ``dst`` (what the network does)."""
    for raw in src.updates_since(0):
        dst.ingest(raw)


def main() -> int:
    logging.basicConfig(stream=sys.stdout, format="  %(name)s: %(message)s",
                        level=logging.WARNING)
    logging.getLogger("dmodel.listeners.log").setLevel(logging.INFO)
    home = Path(tempfile.mkdtemp(prefix="dmodel-listeners-"))
    # Host A is careless: it lets listeners judge unauthorized updates and has none.
    # Host B runs PyDinemic's policy too, but with the Guard.
    host_a = dmodel.Node(home / "a", listen="", peers=[], discovery=False,
                         unauthorized_policy="listeners")
    host_b = dmodel.Node(home / "b", listen="", peers=[], discovery=False,
                         unauthorized_policy="listeners")
    audit_path = home / "audit.jsonl"
    try:
        # Applied first, so it records every attempt, also those the Guard vetoes.
        listeners.AuditLog(audit_path, values=False).apply("*", node=host_b)
        Greeter().apply("Person:[id]", node=host_b)
        ChangeReporter().apply("Person:[id]:*", node=host_b)
        Guard().apply("Person:*", node=host_b)
        listeners.LogChanges().apply("Person:*", node=host_b)

        print("== A creates Bob; B's listeners hear about it")
        bob = Person([], node=host_a)
        bob.name = "Bob"
        bob.salary = "1234"
        ship(host_a, host_b)

        print("== An intruder on A renames Bob; A takes it, B's Guard refuses it")
        intruder = Person([], node=host_a)
        Person(bob.db_id, intruder.db_id, node=host_a).name = "Mallory"
        ship(host_a, host_b)
        on_a = host_a.read(bob.db_id, "name")
        on_b = host_b.read(bob.db_id, "name")
        print(f"  name on A: {on_a!r}; on B: {on_b!r}; "
              f"B's rejected: {dict(host_b.stats.rejected)}")

        print("== ReadOnlyFields: on A, a name once set stays (even for its owner)")
        listeners.ReadOnlyFields("name").apply("Person:[id]:*", node=host_a)
        carol = Person([], node=host_a)
        carol.name = "Carol"
        try:
            carol.name = "Caroline"
        except dmodel.VetoedError as exc:
            print(f"  VetoedError: {exc}")

        print(f"== The audit log of B ({audit_path.name}), one JSON line per change")
        for line in audit_path.read_text().splitlines()[:4]:
            print(f"  {line[:110]}...")
        ok = on_a == "Mallory" and on_b == "Bob" and carol.name.get() == "Carol"
        return 0 if ok else 1
    finally:
        host_a.shutdown()
        host_b.shutdown()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
