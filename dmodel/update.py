"""The Update message: the unit that is signed, sent, stored and merged.

Wire format (protocol version 2)::

    raw = signature (64 bytes, Ed25519) || body
    body = msgpack map, exactly these keys:
        "v": 2                     protocol version
        "n": bin(16)               id of the node that signed it (one device of the caller)
        "c": str                   caller db_id ("Model:oid"), whose key signed the body
        "t": int                   hybrid-logical-clock timestamp
        "p": bin(32) | bin(0)      id of the caller's previous update from the same node
        "o": [[obj, op, field, value], ...]   1..MAX_OPS operations, applied all-or-nothing
        "g": {obj: ref}            only when the caller changes objects other than itself:
                                   for each, the update-grant it writes under (ref = the
                                   granting update's id + op index, 34 bytes; see merge.py)

    update id = BLAKE2b-256(body)

The signature covers the body bytes exactly as sent, so decoding never has to
re-encode anything to verify. Operations (``op``, ``field``, ``value``):

    create          ""      {"sign": bin32, "box": bin32, "read": [db_id], "update": [db_id]}
    set             name    plain value
    set_enc         name    {"b": bin, "k": {oid: bin}}   (see crypto.seal)
    del             name    nil
    dset / dset_enc name    [key, value]                  (DDict entry)
    ddel            name    key
    lins / lins_enc name    [position, value]             (DList insert; the element's id is
                                                           this op's update id + op index)
    lset / lset_enc name    [element id, value]           (DList element value)
    ldel            name    element id                    (DList element delete)
    grant_read      ""      {"id": db_id, "w": {ref: bin}}  ref = update id + op index (34 bytes)
    revoke_read     ""      {"id": db_id}
    grant_update    ""      {"id": db_id}
    revoke_update   ""      {"id": db_id, "f": [update id]}   f = the member's updates on
                                                          this object accepted by the revoking
                                                          node (its frontier, see merge.py)
    remove          ""      nil

A ``create`` must be the first operation, on the caller itself. An update with a
grant or revoke touches one object only.

Version 1 (no ``"g"``, revokes without a frontier, envelopes ``{"c": secretbox, "k"}``
not bound to their place) is still decoded, so old logs stay readable; a version-1
write by a member names no grant and so is unauthorized, and a version-1 envelope does
not open (crypto.open_sealed). Plain values are nil,
bool, int (64-bit), float, str, bytes, and lists and str-keyed maps of those.

Limits (an update over any of them is an OversizedUpdate): see the constants below.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ._slots import quick_init
from .crypto import KEY_SIZE, SIGNATURE_SIZE, Identity, PublicIdentity, split_db_id
from .errors import ForgedUpdate, MalformedUpdate, OversizedUpdate

PROTOCOL_VERSION = 2
PROTOCOL_VERSIONS = (1, 2)          # decoded

MAX_UPDATE_SIZE = 512 * 1024        # whole raw message
MAX_VALUE_SIZE = 128 * 1024         # one packed value
MAX_OPS = 1000                      # operations in one update (transaction)
MAX_FIELD_NAME = 64
MAX_DICT_KEY = 256
MAX_DB_ID = 97                      # 64-char model name + ":" + 32-char oid
MAX_AUTH_IDS = 256                  # ids in a create's initial authorization lists
MAX_NESTING = 16                    # list/map nesting inside a value
MAX_READERS = 1024                  # wrapped keys in one encrypted value
NODE_ID_SIZE = 16
UPDATE_ID_SIZE = 32
REF_SIZE = UPDATE_ID_SIZE + 2

MAX_FRONTIER = 10_000               # update ids named by one revoke_update
MAX_POSITION = 4096                 # bytes of a DList position
LIST_OPS = frozenset({"lins", "lins_enc", "lset", "lset_enc", "ldel"})
FIELD_OPS = frozenset({"set", "set_enc", "del", "dset", "dset_enc", "ddel"}) | LIST_OPS
AUTH_OPS = frozenset({"grant_read", "revoke_read", "grant_update", "revoke_update"})
OBJECT_OPS = frozenset({"create", "remove"})
ALL_OPS = FIELD_OPS | AUTH_OPS | OBJECT_OPS

_FIELD_NAME = re.compile(rf"[A-Za-z_][A-Za-z0-9_]{{0,{MAX_FIELD_NAME - 1}}}")
_BODY_KEYS = frozenset("vnctpo")
_BODY_KEYS_GRANTS = frozenset("vnctpog")
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1
_SURELY_SMALL_STR = (MAX_VALUE_SIZE - 5) // 4


@quick_init
@dataclass(frozen=True, slots=True)
class Op:
    """One operation of an update."""

    obj: str
    op: str
    field: str = ""
    value: Any = None

    def __post_init__(self) -> None:
        _check_op(self)

    @property
    def register(self) -> str:
        """The register this op writes: ``field``, ``field:key`` (DDict) or ``field#<id hex>``
        (DList element; for ``lins`` use ``element_register``, the id is the op's own)."""
        kind = self.op
        if kind == "set" or kind == "set_enc" or kind == "del":  # (the common case first)
            return self.field
        if kind in ("dset", "dset_enc"):
            return f"{self.field}:{self.value[0]}"
        if self.op == "ddel":
            return f"{self.field}:{self.value}"
        if self.op in ("lset", "lset_enc"):
            return element_register(self.field, self.value[0])
        if self.op == "ldel":
            return element_register(self.field, self.value)
        return self.field


def element_register(field: str, element_id: bytes) -> str:
    """Register name of a DList element."""
    return f"{field}#{element_id.hex()}"


def element_id(update_id: bytes, index: int) -> bytes:
    """The id of the DList element inserted by op ``index`` of an update."""
    return update_id + index.to_bytes(2, "big")


def op_register(op: Op, update_id: bytes, index: int) -> str:
    """The register ``op`` (op number ``index`` of update ``update_id``) writes."""
    if op.op in ("lins", "lins_enc"):
        return element_register(op.field, element_id(update_id, index))
    return op.register


@quick_init
@dataclass(frozen=True, slots=True)
class Update:
    """A signed, decoded update. Build with ``Update.create`` or ``decode``."""

    node: bytes
    caller: str
    timestamp: int
    prev: bytes
    ops: tuple[Op, ...]
    signature: bytes
    body: bytes = field(repr=False)
    id: bytes = field(repr=False)
    grants: tuple[tuple[str, bytes], ...] = ()   # (object, grant ref), sorted by object
    version: int = PROTOCOL_VERSION

    @classmethod
    def create(cls, signer: Identity, *, node: bytes, caller: str, timestamp: int,
               prev: bytes, ops: Iterable[Op],
               grants: dict[str, bytes] | None = None) -> Update:
        """Sign a new update with ``signer`` (the caller's identity).

        ``grants`` names, for each object other than the caller that ``ops`` change, the
        ref of the update-grant the caller writes under.
        """
        ops = tuple(ops)
        _check_header(node, timestamp, prev)
        if not ops:
            raise MalformedUpdate("operations must be a non-empty list")
        if len(ops) > MAX_OPS:
            raise OversizedUpdate(f"{len(ops)} operations, limit {MAX_OPS}")
        content: dict[str, Any] = {
            "v": PROTOCOL_VERSION, "n": node, "c": caller, "t": timestamp, "p": prev,
            "o": [[o.obj, o.op, o.field, o.value] for o in ops]}
        if grants:
            content["g"] = dict(sorted(grants.items()))
        body = pack_value(content)
        update = cls(node, caller, timestamp, prev, ops, signer.sign(body), body,
                     update_id(body), tuple(sorted((grants or {}).items())))
        _check_envelope(update)
        if len(update.raw) > MAX_UPDATE_SIZE:
            raise OversizedUpdate(f"update is {len(update.raw)} bytes, limit {MAX_UPDATE_SIZE}")
        return update

    @property
    def raw(self) -> bytes:
        """The bytes to send and store."""
        return self.signature + self.body

    @property
    def caller_oid(self) -> str:
        return self.caller.partition(":")[2]

    @property
    def hex_id(self) -> str:
        return self.id.hex()

    def verify(self, key: PublicIdentity) -> None:
        """Raise ForgedUpdate unless the signature is ``key``'s."""
        key.verify(self.body, self.signature)

    def grant_for(self, db_id: str) -> bytes | None:
        """The ref of the update-grant this update names for object ``db_id``."""
        for obj, ref in self.grants:
            if obj == db_id:
                return ref
        return None

    def creates(self) -> PublicIdentity | None:
        """The public keys carried by a create op, if this update creates the caller."""
        first = self.ops[0]
        if first.op != "create":
            return None
        return PublicIdentity(first.value["sign"], first.value["box"])


def update_id(body: bytes) -> bytes:
    """The id of an update: BLAKE2b-256 of its body."""
    return hashlib.blake2b(body, digest_size=UPDATE_ID_SIZE).digest()


def decode(raw: bytes) -> Update:
    """Parse and structurally validate raw bytes. Signatures are checked later, by the node.

    Raises MalformedUpdate or OversizedUpdate, nothing else.
    """
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise MalformedUpdate("an update is bytes")
    raw = bytes(raw)
    if len(raw) > MAX_UPDATE_SIZE:
        raise OversizedUpdate(f"update is {len(raw)} bytes, limit {MAX_UPDATE_SIZE}")
    if len(raw) <= SIGNATURE_SIZE:
        raise MalformedUpdate("update too short")
    signature, body = raw[:SIGNATURE_SIZE], raw[SIGNATURE_SIZE:]
    uid = update_id(body)
    try:
        data = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True,
                               max_bin_len=MAX_UPDATE_SIZE, max_str_len=MAX_UPDATE_SIZE,
                               # No tighter than the size limit: every list or map a
                               # value may hold (up to MAX_VALUE_SIZE packed) must decode.
                               max_array_len=MAX_UPDATE_SIZE, max_map_len=MAX_UPDATE_SIZE // 2,
                               max_ext_len=0)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError, RecursionError) as exc:
        raise MalformedUpdate(f"body is not valid msgpack: {exc}", uid) from None
    except Exception as exc:  # msgpack can raise other errors on crafted input
        raise MalformedUpdate(f"body is not valid msgpack: {type(exc).__name__}", uid) from None
    if not isinstance(data, dict) or (set(data) != _BODY_KEYS
                                      and set(data) != _BODY_KEYS_GRANTS):
        raise MalformedUpdate("body must be a map with keys v, n, c, t, p, o (and g)", uid)
    if type(data["v"]) is not int or data["v"] not in PROTOCOL_VERSIONS:
        raise MalformedUpdate(f"unsupported protocol version {data['v']!r}", uid)
    try:
        grants = _check_grants(data.get("g"), data["v"])
    except MalformedUpdate as exc:
        exc.update_id = uid
        raise
    node, caller, ts, prev, ops = data["n"], data["c"], data["t"], data["p"], data["o"]
    try:
        _check_header(node, ts, prev)
    except MalformedUpdate as exc:
        exc.update_id = uid
        raise
    if not isinstance(ops, list) or not ops:
        raise MalformedUpdate("operations must be a non-empty list", uid)
    if len(ops) > MAX_OPS:
        raise OversizedUpdate(f"{len(ops)} operations, limit {MAX_OPS}", uid)
    parsed = []
    for item in ops:
        if not isinstance(item, list) or len(item) != 4:
            raise MalformedUpdate("an operation is [object, op, field, value]", uid)
        try:
            parsed.append(Op(*item))
        except (MalformedUpdate, OversizedUpdate) as exc:
            exc.update_id = uid
            raise
    if not isinstance(caller, str):
        raise MalformedUpdate("caller must be a db_id string", uid)
    update = Update(node, caller, ts, prev, tuple(parsed), signature, body, uid, grants,
                    data["v"])
    try:
        _check_envelope(update)
    except MalformedUpdate as exc:
        exc.update_id = uid
        raise
    return update


