"""dmodel: a decentralized object-model ORM. See README.md.

    import dmodel
    dmodel.launch()

    class Person(dmodel.DModel):
        name = dmodel.DField('name', False)
        salary = dmodel.DField('salary', True)

    p = Person([])
    p.name.set('Bob')
"""

from __future__ import annotations

import logging

from .actions import Change, Context, DAction
from .crypto import EncryptedValue
from .errors import (
    BrokenChainUpdate,
    ConfigurationError,
    CryptoError,
    DecryptionError,
    DModelError,
    FieldError,
    FieldTypeError,
    FieldValueError,
    ForgedUpdate,
    IntegrityError,
    InvalidUpdate,
    KeyringError,
    MalformedUpdate,
    ModelDefinitionError,
    NetworkError,
    NodeNotRunningError,
    ObjectNotFoundError,
    OversizedUpdate,
    RejectedError,
    ReplayedUpdate,
    StaleUpdate,
    StoreError,
    StoreUnavailableError,
    UnauthorizedError,
    VetoedError,
)
from .model import (
    DDict,
    DField,
    DList,
    DModel,
    object_list,
    object_list_owned,
    transaction,
    wait_for,
)
from .node import Node, default_node, launch, shutdown

__version__ = "0.1.0"

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "warn": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL}


def set_loglevel(level: str | int) -> None:
    """Set the level of the ``dmodel`` logger (``'error'``, ``'info'``, ``logging.DEBUG``...).

    Adds no handler: configure logging in the application (e.g. ``logging.basicConfig()``).
    """
    if isinstance(level, str):
        try:
            level = _LEVELS[level.lower()]
        except KeyError:
            raise ConfigurationError(f"unknown log level {level!r}") from None
    logging.getLogger("dmodel").setLevel(level)


__all__ = [
    "BrokenChainUpdate",
    "Change",
    "ConfigurationError",
    "Context",
    "CryptoError",
    "DAction",
    "DDict",
    "DField",
    "DList",
    "DModel",
    "DModelError",
    "DecryptionError",
    "EncryptedValue",
    "FieldError",
    "FieldTypeError",
    "FieldValueError",
    "ForgedUpdate",
    "IntegrityError",
    "InvalidUpdate",
    "KeyringError",
    "MalformedUpdate",
    "ModelDefinitionError",
    "NetworkError",
    "Node",
    "NodeNotRunningError",
    "ObjectNotFoundError",
    "OversizedUpdate",
    "RejectedError",
    "ReplayedUpdate",
    "StaleUpdate",
    "StoreError",
    "StoreUnavailableError",
    "UnauthorizedError",
    "VetoedError",
    "default_node",
    "launch",
    "object_list",
    "object_list_owned",
    "set_loglevel",
    "shutdown",
    "transaction",
    "wait_for",
]
