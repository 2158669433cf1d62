"""Driver for test_durability: open a node in a home and write until killed.

    python writer.py HOME

Prints ``ready <db_id>`` once, then the number of every completed write (each a signed
update committed to the store) on its own line, flushed, so the parent knows what was
acknowledged before it sends SIGKILL.
"""

from __future__ import annotations

import sys

import dmodel


class Person(dmodel.DModel):
    name = dmodel.DField("name", False)
    salary = dmodel.DField("salary", True)
    tags = dmodel.DDict()


def main(home: str) -> None:
    node = dmodel.Node(home)
    p = Person.create(name="w0", salary=0, node=node)
    print("ready", p.db_id, flush=True)
    i = 0
    while True:
        i += 1
        if i % 3 == 0:
            with p.transaction():
                p.name = f"w{i}"
                p.salary = i
                p.tags[f"k{i % 20}"] = i
        elif i % 7 == 0:
            Person.create(name=f"child{i}", authorized=[p.db_id], node=node)
        else:
            p.name = f"w{i}"
        print(i, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
