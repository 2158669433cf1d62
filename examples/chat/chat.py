"""A terminal chat on dmodel: no server, every participant a peer. See README.md here.

Each participant owns one ``Member`` object: its nick and the list of what it said.
Only the member's own key can change that object, so nobody can put words in
another's mouth, and a listener prints what the others say as it arrives (or as it
is caught up, after being offline).

    python examples/chat/chat.py --home /tmp/alice --nick alice --listen tcp://127.0.0.1:7601
    python examples/chat/chat.py --home /tmp/bob --nick bob --peer tcp://127.0.0.1:7601

Type a line to say it; ``/nick NAME``, ``/who`` and ``/quit`` (or end of input) too.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import Any

import dmodel

HISTORY = 20


class Member(dmodel.DModel):
    nick = dmodel.DField()
    said = dmodel.DList()  # {"text": str, "at": seconds since the epoch}


def _stamp(at: float) -> str:
    return time.strftime("%H:%M", time.localtime(at))


class Printer(dmodel.DAction):
    """Print what the others say, when their updates are applied here."""

    def __init__(self, node: dmodel.Node, out: Any = sys.stdout) -> None:
        self.node = node
        self.out = out
        self.lock = threading.Lock()
        self.seen: set[tuple[str, str]] = set()

    def nick(self, db_id: str) -> str:
        return self.node.read(db_id, "nick", default=db_id[7:15])

    def show(self, text: str) -> None:
        with self.lock:
            print(text, file=self.out, flush=True)

    def said(self, db_id: str, element: str, item: Any) -> None:
        """Print one line once, whether it comes from history or from the network."""
        with self.lock:
            if (db_id, element) in self.seen or not isinstance(item, dict):
                return
            self.seen.add((db_id, element))
        self.show(f"[{_stamp(item.get('at', 0))}] <{self.nick(db_id)}> {item.get('text', '')}")

    def history(self, limit: int = HISTORY) -> None:
        """Print the last ``limit`` lines said by anybody known here, oldest first."""
        lines = []
        for db_id in self.node.object_ids("Member"):
            for element in self.node.store.list_range(db_id, "said"):
                name = f"said#{element.hex()}"
                item = self.node.read(db_id, name)
                if isinstance(item, dict):
                    lines.append((float(item.get("at", 0)), db_id, name, item))
        for _, db_id, name, item in sorted(lines, key=lambda x: x[0])[-limit:]:
            self.said(db_id, name, item)

    def on_updated(self, object_id: str, field: str, old_value: Any, new_value: Any,
                   context: dmodel.Context) -> None:
        if context.local:
            return  # the user saw it while typing it
        if field.startswith("said#") and old_value is None:
            self.said(object_id, field, new_value)
        elif field == "nick" and old_value is None:
            self.show(f"* {new_value} joined")
        elif field == "nick":
            self.show(f"* {old_value} is now known as {new_value}")


def me(node: dmodel.Node, nick: str) -> Member:
    """This home's member: the one it owns, created on first use."""
    owned = dmodel.object_list_owned("Member:[id]", node=node)
    if owned:
        member = Member(owned[0], node=node)
        if nick and member.nick.get() != nick:
            member.nick = nick
        return member
    member = Member([], node=node)
    member.nick = nick or "anonymous"
    return member


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", required=True, help="this participant's dmodel home")
    parser.add_argument("--nick", default="", help="name shown to the others")
    parser.add_argument("--listen", default="tcp://127.0.0.1:*",
                        help="endpoint to listen on (default %(default)s)")
    parser.add_argument("--peer", action="append", default=[], help="a peer's endpoint")
    parser.add_argument("--discovery", action="store_true", help="find peers on the LAN")
    parser.add_argument("--linger", type=float, default=0.0,
                        help="seconds to stay after the end of input (scripts, tests)")
    args = parser.parse_args(argv)

    node = dmodel.Node(args.home, listen=args.listen, peers=args.peer,
                       discovery=args.discovery)
    try:
        printer = Printer(node)
        printer.apply("Member:[id]:*", node=node)
        member = me(node, args.nick)
        print(f"* you are {member.nick.get()} ({member.db_id}); listening on "
              f"{node.network.endpoint}", flush=True)
        printer.history()
        for line in sys.stdin:
            line = line.rstrip("\n")
            if line in ("/quit", "/q"):
                break
            if line.startswith("/nick "):
                member.nick = line[6:].strip()
            elif line == "/who":
                for other in Member.all(node=node):
                    printer.show(f"* {other.nick.get()}{' (you)' if other == member else ''}")
            elif line.strip():
                member.said.append({"text": line, "at": time.time()})
        else:
            time.sleep(args.linger)
    except KeyboardInterrupt:
        pass
    finally:
        node.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