def _check_grants(grants: Any, version: int) -> tuple[tuple[str, bytes], ...]:
    if grants is None:
        return ()
    if version < 2 or not isinstance(grants, dict) or not grants or len(grants) > MAX_OPS:
        raise MalformedUpdate("g must be a non-empty map of object id -> grant ref")
    for obj, ref in grants.items():
        _check_db_id(obj)
        if not isinstance(ref, bytes) or len(ref) != REF_SIZE:
            raise MalformedUpdate("a grant ref is 34 bytes")
    return tuple(sorted(grants.items()))


def _check_header(node: Any, ts: Any, prev: Any) -> None:
    if not isinstance(node, bytes) or len(node) != NODE_ID_SIZE:
        raise MalformedUpdate("node id must be 16 bytes")
    if type(ts) is not int or not 0 < ts < (1 << 63):
        raise MalformedUpdate("timestamp must be a positive 63-bit integer")
    if not isinstance(prev, bytes) or len(prev) not in (0, UPDATE_ID_SIZE):
        raise MalformedUpdate("previous update id must be 0 or 32 bytes")


def _check_envelope(update: Update) -> None:
    _check_db_id(update.caller)
    for index, op in enumerate(update.ops):
        if op.op == "create":
            if index != 0:
                raise MalformedUpdate("create must be the first operation")
            if op.obj != update.caller:
                raise MalformedUpdate("an object is created by itself (caller == object)")
            model, oid = split_db_id(op.obj)
            if PublicIdentity(op.value["sign"], op.value["box"]).oid != oid:
                raise ForgedUpdate("object id does not match its public key", update.id)
    if len(update.ops) > 1 and any(op.op in AUTH_OPS for op in update.ops):
        # Keeps authorization state independent of other updates' verdicts (see merge.py).
        if len({op.obj for op in update.ops}) > 1:
            raise MalformedUpdate("an update that grants or revokes changes only one object")
    others = {op.obj for op in update.ops} - {update.caller}
    if not {obj for obj, _ in update.grants} <= others:
        raise MalformedUpdate("g names an object the update does not change")
    for op in update.ops:  # the shapes that changed between protocol versions
        if op.op == "revoke_update" and ("f" in op.value) != (update.version >= 2):
            raise MalformedUpdate(f"a revoke_update of protocol version {update.version} "
                                  f"{'must name' if update.version >= 2 else 'has no'} "
                                  "a frontier (f)")
        envelope = _envelope_of(op)
        if envelope is not None and ("b" in envelope) != (update.version >= 2):
            raise MalformedUpdate(f"an encrypted value of protocol version {update.version} "
                                  f"is a map with keys {'b' if update.version >= 2 else 'c'}, k")


