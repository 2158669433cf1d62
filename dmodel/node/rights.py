"""What a local write says about authorization: the grant it writes under, a revoke's
frontier, and no writes to removed objects. Reads the store; runs on the writing
thread, under the apply lock (inside ``Node.write``), so what it reads is what the
update is decided against. The rules themselves are in ``merge`` (module docstring).
"""

from __future__ import annotations

from collections.abc import Sequence

from .. import merge
from ..errors import ConfigurationError, ObjectNotFoundError
from ..store.base import Store
from ..update import MAX_FRONTIER, Op, decode


def grants_for(store: Store, caller: str, ops: Sequence[Op]) -> dict[str, bytes]:
    """The update-grant ``caller`` writes under, for each other object ``ops`` change.

    An object where ``caller`` holds no open grant gets none (the update is then
    unauthorized there, and the node's policy decides). Raises ObjectNotFoundError for
    an object removed here: nobody would apply the update.
    """
    grants = {}
    for db_id in dict.fromkeys(op.obj for op in ops if op.op != "create"):
        meta = store.object_meta(db_id)
        if meta is not None and meta.removed is not None:
            raise ObjectNotFoundError(f"{db_id} was removed; it cannot be changed")
        if db_id == caller:
            continue
        ref = merge.open_grant(store.member_events(db_id, "u", caller))
        if ref is not None:
            grants[db_id] = ref
    return grants


def revoke_update_op(store: Store, db_id: str, member: str) -> Op:
    """A revoke_update op naming its frontier: ``member``'s updates of ``db_id`` accepted
    here. They stay valid everywhere; every other update of the member that names the
    closed window is refused, whatever its timestamp."""
    uids = store.history(db_id)
    frontier = sorted(uid for uid, raw in zip(uids, store.raw_updates(uids), strict=True)
                      if raw is not None and decode(raw).caller == member)
    if len(frontier) > MAX_FRONTIER:
        raise ConfigurationError(
            f"{member} has {len(frontier)} accepted updates of {db_id}; one revoke names "
            f"at most {MAX_FRONTIER}")
    return Op(db_id, "revoke_update", "", {"id": member, "f": frontier})


__all__ = ["grants_for", "revoke_update_op"]
