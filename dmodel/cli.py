"""The ``dmodel`` command: run a peer or a broker, inspect a home, run the demo.

Options carry the names of ``dmodel.launch()`` and the ``DMODEL_*`` variables
(``--home``/DMODEL_HOME, ``--listen``, ``--peer``/DMODEL_PEERS, ``--discovery``,
``--redis-url``, ``--unauthorized-policy``, ``--passphrase``). Every failure is one
``error: ...`` line on stderr, with a hint where one helps; the exit status is 2 for a
usage or configuration error (a bad option, home or endpoint: ConfigurationError), 1
for any other failure; ``--debug`` shows tracebacks. ``--json`` prints data as JSON;
without it, ``sync``, ``verify`` and ``history`` draw progress bars on stderr when
both stdout and stderr are terminals.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import functools
import json
import os
import re
import stat
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypedDict, TypeVar

import click
import redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__, clock, merge
from .crypto import EncryptedValue
from .errors import (
    ConfigurationError,
    DecryptionError,
    DModelError,
    KeyringError,
    NetworkError,
    ObjectNotFoundError,
)
from .keyring import Keyring, write_private
from .node import Node, audit, default_home
from .node.default import start_lan_network
from .retention import Retention
from .store.connect import connect
from .tools.home import RedisLayout
from .tools.output import SEALED, dumps, utc_iso
from .update import AUTH_OPS, Op

F = TypeVar("F", bound=Callable[..., Any])

_out = Console(highlight=False, soft_wrap=True)
_err = Console(stderr=True, highlight=False)


# ------------------------------------------------------------------ helpers


def _emit_json(data: Any) -> None:
    click.echo(dumps(data, indent=2))


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _when(timestamp: int) -> str:
    """An HLC timestamp as ISO 8601 UTC."""
    return utc_iso(datetime.datetime.fromtimestamp(clock.physical_ms(timestamp) / 1000,
                                                   datetime.UTC))


class _Bars:
    """Progress bars on stderr for a person at a terminal; nothing otherwise.

    Shown only when stdout and stderr are both terminals (as rich sees them: ``TTY_COMPATIBLE``
    and ``FORCE_COLOR`` count) and the output is not ``--json``. Updates may come from
    any thread.
    """

    def __init__(self, as_json: bool) -> None:
        shown = not as_json and _out.is_terminal and _err.is_terminal
        self._bars = Progress(TextColumn("{task.description}"), BarColumn(),
                              MofNCompleteColumn(), TimeElapsedColumn(), console=_err,
                              transient=False) if shown else None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> _Bars:
        if self._bars is not None:
            self._bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bars is not None:
            self._bars.stop()

    def update(self, label: str, done: int, total: int) -> None:
        """Set the bar ``label`` (made on first use) to ``done`` of ``total``."""
        if self._bars is None:
            return
        task = self._tasks.get(label)
        if task is None:
            task = self._tasks[label] = self._bars.add_task(label, total=total)
        self._bars.update(task, completed=done, total=total)

    def counter(self, label: str) -> audit.Progress | None:
        """A ``progress(done, total)`` callback for the bar ``label`` (None when hidden)."""
        return None if self._bars is None else functools.partial(self.update, label)


# ------------------------------------------------------------------ homes and endpoints


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK)


def _home_path(home: Path | None, *, create: bool = False) -> Path:
    """The home to use, checked: a directory dmodel may write in (or, with ``create``, one
    it may make). ConfigurationError with a hint otherwise."""
    path = home if home is not None else default_home()
    if path.exists() and not path.is_dir():
        raise ConfigurationError(f"the home {path} is a file, not a directory (hint: give "
                                 "--home a directory, or a path that does not exist yet)")
    if not path.exists():
        if not create:
            raise ConfigurationError(
                f"no dmodel home at {path} (hint: give --home or set DMODEL_HOME; "
                f"'dmodel peer --home {path}' or 'dmodel sync --home {path} --peer ...' "
                "makes one)")
        parent = next(p for p in path.absolute().parents if p.exists())
        if not parent.is_dir() or not _writable(parent):
            why = "read-only" if parent.is_dir() else "a file"
            raise ConfigurationError(f"cannot make the home {path}: {parent} is {why} "
                                     "(hint: give --home a path you may write to)")
        return path
    for part in (path, path / "redis", path / "keys"):
        if part.is_dir() and not _writable(part):
            raise ConfigurationError(
                f"the home {path} is read-only ({part} cannot be written; hint: dmodel "
                "writes its lock and its embedded Redis there even to read: fix the "
                "permissions, or copy the home somewhere writable)")
    return path


_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[\w.-]+|\*):(\d+|\*)")


def _endpoint(text: str, option: str) -> str:
    """``text`` if it can be one ZeroMQ endpoint; a ConfigurationError with a hint for the
    usual slips (several endpoints in one value, a host:port without ``tcp://``)."""
    value = text.strip()
    if len(value.replace(",", " ").split()) > 1:
        hint = ("separate them with commas: DMODEL_PEERS=tcp://a:7600,tcp://b:7600"
                if option == _ENV_PEERS else f"give one per {option}: {option} tcp://a:7600 "
                f"{option} tcp://b:7600 (DMODEL_PEERS takes them comma-separated)")
        raise ConfigurationError(f"{option} {text!r} holds several endpoints (hint: {hint})")
    if "://" not in value:
        hint = f"did you mean tcp://{value}?" if _HOST_PORT.fullmatch(value) else \
            "an endpoint looks like tcp://HOST:PORT"
        raise ConfigurationError(f"{option} {text!r} is not a ZeroMQ endpoint (hint: {hint})")
    return value


_ENV_PEERS = "DMODEL_PEERS entry"


def _peer_endpoints(peers: Sequence[str]) -> list[str]:
    """The --peer values, or else DMODEL_PEERS (comma-separated), each checked."""
    if peers:
        return [_endpoint(p, "--peer") for p in peers]
    listed = os.environ.get("DMODEL_PEERS", "")
    return [_endpoint(p, _ENV_PEERS) for p in listed.split(",") if p.strip()]


def _live_store_url(home: Path) -> str | None:
    """The unix:// URL of the embedded Redis of ``home`` if a running peer serves it.

    Opening such a home as a second embedded node would, on shutdown, stop the server
    the running peer still uses; connecting by URL leaves it alone.
    """
    return RedisLayout.of(home).live_url()


def _node_running(home: Path) -> bool:
    """Whether a node holds ``home`` now (its lock is taken; a dead node's lock is free)."""
    import fcntl

    try:
        handle = open(home / "node.lock", "a+")  # noqa: SIM115 - closed below
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def _refuse_if_in_use(home: Path, redis_url: str | None) -> None:
    """A second node on a home would share its node id and store with the running one."""
    if redis_url or not home.is_dir():
        return
    url = _live_store_url(home)
    if url is None:
        return
    try:
        # An embedded Redis left behind by a killed peer has no other client: reusable.
        in_use = len(connect(url, socket_timeout=2).client_list()) > 1
    except redis.RedisError:
        in_use = False
    if in_use:
        raise ConfigurationError(f"a dmodel node is already running on {home} (hint: stop "
                                 "it first, or give each peer its own --home)")


def _check_keyring(home: Path, passphrase: str | None) -> None:
    """Fail on a wrong or missing passphrase before any Redis server is started.

    Node opens its keyring after starting the embedded Redis, and a KeyringError there
    would leave that server running.
    """
    keys = home / "keys"
    if keys.is_dir():
        Keyring(keys, passphrase)


@contextmanager
def _open_node(home: Path | None, redis_url: str | None, passphrase: str | None,
               policy: str | None = None, *, create: bool = False) -> Iterator[Node]:
    """A node over a home (which must exist unless ``create``), with no networking
    whatever DMODEL_* says."""
    path = _home_path(home, create=create)
    _check_keyring(path, passphrase)
    shared = None if redis_url else (_live_store_url(path) if path.is_dir() else None)
    # On a running peer's store, the peer keeps the root: this node only checks it.
    node = Node(path, listen="", peers=[], discovery=False, redis_url=redis_url or shared,
                passphrase=passphrase, unauthorized_policy=policy, keep_root=shared is None)
    try:
        yield node
    finally:
        node.shutdown()


def _json_object(text: str, option: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint=option) from None
    if not isinstance(value, dict):
        raise click.BadParameter("a JSON object is expected", param_hint=option)
    return value


# ------------------------------------------------------------------ options


def _keyring_protected(home: Path | None) -> bool:
    return ((home if home is not None else default_home()) / "keys" / "keyring.cfg").exists()


def _read_passphrase_file(file: Path) -> str:
    """The first line of ``file``, which only its owner may read or write."""
    try:
        mode = file.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigurationError(
                f"--passphrase-file {file} is open to other users (mode "
                f"{stat.S_IMODE(mode):04o}; hint: chmod 600 {file})")
        text = file.read_text()
    except OSError as exc:
        raise click.BadParameter(f"cannot read {file}: {exc.strerror}",
                                 param_hint="--passphrase-file") from None
    return text.partition("\n")[0].rstrip("\r")


def _resolve_passphrase(home: Path | None, passphrase: str | None, file: Path | None,
                        prompt: bool) -> str | None:
    """The passphrase from --passphrase-file, a prompt without echo, or as given.

    Without any, the prompt comes when the keyring is protected and stdin is a terminal.
    """
    if file is not None and prompt:
        raise click.UsageError("give --passphrase-file or --passphrase-prompt, not both")
    if file is not None:
        return _read_passphrase_file(file)
    if prompt or (passphrase is None and sys.stdin.isatty() and _keyring_protected(home)):
        return str(click.prompt("Keyring passphrase", hide_input=True, err=True))
    return passphrase


def passphrase_options(f: F) -> F:
    """--passphrase (or DMODEL_PASSPHRASE), --passphrase-file, --passphrase-prompt.

    The command gets one ``passphrase`` argument.
    """
    @functools.wraps(f)
    def resolved(*args: Any, passphrase_file: Path | None, passphrase_prompt: bool,
                 **kwargs: Any) -> Any:
        kwargs["passphrase"] = _resolve_passphrase(kwargs.get("home"), kwargs.get("passphrase"),
                                                   passphrase_file, passphrase_prompt)
        return f(*args, **kwargs)

    g: Any = resolved
    g = click.option("--passphrase-prompt", is_flag=True,
                     help="Ask for the keyring passphrase (no echo).")(g)
    g = click.option("--passphrase-file", type=click.Path(dir_okay=False, path_type=Path),
                     help="Read the keyring passphrase from the first line of this file "
                          "(refused unless only its owner may read it: chmod 600).")(g)
    g = click.option("--passphrase", envvar="DMODEL_PASSPHRASE", show_envvar=True,
                     help="Passphrase of the keyring (visible to other users of this "
                          "machine: prefer the file, the prompt or the variable).")(g)
    return g  # type: ignore[no-any-return]


def home_option(f: F) -> F:
    """--home (or DMODEL_HOME); checked by the command (see _home_path), not by click."""
    return click.option("--home", envvar="DMODEL_HOME", show_envvar=True,
                        type=click.Path(path_type=Path),
                        help="Keyring and embedded data (default ~/.local/share/dmodel).")(f)


def store_options(f: F) -> F:
    """--home, --redis-url and the passphrase options."""
    f = passphrase_options(f)
    f = click.option("--redis-url", envvar="DMODEL_REDIS_URL", show_envvar=True,
                     help="Use this Redis instead of the embedded one.")(f)
    return home_option(f)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(f)


def policy_option(f: F) -> F:
    return click.option("--unauthorized-policy", envvar="DMODEL_UNAUTHORIZED_POLICY",
                        show_envvar=True, type=click.Choice(list(merge.POLICIES)),
                        help="What happens to unauthorized updates (default reject).")(f)


# ------------------------------------------------------------------ the group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dmodel")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """dmodel: a decentralized object-model ORM.

    Start with `dmodel demo`: three peers, one story.
    """
    ctx.obj = {"debug": debug}


# ------------------------------------------------------------------ peer


@cli.command()
@store_options
@policy_option
@click.option("--listen", envvar="DMODEL_LISTEN", show_envvar=True,
              help="ZeroMQ endpoint to listen on (default tcp://127.0.0.1:*; with "
                   "--discovery tcp://0.0.0.0:7600 or the next free port).")
@click.option("--peer", "peers", multiple=True, metavar="ENDPOINT",
              help="Endpoint of a peer; repeatable (default: DMODEL_PEERS, comma-separated).")
@click.option("--discovery/--no-discovery", default=None, envvar="DMODEL_DISCOVERY",
              show_envvar=True, help="Find peers by UDP beacons on the LAN.")
@click.option("--models", "model_specs", multiple=True, metavar="MODULE[:CLASS]|FILE.py",
              help="Import model definitions; repeatable.")
@click.option("--listener", "listener_specs", multiple=True, metavar="CLASS:FILTER",
              help="Attach a listener, e.g. 'dmodel.listeners.LogChanges:Person:*' or "
                   "'mine.py:Guard:Person:[id]:*'; repeatable.")
@click.option("--name", default="peer", show_default=True, help="Name shown in log lines.")
@click.option("--status-interval", type=click.FloatRange(min=0), default=30.0,
              show_default=True, help="Seconds between status lines on stderr (0 = off).")
@click.option("--stdin-commands", is_flag=True,
              help="Answer JSON commands read from stdin (see dmodel/tools/peer.py).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True)
@click.option("--sync-page-size", type=click.IntRange(min=1), default=500, show_default=True,
              help="Updates per catch-up request.")
@click.option("--commands", "commands_spec", metavar="MODULE:CLASS|FILE.py:CLASS",
              help="Add the op_* methods of CLASS(peer) to the --stdin-commands protocol.")
@click.option("--network-options", metavar="JSON", hidden=True,
              help="More network options (a JSON object), e.g. '{\"rcvhwm\": 100000}'.")
@json_option
def peer(home: Path | None, redis_url: str | None, passphrase: str | None,
         unauthorized_policy: str | None, listen: str | None, peers: Sequence[str],
         discovery: bool | None, model_specs: Sequence[str], listener_specs: Sequence[str],
         name: str, status_interval: float, stdin_commands: bool, log_level: str,
         sync_page_size: int, commands_spec: str | None, network_options: str | None,
         as_json: bool) -> int:
    """Run a long-lived peer until SIGINT/SIGTERM.

    The first line on stdout is `endpoint tcp://HOST:PORT`; logs go to stderr. With
    --json the first line is {"endpoint": ..., "node_id": ...} and every log line
    (status lines too: {"status": {...}}) is one JSON object.
    """
    from .tools.peer import (
        Peer,
        configure_logging,
        load_commands,
        load_models,
        parse_listener,
        stop_on_signals,
    )

    path = _home_path(home, create=True)
    endpoints = _peer_endpoints(peers)
    if listen:
        _endpoint(listen, "--listen")
    for spec in model_specs:
        load_models(spec)
    listeners = [parse_listener(spec) for spec in listener_specs]
    commands = load_commands(commands_spec) if commands_spec else None
    extra = _json_object(network_options, "--network-options") if network_options else {}
    configure_logging(name, log_level, as_json=as_json)
    _refuse_if_in_use(path, redis_url)
    _check_keyring(path, passphrase)
    with stop_on_signals(threading.Event()) as stopping:
        node = Node(path, redis_url=redis_url, passphrase=passphrase,
                    unauthorized_policy=unauthorized_policy, start_network=False)
        try:
            for listener, pattern in listeners:
                listener.apply(pattern, node=node)
            # Networking starts only now, so no update is decided before the listeners are on.
            network = dict(peers=endpoints, discovery=bool(discovery),
                           page_size=sync_page_size, **extra)
            if discovery and not listen:
                # Beacons tell other hosts our port: listen where they can reach it.
                start_lan_network(node, **network)
            else:
                node.start_network(listen=listen or "tcp://127.0.0.1:*", **network)
            process = Peer(node, name=name, stopping=stopping)
            if commands is not None:
                process.add_commands(commands(process))
        except BaseException:
            node.shutdown()
            raise
        click.echo(dumps({"endpoint": process.endpoint, "node_id": node.node_id.hex()})
                   if as_json else f"endpoint {process.endpoint}")
        sys.stdout.flush()
        process.run(stdin_commands=stdin_commands, status_interval=status_interval)
    if process.failure is not None:
        raise NetworkError(f"the peer stopped abnormally: {type(process.failure).__name__}: "
                           f"{process.failure}")
    return 0


# ------------------------------------------------------------------ sync


@cli.command()
@store_options
@policy_option
@json_option
@click.option("--peer", "peers", multiple=True, metavar="ENDPOINT",
              help="Endpoint of a peer; repeatable (default: DMODEL_PEERS, comma-separated).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0,
              show_default=True, help="Seconds to wait for the peers.")
def sync(home: Path | None, redis_url: str | None, passphrase: str | None,
         unauthorized_policy: str | None, as_json: bool, peers: Sequence[str],
         timeout: float) -> int:
    """Pull what the peers have and this home has not, then exit.

    The home is made if it does not exist yet (as `dmodel peer` does). On a terminal a
    bar per peer shows how far through its log the catch-up is.
    """
    from .tools.peer import connected_peers

    endpoints = _peer_endpoints(peers)
    if not endpoints:
        raise click.UsageError("give at least one --peer (or set DMODEL_PEERS)")
    path = _home_path(home, create=True)
    _refuse_if_in_use(path, redis_url)
    with _open_node(path, redis_url, passphrase, unauthorized_policy, create=True) as node, \
            _Bars(as_json) as bars:
        network = node.start_network(peers=endpoints)
        network.on_progress(lambda peer, done, total: bars.update(f"peer {peer[:8]}", done,
                                                                  total))
        if not network.wait_for_peers(len(endpoints), timeout):
            ready = [p.endpoint for p in network.peers().values() if p.ready]
            missing = [e for e in endpoints if e not in ready]
            raise NetworkError(f"cannot reach peer {', '.join(missing) or endpoints[0]} "
                               f"within {timeout:g} s (hint: is a peer running there, "
                               "listening on an address this host can reach?)")
        before = node.log_length()
        network.sync_now()
        network.wait_idle(timeout)
        report = {"home": str(node.home), "peers": connected_peers(network),
                  "pulled": node.log_length() - before, "log_length": node.log_length()}
    if as_json:
        _emit_json(report)
    else:
        click.echo(f"pulled from {len(endpoints)} peer(s): {report['pulled']} new updates, "
                   f"log length {report['log_length']}")
    return 0


# ------------------------------------------------------------------ inspection


@cli.command()
@store_options
@json_option
def status(home: Path | None, redis_url: str | None, passphrase: str | None,
           as_json: bool) -> int:
    """What a home holds: objects per model, updates, owned keys; and, while a `dmodel
    peer` runs on it, the peers that one is connected to (hex node ids)."""
    from .tools.peer import CONNECTED_META

    path = _home_path(home)
    running = _node_running(path)
    shared = not redis_url and running and _live_store_url(path) is not None
    with _open_node(path, redis_url, passphrase) as node:
        models = {m: len(node.object_ids(m)) for m in node.store.models()}
        last = node.store.last_hlc()
        recorded = node.store.meta(CONNECTED_META) if running else None
        info: dict[str, Any] = {
            "home": str(node.home),
            "node_id": node.node_id.hex(),
            "store": redis_url or ("embedded, served by a running peer" if shared
                                   else "embedded"),
            "objects": sum(models.values()),
            "models": models,
            "updates": node.log_length(),
            "owned": len(node.keyring.owned()),
            "keyring_protected": (node.home / "keys" / "keyring.cfg").exists(),
            "last_update": _when(last) if last else None,
            "connected_peers": json.loads(recorded) if recorded else [],
        }
    if as_json:
        _emit_json(info)
        return 0
    table = Table(show_header=False, box=None)
    for key, value in info.items():
        if key == "models":
            value = ", ".join(f"{m} {n}" for m, n in value.items()) or "-"
        elif key == "connected_peers":
            value = ", ".join(value) or "-"
        elif isinstance(value, bool):
            value = "yes" if value else "no"
        table.add_row(key.replace("_", " "), str(value))
    _out.print(table)
    return 0


class _Listed(TypedDict):
    """One object as ``ls`` lists it (a table row, a ``--json`` element)."""

    db_id: str
    owned: bool
    fields: int


@cli.command("ls")
@store_options
@json_option
@click.argument("filter", default="*")
@click.option("--owned", is_flag=True, help="Only objects this home owns.")
def ls_command(home: Path | None, redis_url: str | None, passphrase: str | None,
               as_json: bool, filter: str, owned: bool) -> int:
    """List the objects matching FILTER, such as 'Person:*' or just 'Person' (default: all)."""
    from .model import object_list

    if filter.isidentifier():  # a model name: its objects
        filter = f"{filter}:*"
    with _open_node(home, redis_url, passphrase) as node:
        ids = object_list(filter, node=node)
        rows = [_Listed(db_id=i, owned=node.is_owned(i), fields=len(node.read_all(i)))
                for i in ids if not owned or node.is_owned(i)]
    if as_json:
        _emit_json(rows)
        return 0
    table = Table("db_id", "owned", "fields", box=None)
    for row in rows:
        table.add_row(row["db_id"], "yes" if row["owned"] else "", str(row["fields"]))
    _out.print(table)
    return 0


def _field_values(node: Node, db_id: str, caller: str | None) -> dict[str, Any]:
    """The object's fields as this home reads them (SEALED where no key opens one)."""
    regs = node.read_all(db_id)

    def value(name: str, reg: merge.Register) -> Any:
        if not reg.encrypted:
            return merge.element_value(name, reg)
        if caller is not None:
            try:
                return node.read(db_id, name, reader=caller)
            except DecryptionError:
                return SEALED
        shown = node.display_value(db_id, name, reg)
        return SEALED if isinstance(shown, EncryptedValue) else shown

    out: dict[str, Any] = {}
    lists: set[str] = set()
    for name in sorted(regs):
        if "#" in name:
            lists.add(name.partition("#")[0])
        else:
            out[name] = value(name, regs[name])
    for field in sorted(lists):
        items = []
        for element in node.store.list_range(db_id, field):
            name = f"{field}#{element.hex()}"
            if name in regs:
                items.append(value(name, regs[name]))
        out[field] = items
    return out


@cli.command()
@store_options
@json_option
@click.argument("db_id")
@click.option("--as", "caller", metavar="CALLER",
              help="Decrypt as this owned object (default: any key this home holds).")
@click.option("--verified", is_flag=True, help="Check every value against its signed update.")
def show(home: Path | None, redis_url: str | None, passphrase: str | None, as_json: bool,
         db_id: str, caller: str | None, verified: bool) -> int:
    """Show an object's fields (`<encrypted>`, in JSON {"encrypted": true}, where no key
    here opens them)."""
    with _open_node(home, redis_url, passphrase) as node:
        node.object_meta(db_id)
        if caller is not None and not node.is_owned(caller):
            raise KeyringError(f"{caller} is not owned by this home: --as needs its private key")
        if verified:
            for name, reg in node.read_all(db_id).items():
                node.verify_register(db_id, name, reg)
        info: dict[str, Any] = {
            "db_id": db_id,
            "owned": node.is_owned(db_id),
            "read_authorized": sorted(merge.current_members(node.store.auth_events(db_id, "r"))),
            "update_authorized": sorted(
                merge.current_members(node.store.auth_events(db_id, "u"))),
            "fields": _field_values(node, db_id, caller),
        }
    if as_json:
        _emit_json(info)
        return 0
    _out.print(f"[bold]{db_id}[/bold]{'  (owned)' if info['owned'] else ''}")
    _out.print(f"  may read:   {', '.join(info['read_authorized']) or '-'}")
    _out.print(f"  may update: {', '.join(info['update_authorized']) or '-'}")
    table = Table("field", "value", box=None)
    for name, value in info["fields"].items():
        table.add_row(name, repr(value))
    _out.print(table)
    return 0


def _op_record(op: Op) -> dict[str, Any]:
    """One operation as data: ``{"op": "set", "field": "name", "value": "Bob"}``; a
    sealed value is ``"encrypted": true`` instead of a value."""
    kind = op.op.removesuffix("_enc")
    record: dict[str, Any] = {"op": kind}
    if kind == "create":
        value = op.value or {}
        record.update(read=list(value.get("read", [])), update=list(value.get("update", [])))
        return record
    if kind in AUTH_OPS:
        record["member"] = (op.value or {}).get("id")
        return record
    if kind == "remove":
        return record
    record["field"] = op.field
    if kind in ("dset", "ddel"):
        record["key"] = op.value[0] if kind == "dset" else op.value
    elif kind in ("lset", "ldel"):
        record["element"] = (op.value[0] if kind == "lset" else op.value).hex()
    if kind in ("set", "dset", "lins", "lset"):
        if op.op.endswith("_enc"):
            record["encrypted"] = True
        else:
            record["value"] = op.value if kind == "set" else op.value[1]
    return record


def _describe(record: dict[str, Any]) -> str:
    """An operation record as text: ``set name = 'Bob'``, ``set salary = <encrypted>``."""
    kind = record["op"]
    if kind == "create":
        return f"create (read {len(record['read'])}, update {len(record['update'])})"
    if "member" in record:
        return f"{kind} {record['member']}"
    target = record.get("field", "")
    if "key" in record:
        target += f":{record['key']}"
    if "element" in record:
        target += f"#{record['element'][:8]}"
    if record.get("encrypted"):
        return f"{kind} {target} = {SEALED!r}"
    if "value" in record:
        return f"{kind} {target} = {_short(record['value'])}"
    return f"{kind} {target}".strip()


_DURATION = re.compile(r"\d+(\.\d+)?[smhd]", re.IGNORECASE)


def _since(text: str) -> datetime.datetime:
    """``--since``: an ISO 8601 date or date and time (UTC unless it carries an offset),
    or a duration back from now: ``90s``, ``10m``, ``2h``, ``3d``."""
    value = text.strip()
    if _DURATION.fullmatch(value):  # the durations of DMODEL_RETENTION
        seconds = Retention.parse(value).seconds or 0.0
        return datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=seconds)
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is neither a date/time (2024-05-01, 2024-05-01T12:30, "
            "2024-05-01T12:30+02:00) nor a duration (90s, 10m, 2h, 3d)",
            param_hint="--since") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=datetime.UTC)


