"""The ``dmodel`` command: run a peer or a broker, inspect a home, run the demo.

Options carry the names of ``dmodel.launch()`` and the ``DMODEL_*`` variables
(``--home``/DMODEL_HOME, ``--listen``, ``--peer``/DMODEL_PEERS, ``--discovery``,
``--redis-url``, ``--unauthorized-policy``, ``--passphrase``). Every failure is one
``error: ...`` line on stderr and a non-zero exit status; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import functools
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
import redis
from rich.console import Console
from rich.table import Table

from . import __version__, merge
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
from .node import Node, default_home
from .node.default import start_lan_network
from .store.connect import connect
from .tools.home import RedisLayout
from .update import Op

F = TypeVar("F", bound=Callable[..., Any])

ENCRYPTED = "<encrypted>"
_out = Console(highlight=False, soft_wrap=True)


# ------------------------------------------------------------------ helpers


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    if isinstance(value, EncryptedValue):
        return ENCRYPTED
    if isinstance(value, set | frozenset | tuple):
        return sorted(value, key=repr) if isinstance(value, set | frozenset) else list(value)
    return repr(value)


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=_jsonable, ensure_ascii=False))


def _short(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) and value == ENCRYPTED else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _when(timestamp: int) -> str:
    ms = timestamp >> 16
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime(
        "%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _home_path(home: Path | None) -> Path:
    path = home if home is not None else default_home()
    if not path.is_dir():
        raise ConfigurationError(f"no dmodel home at {path} (give --home or set DMODEL_HOME)")
    return path


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


def _refuse_if_in_use(home: Path | None, redis_url: str | None) -> None:
    """A second node on a home would share its node id and store with the running one."""
    if redis_url:
        return
    path = home if home is not None else default_home()
    url = _live_store_url(path)
    if url is None:
        return
    try:
        # An embedded Redis left behind by a killed peer has no other client: reusable.
        in_use = len(connect(url, socket_timeout=2).client_list()) > 1
    except redis.RedisError:
        in_use = False
    if in_use:
        raise ConfigurationError(f"a dmodel node is already running on {path}; "
                                 "stop it first (or give each peer its own --home)")


def _check_keyring(home: Path | None, passphrase: str | None) -> None:
    """Fail on a wrong or missing passphrase before any Redis server is started.

    Node opens its keyring after starting the embedded Redis, and a KeyringError there
    would leave that server running.
    """
    keys = (home if home is not None else default_home()) / "keys"
    if keys.is_dir():
        Keyring(keys, passphrase)


@contextmanager
def _open_node(home: Path | None, redis_url: str | None, passphrase: str | None,
               policy: str | None = None) -> Iterator[Node]:
    """A node over an existing home, with no networking whatever DMODEL_* says."""
    path = _home_path(home)
    _check_keyring(path, passphrase)
    url = redis_url or _live_store_url(path)
    node = Node(path, listen="", peers=[], discovery=False, redis_url=url,
                passphrase=passphrase, unauthorized_policy=policy)
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


def _env_peers() -> list[str]:
    return [p.strip() for p in os.environ.get("DMODEL_PEERS", "").split(",") if p.strip()]


# ------------------------------------------------------------------ options


def _keyring_protected(home: Path | None) -> bool:
    return ((home if home is not None else default_home()) / "keys" / "keyring.cfg").exists()


def _resolve_passphrase(home: Path | None, passphrase: str | None, file: Path | None,
                        prompt: bool) -> str | None:
    """The passphrase from --passphrase-file, a prompt without echo, or as given.

    Without any, the prompt comes when the keyring is protected and stdin is a terminal.
    """
    if file is not None and prompt:
        raise click.UsageError("give --passphrase-file or --passphrase-prompt, not both")
    if file is not None:
        try:
            text = file.read_text()
        except OSError as exc:
            raise click.BadParameter(f"cannot read {file}: {exc.strerror}",
                                     param_hint="--passphrase-file") from None
        return text.rstrip("\r\n")
    if prompt or (passphrase is None and sys.stdin.isatty() and _keyring_protected(home)):
        return str(click.prompt("Keyring passphrase", hide_input=True))
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
                     help="Read the keyring passphrase from this file (its first line).")(g)
    g = click.option("--passphrase", envvar="DMODEL_PASSPHRASE", show_envvar=True,
                     help="Passphrase of the keyring (visible to other users of this "
                          "machine: prefer the file, the prompt or the variable).")(g)
    return g  # type: ignore[no-any-return]


def store_options(f: F) -> F:
    """--home, --redis-url and the passphrase options."""
    f = passphrase_options(f)
    f = click.option("--redis-url", envvar="DMODEL_REDIS_URL", show_envvar=True,
                     help="Use this Redis instead of the embedded one.")(f)
    f = click.option("--home", envvar="DMODEL_HOME", show_envvar=True,
                     type=click.Path(file_okay=False, path_type=Path),
                     help="Keyring and embedded data (default ~/.local/share/dmodel).")(f)
    return f


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
def peer(home: Path | None, redis_url: str | None, passphrase: str | None,
         unauthorized_policy: str | None, listen: str | None, peers: Sequence[str],
         discovery: bool | None, model_specs: Sequence[str], listener_specs: Sequence[str],
         name: str, status_interval: float, stdin_commands: bool, log_level: str,
         sync_page_size: int, commands_spec: str | None, network_options: str | None) -> int:
    """Run a long-lived peer until SIGINT/SIGTERM.

    The first line on stdout is `endpoint tcp://HOST:PORT`; logs go to stderr.
    """
    from .tools.peer import (
        Peer,
        configure_logging,
        load_commands,
        load_models,
        parse_listener,
        stop_on_signals,
    )

    for spec in model_specs:
        load_models(spec)
    listeners = [parse_listener(spec) for spec in listener_specs]
    commands = load_commands(commands_spec) if commands_spec else None
    extra = _json_object(network_options, "--network-options") if network_options else {}
    configure_logging(name, log_level)
    _refuse_if_in_use(home, redis_url)
    _check_keyring(home, passphrase)
    with stop_on_signals(threading.Event()) as stopping:
        node = Node(home, redis_url=redis_url, passphrase=passphrase,
                    unauthorized_policy=unauthorized_policy, start_network=False)
        try:
            for listener, pattern in listeners:
                listener.apply(pattern, node=node)
            # Networking starts only now, so no update is decided before the listeners are on.
            network = dict(peers=list(peers) or _env_peers(), discovery=bool(discovery),
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
        click.echo(f"endpoint {process.endpoint}")
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
@click.option("--peer", "peers", multiple=True, metavar="ENDPOINT",
              help="Endpoint of a peer; repeatable (default: DMODEL_PEERS).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0,
              show_default=True, help="Seconds to wait for the peers.")
def sync(home: Path | None, redis_url: str | None, passphrase: str | None,
         unauthorized_policy: str | None, peers: Sequence[str], timeout: float) -> int:
    """Pull what the peers have and this home has not, then exit."""
    endpoints = list(peers) or _env_peers()
    if not endpoints:
        raise click.UsageError("give at least one --peer (or set DMODEL_PEERS)")
    _refuse_if_in_use(home, redis_url)
    with _open_node(home, redis_url, passphrase, unauthorized_policy) as node:
        node.start_network(peers=endpoints)
        if not node.network.wait_for_peers(len(endpoints), timeout):
            ready = [p.endpoint for p in node.network.peers().values() if p.ready]
            missing = [e for e in endpoints if e not in ready]
            raise NetworkError(f"cannot reach peer {', '.join(missing) or endpoints[0]} "
                               f"within {timeout:g} s")
        before = node.log_length()
        node.network.sync_now()
        node.network.wait_idle(timeout)
        click.echo(f"pulled from {len(endpoints)} peer(s): "
                   f"{node.log_length() - before} new updates, log length {node.log_length()}")
    return 0


# ------------------------------------------------------------------ inspection


@cli.command()
@store_options
@json_option
def status(home: Path | None, redis_url: str | None, passphrase: str | None,
           as_json: bool) -> int:
    """What a home holds: objects per model, updates, owned keys."""
    path = _home_path(home)
    shared = not redis_url and _node_running(path) and _live_store_url(path) is not None
    with _open_node(home, redis_url, passphrase) as node:
        models = {m: len(node.object_ids(m)) for m in node.store.models()}
        last = node.store.last_hlc()
        info = {
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
        }
    if as_json:
        _emit_json(info)
        return 0
    table = Table(show_header=False, box=None)
    for key, value in info.items():
        if key == "models":
            value = ", ".join(f"{m} {n}" for m, n in value.items()) or "-"
        elif isinstance(value, bool):
            value = "yes" if value else "no"
        table.add_row(key.replace("_", " "), str(value))
    _out.print(table)
    return 0


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
        rows = [{"db_id": i, "owned": node.is_owned(i),
                 "fields": len(node.read_all(i))} for i in ids if not owned or node.is_owned(i)]
    if as_json:
        _emit_json(rows)
        return 0
    table = Table("db_id", "owned", "fields", box=None)
    for row in rows:
        table.add_row(row["db_id"], "yes" if row["owned"] else "", str(row["fields"]))
    _out.print(table)
    return 0


def _field_values(node: Node, db_id: str, caller: str | None) -> dict[str, Any]:
    regs = node.read_all(db_id)

    def value(name: str, reg: merge.Register) -> Any:
        if not reg.encrypted:
            return merge.element_value(name, reg)
        if caller is not None:
            try:
                return node.read(db_id, name, reader=caller)
            except DecryptionError:
                return ENCRYPTED
        shown = node.display_value(db_id, name, reg)
        return ENCRYPTED if isinstance(shown, EncryptedValue) else shown

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
    """Show an object's fields (`<encrypted>` where no key here opens them)."""
    with _open_node(home, redis_url, passphrase) as node:
        node.object_meta(db_id)
        if caller is not None and not node.is_owned(caller):
            raise KeyringError(f"{caller} is not owned by this home: --as needs its private key")
        if verified:
            for name, reg in node.read_all(db_id).items():
                node.verify_register(db_id, name, reg)
        info = {
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
        table.add_row(name, value if value == ENCRYPTED else repr(value))
    _out.print(table)
    return 0


def _describe_op(op: Op) -> str:
    if op.op == "create":
        value = op.value or {}
        return (f"create (read {len(value.get('read', []))}, "
                f"update {len(value.get('update', []))})")
    if op.op.endswith("_enc"):
        return f"{op.op[:-4]} {op.register} = {ENCRYPTED}"
    if op.op in ("set", "dset", "lins", "lset"):
        value = op.value[1] if op.op != "set" else op.value
        return f"{op.op} {op.register} = {_short(value)}"
    if op.op in ("grant_read", "grant_update", "revoke_read", "revoke_update"):
        return f"{op.op} {(op.value or {}).get('id')}"
    return f"{op.op} {op.register}".strip()


@cli.command()
@store_options
@json_option
@click.argument("db_id")
@click.option("--rejected/--no-rejected", default=True, show_default=True,
              help="Include updates rejected as unauthorized.")
def history(home: Path | None, redis_url: str | None, passphrase: str | None, as_json: bool,
            db_id: str, rejected: bool) -> int:
    """The stored updates of an object, in merge order."""
    with _open_node(home, redis_url, passphrase) as node:
        if node.store.object_meta(db_id) is None:
            raise ObjectNotFoundError(f"{db_id} is not known here")
        entries = node.history(db_id, include_rejected=rejected)
    rows = [{"update_id": e.update_id, "time": _when(e.timestamp), "caller": e.caller_id,
             "verdict": e.verdict, "ops": [_describe_op(op) for op in e.ops]}
            for e in entries]
    if as_json:
        _emit_json(rows)
        return 0
    table = Table("time (UTC)", "update", "caller", "verdict", "change", box=None)
    for row in rows:
        table.add_row(row["time"][:19], row["update_id"][:12],
                      "self" if row["caller"] == db_id else row["caller"], row["verdict"],
                      "; ".join(row["ops"]))
    _out.print(table)
    return 0


@cli.command()
@store_options
@json_option
def verify(home: Path | None, redis_url: str | None, passphrase: str | None,
           as_json: bool) -> int:
    """Re-check every stored value and log entry against the signatures."""
    with _open_node(home, redis_url, passphrase) as node:
        problems = node.verify_store()
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
@click.option("--home", envvar="DMODEL_HOME", show_envvar=True,
              type=click.Path(file_okay=False, path_type=Path))
def cluster_join(file: Path, home: Path | None) -> None:
    """Install the cluster key FILE into the home (0600): its node then uses CURVE."""
    from .keyring import secure_home
    from .net.curve import CurveConfig
    from .net.replication import CLUSTER_KEY_FILE

    config = CurveConfig.load(file)  # refuses a key file others can read
    path = home if home is not None else default_home()
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
@click.option("--home", envvar="DMODEL_HOME", show_envvar=True,
              type=click.Path(file_okay=False, path_type=Path))
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
@click.option("--home", envvar="DMODEL_HOME", show_envvar=True,
              type=click.Path(file_okay=False, path_type=Path))
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
@click.option("--home", envvar="DMODEL_HOME", show_envvar=True,
              type=click.Path(file_okay=False, path_type=Path))
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
def broker(frontend: str, backend: str) -> int:
    """Relay publishes between peers (hub and spoke) until SIGINT/SIGTERM.

    Prints `frontend ENDPOINT` and `backend ENDPOINT` first.
    """
    from .net.broker import Broker
    from .tools.peer import stop_on_signals

    with stop_on_signals(threading.Event()) as stopping, Broker(frontend, backend) as relay:
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
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if debug:
            raise
        _error(f"internal error: {type(exc).__name__}: {exc} (run with --debug for details)")
        return 1
    return result if isinstance(result, int) else 0


__all__ = ["cli", "main"]
