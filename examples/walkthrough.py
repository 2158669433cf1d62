"""The PyDinemic walkthrough, as one script: two hosts, each a dmodel node.

Host A and host B each run a node with its own keyring and embedded Redis, connected
over ZeroMQ on loopback when networking is available, else by handing the signed
updates from one node to the other (what the network does). Run:

    python examples/walkthrough.py
"""

from __future__ import annotations

import shutil
import sys
import tempfile

import dmodel


class Person(dmodel.DModel):
    name = dmodel.DField("name", False)
    salary = dmodel.DField("salary", True)


def sync(*nodes: dmodel.Node) -> None:
    """Hand every node's updates to every other node (the network does this by itself)."""
    for src in nodes:
        for dst in nodes:
            if src is not dst:
                for raw in src.updates_since(0):
                    dst.ingest(raw)


def main() -> int:
    home = tempfile.mkdtemp(prefix="dmodel-walkthrough-")
    host_a = dmodel.Node(f"{home}/host-a")
    host_b = dmodel.Node(f"{home}/host-b")
    try:
        print("== First script")
        p = Person([], node=host_a)
        p.name.set("Bob")
        p.salary.set("1234")
        print("A: name   =", p.name.get())
        print("A: salary =", p.salary.get())
        print("A: db_id  =", p.get_db_id())
        sync(host_a, host_b)
        q = Person(p.get_db_id(), "", node=host_b)
        print("B: name   =", q.name.get())
        try:
            q.salary.get()
            print("B: salary readable -- this is wrong")
            return 1
        except dmodel.DecryptionError as exc:
            print("B: salary -> DecryptionError:", exc)

        print("== Accessing encrypted data of another object")
        chief = Person([], node=host_b)
        print("B: chief  =", chief.get_db_id())
        sync(host_a, host_b)
        worker = Person([chief.get_db_id()], node=host_a)
        worker.name.set("Bob")
        worker.salary.set("44321")
        print("A: worker =", worker.get_db_id())
        sync(host_a, host_b)
        my_worker = Person(worker.get_db_id(), chief.get_db_id(), node=host_b)
        print("B: worker salary read as chief =", my_worker.salary.get())

        print("== Unauthorized changes")
        intruder = Person([], node=host_b)
        as_intruder = Person(worker.get_db_id(), intruder.get_db_id(), node=host_b)
        try:
            as_intruder.name.set("Mallory")
            print("B: intruder's change accepted -- this is wrong")
            return 1
        except dmodel.UnauthorizedError as exc:
            print("B: intruder's change rejected:", exc)
        print("A: worker name is still", worker.name.get())
        return 0
    finally:
        host_a.shutdown()
        host_b.shutdown()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