@cli.command()
@store_options
@json_option
@click.argument("db_id")
@click.option("--rejected/--no-rejected", default=True, show_default=True,
              help="Include updates rejected as unauthorized.")
@click.option("--since", "since_text", metavar="WHEN",
              help="Only updates made since WHEN: a date/time in ISO 8601 (UTC unless it has "
                   "an offset: 2024-05-01, 2024-05-01T12:30) or a duration back from now "
                   "(90s, 10m, 2h, 3d).")
@click.option("--limit", type=click.IntRange(min=1), metavar="N",
              help="Only the N latest updates (after --since).")
def history(home: Path | None, redis_url: str | None, passphrase: str | None, as_json: bool,
            db_id: str, rejected: bool, since_text: str | None, limit: int | None) -> int:
    """The stored updates of an object, in merge order, with their times in UTC."""
    since = _since(since_text) if since_text is not None else None
    with _open_node(home, redis_url, passphrase) as node, _Bars(as_json) as bars:
        if node.store.object_meta(db_id) is None:
            raise ObjectNotFoundError(f"{db_id} is not known here")
        entries = audit.history(node.store, db_id, include_rejected=rejected,
                                progress=bars.counter("updates read"))
    if since is not None:
        entries = [e for e in entries if e.datetime >= since]
    if limit is not None:
        entries = entries[-limit:]
    rows: list[dict[str, Any]] = [
        {"update_id": e.update_id, "time": utc_iso(e.datetime), "timestamp": e.timestamp,
         "caller": e.caller_id, "verdict": e.verdict, "ops": [_op_record(op) for op in e.ops]}
        for e in entries]
    if as_json:
        _emit_json(rows)
        return 0
    table = Table("time (UTC)", "update", "caller", "verdict", "change", box=None)
    for row in rows:
        table.add_row(row["time"][:19] + "Z", row["update_id"][:12],
                      "self" if row["caller"] == db_id else row["caller"], row["verdict"],
                      "; ".join(_describe(op) for op in row["ops"]))
    _out.print(table)
    return 0