def _envelope_of(op: Op) -> Any:
    if op.op == "set_enc":
        return op.value
    if op.op in ("dset_enc", "lins_enc", "lset_enc"):
        return op.value[1]
    return None


# Object ids and field names that passed their check lately: an update names the same
# few again and again. Emptied when full, so hostile input costs no more than the limit.
_CHECKED_IDS: set[str] = set()
_CHECKED_NAMES: set[str] = set()
_CHECKED_LIMIT = 4096


def _check_db_id(db_id: Any) -> None:
    if type(db_id) is str and db_id in _CHECKED_IDS:
        return
    if not isinstance(db_id, str) or len(db_id) > MAX_DB_ID:
        raise MalformedUpdate("object id must be a string of at most 97 characters")
    split_db_id(db_id)
    _remember(_CHECKED_IDS, db_id)


def _check_field_name(name: Any) -> None:
    if type(name) is str and name in _CHECKED_NAMES:
        return
    if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name):
        raise MalformedUpdate(f"bad field name {str(name)[:80]!r}: letters, digits, _ "
                              f"(max {MAX_FIELD_NAME})")
    _remember(_CHECKED_NAMES, name)


def _remember(checked: set[str], text: str) -> None:
    if len(checked) >= _CHECKED_LIMIT:
        checked.clear()
    checked.add(text)


