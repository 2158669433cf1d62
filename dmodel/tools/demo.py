"""``dmodel demo``: the PyDinemic story told by three peers in three processes.

Each host is ``python -m dmodel peer --stdin-commands`` with its own home (keyring and
embedded Redis), listening on 127.0.0.1 and connected to the others by explicit
``--peer`` endpoints (no discovery). The demo drives them with the JSON-lines protocol
of :mod:`dmodel.tools.peer` and checks every step: it returns 1 as soon as one step
does not behave as narrated, so it doubles as an end-to-end smoke test.

Every child is cleaned up through its handle (quit, then terminate, then kill), and
every wait is a bounded loop.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError, DemoFailure, ToolError
from ..model import DField, DModel
from .driver import PeerProcess, peer_argv

BREAKABLE = ("chief", "intruder", "listener", "catchup")


class Person(DModel):
    """The demo's model (the PyDinemic walkthrough's, plus a counter)."""

    name = DField("name", False)
    salary = DField("salary", True)
    visits = DField(type=int)


# ------------------------------------------------------------------ child peers


MODELS = "dmodel.tools.demo:Person"


def start_host(name: str, home: Path, *, peers: Sequence[str] = (),
               options: Sequence[str] = (), timeout: float = 30.0,
               listen: str = "tcp://127.0.0.1:*", prefix: Sequence[str] = ()) -> PeerProcess:
    """Start one demo host, ``dmodel peer --stdin-commands`` with this module's Person,
    and read its endpoint. ``prefix`` goes before the command (``ip netns exec ...``).
    """
    argv = peer_argv(home, name=name, listen=listen, peers=peers, models=[MODELS],
                     options=["--sync-page-size", "100", *options], prefix=prefix,
                     log_level="info")
    return PeerProcess(argv, name=name, home=home, timeout=timeout)


# ------------------------------------------------------------------ the story


def _wait_for(predicate: Callable[[], Any], timeout: float, what: str,
              interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise DemoFailure(f"{what}: not seen within {timeout:g} s")
        time.sleep(interval)


class _Story:
    """The steps of the demo, narrated on a rich console."""

    def __init__(self, console: Any, root: Path, updates: int, timeout: float,
                 break_step: str | None) -> None:
        self.out = console
        self.root = root
        self.updates = updates
        self.timeout = timeout
        self.broken = break_step
        self.hosts: dict[str, PeerProcess] = {}
        self.node_ids: dict[str, str] = {}
        self.step_no = 0
        self.current = ""

    # --------------------------------------------------------------- output
    def step(self, title: str) -> None:
        self.step_no += 1
        self.current = title
        self.out.print(f"\n[bold cyan]Step {self.step_no}[/]  [bold]{title}[/]")

    def say(self, text: str) -> None:
        self.out.print(f"  {text}")

    def good(self, text: str) -> None:
        self.out.print(f"  [green]✓[/] {text}")

    def start(self, name: str, *, peers: Sequence[str] = (), options: Sequence[str] = (),
              note: str = "") -> PeerProcess:
        host = start_host(name, self.root / f"host-{name.lower()}", peers=peers,
                          options=options, timeout=self.timeout)
        self.hosts[name] = host
        self.node_ids[name] = host.ok("ping")["node_id"]
        self.say(f"host {name}  {host.endpoint}  pid {host.pid}{note}")
        return host

    # --------------------------------------------------------------- checks
    def get(self, host: PeerProcess, db_id: str, field: str, caller: str | None = None
            ) -> dict[str, Any]:
        args: dict[str, Any] = {"db_id": db_id, "field": field}
        if caller is not None:
            args["caller"] = caller
        return host.call("get", **args)

    def arrive(self, host: PeerProcess, db_id: str, field: str | None = None,
               **extra: Any) -> float:
        """Wait until ``db_id`` (and ``field``) reached ``host``; returns seconds waited."""
        args: dict[str, Any] = {"db_id": db_id, "timeout": self.timeout, **extra}
        if field is not None:
            args["field"] = field
        answer = host.call("wait", reply_timeout=self.timeout + 10, **args)
        if not answer.get("ok"):
            raise DemoFailure(f"host {host.name}: {answer.get('message')}")
        return float(answer["waited"])

    # ---------------------------------------------------------------- steps
    def run(self) -> None:
        self.step("Hosts A and B start")
        a_opts = ["--listener", "dmodel.listeners.LogChanges:Person:*"]
        if self.broken == "listener":
            a_opts = []
        if self.broken == "intruder":
            a_opts += ["--unauthorized-policy", "listeners"]
        a = self.start("A", options=a_opts,
                       note="  (listener LogChanges on Person:*)" if a_opts else "")
        b = self.start("B", peers=[a.endpoint], options=["--unauthorized-policy", "listeners"],
                       note="  (lets listeners judge unauthorized updates, and has none)")
        t0 = time.monotonic()
        for host, other in ((a, b), (b, a)):
            if not host.ok("wait_peers", n=1, timeout=self.timeout,
                           reply_timeout=self.timeout + 10)["ready"]:
                raise DemoFailure(f"host {host.name} does not see host {other.name}")
        self.good(f"A and B see each other ({time.monotonic() - t0:.2f} s)")

        self.step("A creates a Person: name in clear, salary encrypted")
        bob = a.ok("create", model="Person", fields={"name": "Bob", "salary": "1234"})["db_id"]
        self.say(f"A: p = Person([]); p.name.set('Bob'); p.salary.set('1234')  -> {bob}")
        name, salary = self.get(a, bob, "name"), self.get(a, bob, "salary")
        if name.get("value") != "Bob" or salary.get("value") != "1234":
            raise DemoFailure(f"A reads back {name} / {salary}")
        self.good("A reads name 'Bob' and salary '1234' (it owns the keys)")

        self.step("B reads the same object")
        waited = self.arrive(b, bob, "salary")
        name = self.get(b, bob, "name", caller="")
        if name.get("value") != "Bob":
            raise DemoFailure(f"B reads name {name}")
        self.good(f"B: Person('{bob}', '').name.get() -> 'Bob' (arrived in {waited:.2f} s)")
        salary = self.get(b, bob, "salary", caller="")
        if salary.get("ok") or salary.get("error") != "DecryptionError":
            raise DemoFailure(f"B could read the salary: {salary}")
        self.good(f"B: salary -> DecryptionError: {salary['message']}")

        self.step("A chief on B is authorized to read a worker's salary")
        chief = b.ok("create", model="Person", fields={"name": "Chief"})["db_id"]
        self.say(f"B: chief = Person([])  -> {chief}")
        self.arrive(a, chief)
        authorized = [] if self.broken == "chief" else [chief]
        worker = a.ok("create", model="Person", authorized=authorized,
                      fields={"name": "Bob", "salary": "44321"})["db_id"]
        self.say(f"A: worker = Person(['{chief}']); name 'Bob', salary '44321'  -> {worker}")
        self.arrive(b, worker, "salary")
        salary = self.get(b, worker, "salary", caller=chief)
        if salary.get("value") != "44321":
            raise DemoFailure(f"the chief cannot read the worker's salary on B: "
                              f"{salary.get('error')}: {salary.get('message')}")
        self.good("B: Person(worker_id, chief_id).salary.get() -> '44321'")

        self.step("An intruder on B changes the worker's name")
        intruder = b.ok("create", model="Person", fields={"name": "Mallory"})["db_id"]
        self.arrive(a, intruder)
        before = a.stats()["rejected_total"]
        b.ok("set", db_id=worker, field="name", value="Mallory", caller=intruder)
        self.say(f"B: Person(worker_id, '{intruder}').name.set('Mallory')")
        on_b = self.get(b, worker, "name")
        self.say(f"B took it (it has no listener to refuse it): name on B -> "
                 f"{on_b.get('value')!r}")

        def judged() -> dict[str, Any] | None:
            stats = a.stats()
            now = self.get(a, worker, "name").get("value")
            if stats["rejected_total"] > before or now != "Bob":
                return {"rejected": stats["rejected_total"], "name": now,
                        "why": stats["rejected"]}
            return None

        verdict = _wait_for(judged, self.timeout, "A judging the intruder's update")
        if verdict["name"] != "Bob":
            raise DemoFailure(f"A accepted the intruder's change: name on A is "
                              f"{verdict['name']!r}")
        self.good(f"A rejected it as unauthorized (A's rejected count {before} -> "
                  f"{verdict['rejected']}); name on A -> 'Bob'")

        self.step("A listener reports changes")
        b.ok("set", db_id=worker, field="salary", value="50000", caller=chief)
        self.say("B: Person(worker_id, chief_id).salary.set('50000')  (authorized)")
        # Matched on who changed what, not on values: LogChanges may redact encrypted ones.
        marker, signer = f"{worker}.salary updated", f"by {chief} (authorized"

        def reported() -> str | None:
            for line in a.stderr_lines():
                if marker in line and signer in line and "dmodel.listeners.log" in line:
                    return line.partition("dmodel.listeners.log: ")[2]
            return None

        line = _wait_for(reported, self.timeout, "A's LogChanges line for the salary")
        self.good(f"A's LogChanges listener: {line}")

        self.step("Host C joins late and catches up")
        a.ok("fill", db_id=worker, field="visits", count=self.updates,
             reply_timeout=self.timeout + 60)
        self.say(f"A: {self.updates} more updates while C is offline (the worker's visits)")
        total = a.stats()["log_length"]
        c_peers = [] if self.broken == "catchup" else [a.endpoint, b.endpoint]
        c = self.start("C", peers=c_peers,
                       options=["--unauthorized-policy", "listeners", "--listener",
                                "dmodel.listeners.RejectUnauthorized:Person:*"],
                       note="  (listener RejectUnauthorized on Person:*)")
        self.catch_up(c, a, total)
        # The last visits update chains to ones retention pruned everywhere: C decides it
        # once its peers have answered without those links, just after the log pull.
        _wait_for(lambda: self.get(c, worker, "visits").get("value") == self.updates,
                  self.timeout, "C's copy of the last visits value")
        checks = [(self.get(c, worker, "name").get("value"), "Bob", "name"),
                  (self.get(c, worker, "visits").get("value"), self.updates, "visits")]
        for got, want, field in checks:
            if got != want:
                raise DemoFailure(f"C reads {field} {got!r}, expected {want!r}")
        salary = self.get(c, worker, "salary", caller="")
        if salary.get("error") != "DecryptionError":
            raise DemoFailure(f"C could read the salary: {salary}")
        self.good(f"C: name -> 'Bob', visits -> {self.updates}, salary -> DecryptionError")
        vetoed = _wait_for(lambda: c.stats()["rejected"].get("VetoedError", 0),
                           self.timeout, "C's veto of the intruder's update")
        self.good(f"C's RejectUnauthorized listener vetoed the intruder's update "
                  f"(C's rejected count {vetoed})")

    def catch_up(self, c: PeerProcess, a: PeerProcess, total: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        start = time.monotonic()
        deadline = start + self.timeout
        with Progress(TextColumn("  catching up"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=self.out) as progress:
            task = progress.add_task("catch-up", total=total)
            while True:
                catchup = c.stats()["catchup"]
                done = max((pos for pos, _ in catchup.values()), default=0)
                progress.update(task, completed=min(done, total))
                if catchup.get(self.node_ids[a.name], [0])[0] >= total:
                    break
                if time.monotonic() >= deadline:
                    raise DemoFailure(f"C caught up {done} of A's {total} updates within "
                                      f"{self.timeout:g} s")
                time.sleep(0.05)
        elapsed = time.monotonic() - start
        got = c.stats()["log_length"]
        self.good(f"C read A's whole log in {elapsed:.2f} s: {got} live updates for {total} "
                  "written (retention pruned the superseded ones)")

    def summary(self, elapsed: float) -> None:
        from rich.table import Table

        table = Table(title="Summary", title_justify="left")
        for column in ("host", "made here", "sent", "applied from peers", "rejected",
                       "duplicates"):
            table.add_column(column, justify="left" if column == "host" else "right")
        for name, host in self.hosts.items():
            s = host.stats()
            table.add_row(name, str(s["local"]), str(s["published"]), str(s["remote"]),
                          str(s["rejected_total"]), str(s["duplicates"]))
        self.out.print()
        self.out.print(table)
        self.out.print(f"elapsed {elapsed:.1f} s")


def run_demo(*, home: Path | None = None, updates: int = 1000, timeout: float = 30.0,
             keep: bool = False, break_step: str | None = None, console: Any = None) -> int:
    """Run the demo; 0 if every step behaved as narrated, 1 otherwise."""
    from rich.console import Console

    out = console or Console(highlight=False, soft_wrap=True)
    if home is not None:
        if home.exists() and (not home.is_dir() or any(home.iterdir())):
            raise ConfigurationError(f"--home {home} is not an empty directory (hint: give "
                                     "a new or empty one, or none for a temporary one)")
        home.mkdir(parents=True, exist_ok=True)
        root = home
    else:
        root = Path(tempfile.mkdtemp(prefix="dmodel-demo-"))
    out.print("[bold]dmodel demo[/]: three peers on this machine, each its own process with "
              "its own keyring and embedded Redis, talking ZeroMQ over 127.0.0.1.")
    story = _Story(out, root, updates, timeout, break_step)
    started = time.monotonic()
    status = 1
    try:
        story.run()
        story.summary(time.monotonic() - started)
        out.print("[bold green]Every step behaved as narrated.[/]")
        status = 0
    except ToolError as exc:  # DemoFailure, or a CommandError of a host
        out.print(f"  [bold red]✗ step {story.step_no} ({story.current}) failed:[/] {exc}")
        for host in story.hosts.values():
            tail = host.stderr_tail(5)
            if tail:
                out.print(tail, markup=False, highlight=False)
    except KeyboardInterrupt:
        out.print("[red]interrupted[/]")
        status = 130
    finally:
        for host in reversed(list(story.hosts.values())):
            host.close()
        if home is None and not keep:
            shutil.rmtree(root, ignore_errors=True)
        elif status == 0 or keep:
            out.print(f"homes kept in {root}")
    return status


__all__ = ["BREAKABLE", "DemoFailure", "Person", "run_demo", "start_host"]
