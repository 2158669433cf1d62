"""Shared builders and hypothesis strategies for updates (deterministic identities)."""

from __future__ import annotations

import msgpack
from hypothesis import strategies as st

from dmodel.crypto import Identity
from dmodel.update import Op, Update

NODE = bytes(range(16))
T0 = 1_700_000_000_000 << 16  # an HLC timestamp (physical ms << 16)


def ident(i: int) -> Identity:
    """A deterministic identity: seed = 32 times the byte ``i``."""
    return Identity.from_seed(bytes([i]) * 32)


def db_id(identity: Identity, model: str = "Person") -> str:
    return f"{model}:{identity.oid}"


def create_op(identity: Identity, model: str = "Person", read=(), update=()) -> Op:
    return Op(db_id(identity, model), "create", "", {
        "sign": identity.public.verify_key, "box": identity.public.box_key,
        "read": list(read), "update": list(update)})


def signed(identity: Identity, ops, *, ts: int = T0, prev: bytes = b"", node: bytes = NODE,
           model: str = "Person", caller: str | None = None,
           grants: dict[str, bytes] | None = None) -> Update:
    """An update signed by ``identity`` as caller ``caller`` (default: its own db_id),
    naming ``grants`` (object -> grant ref) for the objects it changes as a member."""
    return Update.create(identity, node=node, caller=caller or db_id(identity, model),
                         timestamp=ts, prev=prev, ops=ops, grants=grants)


def grant_ref(update: Update, index: int = 0) -> bytes:
    """The ref of op ``index`` of ``update``: what a member names to write under a grant."""
    return update.id + index.to_bytes(2, "big")


def body_raw(body: object, signature: bytes = bytes(64)) -> bytes:
    """Raw bytes of an arbitrary (possibly invalid) body behind a dummy signature."""
    return signature + msgpack.packb(body, use_bin_type=True)


# ------------------------------------------------------------------ values

ints64 = st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
scalars = st.one_of(
    st.none(), st.booleans(), ints64, st.floats(allow_nan=False),
    st.text(max_size=20), st.binary(max_size=20),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=8), children, max_size=4),
    ),
    max_leaves=12,
)
field_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True)
dict_keys = st.text(min_size=1, max_size=12)
