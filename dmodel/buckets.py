"""How objects fall into buckets, and buckets into groups, for state sums: shared by
the node, which keeps the sums (``dmodel.node.statesum``), and the catch-up protocol,
which compares them (``dmodel.net.sync``)."""

from __future__ import annotations

import hashlib

GROUPS = 64
BUCKETS_PER_GROUP = 64
BUCKETS = GROUPS * BUCKETS_PER_GROUP
SUM_SIZE = 16  # bytes of a sum or an object's state digest


def bucket_of(db_id: str) -> int:
    """The bucket of an object (the same on every peer)."""
    return int.from_bytes(hashlib.blake2b(db_id.encode(), digest_size=4).digest(),
                          "big") % BUCKETS


__all__ = ["BUCKETS", "BUCKETS_PER_GROUP", "GROUPS", "SUM_SIZE", "bucket_of"]
