"""The node package: one peer, cut along its seams.

    core.py     Node, the facade: set-up, local writes, reads, lifecycle
    applier.py  Applier: the apply lock; snapshot -> decide -> before -> commit -> after
                -> notify, for local writes (caller's thread) and updates from peers
                (the network's apply and sync threads); Stats
    pending.py  the bounded set of updates waiting for a missing dependency
    sealing.py  encrypted values: readers, sealing, grant_read wraps, opening
    audit.py    verify_register, verify_store, state_digest, history
    home.py     the home: its lock, node id, keyring and store (embedded or by URL)
    default.py  the default node of ``dmodel.launch()``

Only ``dmodel/__init__.py``, ``dmodel/cli.py`` and ``dmodel/tools/`` import this package;
the layers below reach a node through the ``dmodel.host.ModelHost`` protocol.
"""

from ..config import default_home
from .applier import Applier, Stats
from .audit import HistoryEntry
from .core import Node
from .default import default_node, launch, shutdown

__all__ = ["Applier", "HistoryEntry", "Node", "Stats", "default_home", "default_node",
           "launch", "shutdown"]