@cli.command()
@store_options
@json_option
def verify(home: Path | None, redis_url: str | None, passphrase: str | None,
           as_json: bool) -> int:
    """Re-check every stored value and log entry against the signatures."""
    with _open_node(home, redis_url, passphrase) as node, _Bars(as_json) as bars:
        problems = node.verify_store(progress=bars.counter("objects, updates"))
        objects, updates = len(node.store.object_ids()), node.log_length()
    if as_json:
        _emit_json({"ok": not problems, "objects": objects, "updates": updates,
                    "problems": problems})
    elif problems:
        click.echo(f"TAMPERING DETECTED: {len(problems)} problem(s) in {objects} objects, "
                   f"{updates} updates", err=True)
        for problem in problems:
            click.echo(f"  {problem}", err=True)
    else:
        click.echo(f"ok: {objects} objects and {updates} updates match their signatures")
    return 1 if problems else 0


# ------------------------------------------------------------------ cluster


@cli.group()
def cluster() -> None:
    """CURVE for a cluster in two commands: `init` writes the key, `join` installs it."""


@cluster.command("init")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path),
                default="cluster.key")
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
def cluster_init(file: Path, force: bool) -> None:
    """Write a new cluster key pair to FILE (mode 0600; default ./cluster.key).

    Copy FILE to every member over a channel you trust, and run `dmodel cluster join
    FILE` there.
    """
    from .net.curve import CurveConfig

    if file.exists() and not force:
        raise ConfigurationError(f"{file} exists (give --force to replace it)")
    CurveConfig.generate().save(file)
    click.echo(f"cluster key written to {file}; on each member: dmodel cluster join {file}")