def _check_op(op: Op) -> None:
    if not isinstance(op.op, str) or op.op not in ALL_OPS:
        raise MalformedUpdate(f"unknown operation {str(op.op)[:40]!r}")
    _check_db_id(op.obj)
    kind, name, value = op.op, op.field, op.value
    if kind in FIELD_OPS:
        _check_field_name(name)
    elif name != "":
        raise MalformedUpdate(f"operation {kind} takes no field name")
    if kind == "set":
        check_value(value)
    elif kind == "set_enc":
        _check_envelope_value(value)
    elif kind in ("del", "remove"):
        if value is not None:
            raise MalformedUpdate(f"operation {kind} takes no value")
    elif kind in ("dset", "dset_enc"):
        if not isinstance(value, list) or len(value) != 2:
            raise MalformedUpdate("dict set value is [key, value]")
        _check_dict_key(value[0])
        if kind == "dset":
            check_value(value[1])
        else:
            _check_envelope_value(value[1])
    elif kind == "ddel":
        _check_dict_key(value)
    elif kind in ("lins", "lins_enc", "lset", "lset_enc"):
        if not isinstance(value, list) or len(value) != 2:
            raise MalformedUpdate(f"{kind} value is [position or element id, value]")
        if kind.startswith("lins"):
            _check_position(value[0])
        else:
            _check_element_id(value[0])
        if kind.endswith("_enc"):
            _check_envelope_value(value[1])
        else:
            check_value(value[1])
    elif kind == "ldel":
        _check_element_id(value)
    elif kind == "create":
        _check_create_value(value)
    elif kind in AUTH_OPS:
        expected = {"id", "w"} if kind == "grant_read" else {"id"}
        if kind == "revoke_update" and isinstance(value, dict) and "f" in value:
            expected = {"id", "f"}
        if not isinstance(value, dict) or set(value) != expected:
            raise MalformedUpdate(f"{kind} value must be a map with keys {sorted(expected)}")
        _check_db_id(value["id"])
        if "f" in value:
            _check_frontier(value["f"])
        if kind == "grant_read":
            wraps = value["w"]
            if not isinstance(wraps, dict) or len(wraps) > MAX_OPS * 4:
                raise MalformedUpdate("grant_read wraps must be a map of ref -> wrapped key")
            for ref, wrapped in wraps.items():
                if not isinstance(ref, bytes) or len(ref) != REF_SIZE:
                    raise MalformedUpdate("a value reference is 34 bytes")
                if not isinstance(wrapped, bytes) or len(wrapped) > 128:
                    raise MalformedUpdate("a wrapped key is at most 128 bytes")


