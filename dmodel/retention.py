"""Retention: which superseded versions of a register a node keeps. Pure, no I/O.

The store keeps every signed update that still contributes to the state: current
register winners (tombstones included), creates, removals, grants and revokes, the
inserts of live DList elements and every DList delete. A version that a newer one
superseded contributes nothing, and retention decides how long it stays:

* ``N`` (an int): the last N versions of each register, the current one included; the
  default is ``DEFAULT_VERSIONS`` (10), so a register costs a bounded amount however
  often it is written;
* ``all``: forever (for audit use: the store then grows with every write);
* a time (``"7d"``, ``"12h"``, ``"30m"``, ``"90s"``): superseded versions whose
  timestamps are younger than that, at least the current one.

One rule comes before retention, because authorization may still change a verdict
(merge.py): a version superseded by a write that a later revoke could retract must stay,
or the register could not fall back to it. A write cannot be retracted when it is the
object's own, when this node owns the object (the owner's revoke names everything its
node accepted), or when it is named in a revoke's frontier. Versions superseded only by
retractable writes are kept up to ``MAX_UNANCHORED`` per register; past that the oldest
go (a revoke that retracts more writes than that, all unseen by the owner, would leave
the register at an older value than ``merge.fold`` gives: documented, and measured by
nobody yet).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .clock import physical_ms
from .errors import ConfigurationError
from .merge import version_timestamp

DEFAULT_VERSIONS = 10
MAX_UNANCHORED = 100

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_TIME = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


@dataclass(frozen=True, slots=True)
class Retention:
    """How many superseded versions to keep: all, the last ``versions``, or ``seconds``."""

    versions: int | None = DEFAULT_VERSIONS  # None (and no seconds): keep all
    seconds: float | None = None

    @property
    def keeps_all(self) -> bool:
        return self.versions is None and self.seconds is None

    @classmethod
    def parse(cls, spec: object) -> Retention:
        """``"all"``, a number of versions (``5``, ``"5"``), or a time (``"7d"``)."""
        if isinstance(spec, Retention):
            return spec
        if spec is None:
            return cls()  # the default
        if isinstance(spec, bool):
            raise ConfigurationError("retention is 'all', a number of versions or a time")
        if isinstance(spec, int):
            if spec < 1:
                raise ConfigurationError("retention keeps at least 1 version (the current)")
            return cls(versions=spec)
        text = str(spec).strip().lower()
        if text == "all":
            return cls(versions=None)
        if text.isdigit():
            return cls.parse(int(text))
        match = _TIME.fullmatch(text)
        if match:
            return cls(versions=None, seconds=float(match[1]) * _UNITS[match[2]])
        raise ConfigurationError(
            f"retention {spec!r}: use 'all', a number of versions (e.g. 10) or a time such "
            "as '7d', '12h', '30m', '90s'")

    def __str__(self) -> str:
        if self.keeps_all:
            return "all"
        if self.seconds is not None:
            return f"{self.seconds:g}s"
        return f"{self.versions} versions"


def keep(kept: list[bytes], current: bytes, *, anchored: bool, policy: Retention,
         now_ms: int) -> tuple[list[bytes], list[bytes]]:
    """Split a register's superseded versions (ascending) into (still kept, dropped).

    ``current`` is the register's winning version now and ``anchored`` whether it can
    no longer be retracted (see the module docstring).
    """
    if not kept or kept[-1] < current:  # the common case: all older than the winner
        older, newer = kept, []
    else:
        older = sorted(v for v in kept if v < current)
        newer = [v for v in kept if v >= current]  # not superseded (yet): re-decided
    if policy.keeps_all:
        return kept, []
    if not anchored:
        cut = max(0, len(older) - MAX_UNANCHORED)
    elif policy.seconds is not None:
        horizon = now_ms - int(policy.seconds * 1000)
        cut = sum(1 for v in older if physical_ms(version_timestamp(v)) < horizon)
    else:
        assert policy.versions is not None
        cut = max(0, len(older) - (policy.versions - 1))
    return older[cut:] + newer, older[:cut]


__all__ = ["DEFAULT_VERSIONS", "MAX_UNANCHORED", "Retention", "keep"]