@cluster.command("join")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@home_option
def cluster_join(file: Path, home: Path | None) -> None:
    """Install the cluster key FILE into the home (0600): its node then uses CURVE."""
    from .keyring import secure_home
    from .net.curve import CurveConfig
    from .net.replication import CLUSTER_KEY_FILE

    config = CurveConfig.load(file)  # refuses a key file others can read
    path = _home_path(home, create=True)
    secure_home(path)
    config.save(path / CLUSTER_KEY_FILE)
    click.echo(f"{path / CLUSTER_KEY_FILE} installed: this home's node uses CURVE now")


# ------------------------------------------------------------------ keys


@cli.group()
def keys() -> None:
    """The private keys in a home's keyring."""


def _keyring(home: Path | None, passphrase: str | None) -> Keyring:
    return Keyring(_home_path(home) / "keys", passphrase)


@keys.command("list")
@home_option
@passphrase_options
@json_option
def keys_list(home: Path | None, passphrase: str | None, as_json: bool) -> int:
    """db_ids of the objects whose private keys this home holds."""
    owned = _keyring(home, passphrase).owned()
    if as_json:
        _emit_json(owned)
    else:
        for db_id in owned:
            click.echo(db_id)
    return 0


@keys.command("export")
@home_option
@passphrase_options
@click.argument("db_id")
@click.option("--i-know-what-i-am-doing", "confirmed", is_flag=True,
              help="Required: the keys are written in clear.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="Write to this file (mode 0600) instead of stdout (base64).")
def keys_export(home: Path | None, passphrase: str | None, db_id: str, confirmed: bool,
                output: Path | None) -> int:
    """Export the private keys of DB_ID in clear (for another device of the same identity)."""
    if not confirmed:
        raise click.UsageError("exporting private keys needs --i-know-what-i-am-doing")
    data = _keyring(home, passphrase).export(db_id.partition(":")[2] or db_id)
    click.echo(f"warning: these are the private keys of {db_id} in clear; whoever has them "
               "can sign as it and read what it may read", err=True)
    if output is not None:
        write_private(output, data)
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(base64.b64encode(data).decode())
    return 0


@keys.command("import")
@home_option
@passphrase_options
@click.argument("file", type=click.File("rb"))
def keys_import(home: Path | None, passphrase: str | None, file: Any) -> int:
    """Import keys written by `dmodel keys export` (FILE, or - for stdin)."""
    data = file.read()
    try:
        data = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        pass  # raw bytes from --output
    db_id = _keyring(home, passphrase).import_(data)
    click.echo(f"imported {db_id}")
    return 0


# ------------------------------------------------------------------ broker


@cli.command()
@click.option("--frontend", default="tcp://127.0.0.1:*", show_default=True,
              help="Where peers publish (XSUB).")
@click.option("--backend", default="tcp://127.0.0.1:*", show_default=True,
              help="Where peers subscribe (XPUB).")
@json_option
def broker(frontend: str, backend: str, as_json: bool) -> int:
    """Relay publishes between peers (hub and spoke) until SIGINT/SIGTERM.

    Prints `frontend ENDPOINT` and `backend ENDPOINT` first (with --json one line,
    {"frontend": ..., "backend": ...}).
    """
    from .net.broker import Broker
    from .tools.peer import stop_on_signals

    _endpoint(frontend, "--frontend")
    _endpoint(backend, "--backend")
    with stop_on_signals(threading.Event()) as stopping, Broker(frontend, backend) as relay:
        if as_json:
            click.echo(dumps({"frontend": relay.frontend_endpoint,
                              "backend": relay.backend_endpoint}))
        else:
            click.echo(f"frontend {relay.frontend_endpoint}")
            click.echo(f"backend {relay.backend_endpoint}")
        sys.stdout.flush()
        while not stopping.wait(0.2):
            pass
    return 0


# ------------------------------------------------------------------ demo


@cli.command()
@click.option("--home", type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the three homes (must be empty; default: a temporary "
                   "directory, removed afterwards).")
@click.option("--updates", type=click.IntRange(min=1, max=100_000), default=1000,
              show_default=True, help="Updates host A makes while host C is offline.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=30.0,
              show_default=True, help="Seconds each step may take.")
@click.option("--keep", is_flag=True, help="Keep the temporary homes.")
@click.option("--break", "break_step", hidden=True,
              type=click.Choice(["chief", "intruder", "listener", "catchup"]))
def demo(home: Path | None, updates: int, timeout: float, keep: bool,
         break_step: str | None) -> int:
    """Three peers in three processes walk through the PyDinemic story.

    Exits non-zero if any step does not behave as narrated.
    """
    from .tools.demo import run_demo

    return run_demo(home=home, updates=updates, timeout=timeout, keep=keep,
                    break_step=break_step)


# ------------------------------------------------------------------ entry


USAGE_ERROR = 2
"""Exit status for what the user gave wrong (as click's usage errors); 1 is a failure."""


def _error(message: str) -> None:
    click.echo(f"error: {' '.join(message.split())}", err=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (never raises for user errors)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args[: args.index("--")] if "--" in args else "--debug" in args
    try:
        result = cli.main(args=args, prog_name="dmodel", standalone_mode=False)
    except click.exceptions.Abort:
        _error("aborted")
        return 130
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        _error(exc.format_message() + hint)
        return exc.exit_code
    except click.ClickException as exc:
        _error(exc.format_message())
        return exc.exit_code
    except (DModelError, OSError) as exc:
        if debug:
            raise
        _error(str(exc) or type(exc).__name__)
        return USAGE_ERROR if isinstance(exc, ConfigurationError) else 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if debug:
            raise
        _error(f"internal error: {type(exc).__name__}: {exc} (run with --debug for details)")
        return 1
    return result if isinstance(result, int) else 0


__all__ = ["cli", "main"]