def _check_frontier(frontier: Any) -> None:
    if not isinstance(frontier, list):
        raise MalformedUpdate("a revoke's frontier is a list of update ids")
    if len(frontier) > MAX_FRONTIER:
        raise OversizedUpdate(f"a revoke names {len(frontier)} updates, limit {MAX_FRONTIER}")
    if any(not isinstance(uid, bytes) or len(uid) != UPDATE_ID_SIZE for uid in frontier):
        raise MalformedUpdate("a frontier entry is a 32-byte update id")
    if len(set(frontier)) != len(frontier) or frontier != sorted(frontier):
        raise MalformedUpdate("a frontier is sorted and names each update once")


def _check_position(pos: Any) -> None:
    if not isinstance(pos, bytes) or not pos or len(pos) > MAX_POSITION or 0 in pos \
            or pos[-1] == 1:
        raise MalformedUpdate(f"a list position is 1..{MAX_POSITION} non-zero bytes, "
                              "not ending in 1")


def _check_element_id(ref: Any) -> None:
    if not isinstance(ref, bytes) or len(ref) != REF_SIZE:
        raise MalformedUpdate("a list element id is 34 bytes")


def _check_dict_key(key: Any) -> None:
    if not isinstance(key, str) or not key or len(key) > MAX_DICT_KEY:
        raise MalformedUpdate("a dict key is a non-empty string of at most 256 characters")


def _check_create_value(value: Any) -> None:
    if not isinstance(value, dict) or set(value) != {"sign", "box", "read", "update"}:
        raise MalformedUpdate("create value must be a map with keys sign, box, read, update")
    for name in ("sign", "box"):
        if not isinstance(value[name], bytes) or len(value[name]) != KEY_SIZE:
            raise MalformedUpdate(f"create {name} key must be 32 bytes")
    for name in ("read", "update"):
        ids = value[name]
        if not isinstance(ids, list):
            raise MalformedUpdate(f"create {name} must be a list of ids")
        if len(ids) > MAX_AUTH_IDS:
            raise OversizedUpdate(f"create {name}: {len(ids)} ids, limit {MAX_AUTH_IDS}")
        for item in ids:
            _check_db_id(item)


def _check_envelope_value(value: Any) -> None:
    if not isinstance(value, dict) or (set(value) != {"b", "k"} and set(value) != {"c", "k"}):
        raise MalformedUpdate("an encrypted value is a map with keys b, k")
    sealed = value.get("b", value.get("c"))
    if not isinstance(sealed, bytes):
        raise MalformedUpdate("ciphertext must be bytes")
    if len(sealed) > MAX_VALUE_SIZE + 64:
        raise OversizedUpdate(f"ciphertext over {MAX_VALUE_SIZE} bytes")
    wraps = value["k"]
    if not isinstance(wraps, dict) or len(wraps) > MAX_READERS:
        raise MalformedUpdate("wrapped keys must be a map oid -> key")
    for oid, wrapped in wraps.items():
        if not isinstance(oid, str) or len(oid) > 32 or not isinstance(wrapped, bytes) \
                or len(wrapped) > 128:
            raise MalformedUpdate("a wrapped key is oid -> bytes (at most 128)")


def check_value(value: Any) -> None:
    """Raise MalformedUpdate/OversizedUpdate unless ``value`` can be a field value."""
    _check_shape(value, 0)
    if type(value) is str and len(value) <= _SURELY_SMALL_STR:
        return  # packed: at most 4 bytes a character and a 5-byte header
    if type(value) is bytes and len(value) <= MAX_VALUE_SIZE - 5:
        return
    if isinstance(value, (str, bytes, list, dict)):
        size = len(msgpack.packb(value, use_bin_type=True))
        if size > MAX_VALUE_SIZE:
            raise OversizedUpdate(f"value is {size} bytes packed, limit {MAX_VALUE_SIZE}")


def _check_shape(value: Any, depth: int) -> None:
    if isinstance(value, float) and value != value:
        raise MalformedUpdate("NaN is refused: it equals nothing, itself included, so no "
                              "read of it could be verified")
    if value is None or isinstance(value, (bool, float, str, bytes)):
        return
    if isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise MalformedUpdate("integers are limited to 64 bits")
        return
    if depth >= MAX_NESTING:
        raise MalformedUpdate(f"value nested deeper than {MAX_NESTING}")
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_shape(item, depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise MalformedUpdate("map keys in values must be strings")
            _check_shape(item, depth + 1)
        return
    raise MalformedUpdate(f"values of type {type(value).__name__} cannot be stored")


_idle_packers: list[msgpack.Packer] = []  # for reuse; a pack takes one while it packs


def pack_value(value: Any) -> bytes:
    """Canonical bytes of a plain value (what an encrypted field seals, a register stores)."""
    # packb builds a Packer per call; reusing one costs a third of that. A Packer keeps a
    # buffer, so a pack takes one for itself (list.pop is atomic): two threads, or a pack
    # re-entered from a finalizer the collector ran mid-pack, never share one.
    try:
        packer = _idle_packers.pop()
    except IndexError:
        packer = msgpack.Packer(use_bin_type=True)
    try:
        return packer.pack(value)
    finally:
        if len(_idle_packers) < 16:
            _idle_packers.append(packer)


def unpack_value(data: bytes) -> Any:
    """Inverse of pack_value."""
    return msgpack.unpackb(data, raw=False, strict_map_key=True)
