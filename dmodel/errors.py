"""The dmodel exception tree. Every exception dmodel raises derives from DModelError.

    DModelError
    ├── ConfigurationError (ValueError)        bad launch()/env values
    │   ├── ModelDefinitionError               bad DModel/DField/DAction declaration
    │   └── StoreInUseError                    another running node holds this store's lock
    ├── NodeNotRunningError                    no node launched, or it was shut down
    ├── ObjectNotFoundError (LookupError)      unknown db_id (Model.DoesNotExist derives from it)
    ├── WaitTimeout (TimeoutError)             obj.wait()/wait_for(): nothing arrived in time
    ├── FieldError
    │   ├── FieldTypeError (TypeError)         value of the wrong type for the field
    │   └── FieldValueError (ValueError)       value too large or of an unsupported shape
    ├── CryptoError
    │   ├── DecryptionError                    "no decryption key found"
    │   └── KeyringError                       unreadable keyring, wrong passphrase, missing key
    ├── InvalidUpdate (ValueError)             a message that is not a valid update
    │   ├── MalformedUpdate                    not msgpack, missing/unknown keys, wrong types
    │   ├── OversizedUpdate                    over a size limit
    │   ├── ForgedUpdate                       bad signature, or oid != H(public key)
    │   ├── ReplayedUpdate                     already seen (same update id)
    │   ├── StaleUpdate                        held too long for its future timestamp
    │   ├── ConflictingCreate                  a second create of an id, with other keys
    │   └── BrokenChainUpdate                  previous-update link points outside its chain
    ├── RejectedError                          a valid update that was not accepted
    │   ├── UnauthorizedError                  caller not authorized (default policy)
    │   └── VetoedError                        a before-listener raised (see __cause__)
    ├── StoreError                             wraps redis-py errors (__cause__ kept)
    │   ├── StoreUnavailableError              Redis cannot be reached / started
    │   └── IntegrityError                     stored data does not match its signed update
    ├── NetworkError                           bind failure, bus thread died
    │   └── ProtocolError (ValueError)         a peer's sync message that breaks the protocol
    └── ToolError                              the tools of the `dmodel` command (dmodel.tools)
        ├── CommandError                       a `dmodel peer` command that failed (.code)
        └── DemoFailure                        a `dmodel demo` step did not behave as narrated
"""

from __future__ import annotations

from typing import Any


class DModelError(Exception):
    """Root of every error raised by dmodel."""


class ConfigurationError(DModelError, ValueError):
    """A bad configuration value (launch() argument or DMODEL_* variable)."""


class ModelDefinitionError(ConfigurationError):
    """A model, field or listener declaration that cannot work."""


class StoreInUseError(ConfigurationError):
    """Another running node uses this Redis database and prefix (it holds the lock key)."""


class NodeNotRunningError(DModelError):
    """No node is running: call dmodel.launch() first, or pass node=..."""


class ObjectNotFoundError(DModelError, LookupError):
    """No object with this db_id is known to the node."""


class WaitTimeout(DModelError, TimeoutError):
    """A wait (``obj.wait()``, ``field.wait()``, ``dmodel.wait_for()``) ran out of time."""


class FieldError(DModelError):
    """A problem with a field value."""


class FieldTypeError(FieldError, TypeError):
    """A value of the wrong type for the field."""


class FieldValueError(FieldError, ValueError):
    """A value too large or of an unsupported shape."""


class QueryError(FieldError, ValueError):
    """A query that cannot be answered: an encrypted or unknown field, a value that
    cannot be compared (``Model.find``, ``Model.query()``)."""


class CryptoError(DModelError):
    """A cryptographic operation failed."""


class DecryptionError(CryptoError):
    """The value is encrypted and no key this node holds can open it."""


class KeyringError(CryptoError):
    """The keyring cannot be read, the passphrase is wrong, or a key is missing."""


class InvalidUpdate(DModelError, ValueError):
    """A message that is not a valid update. Carries ``update_id`` when it is known."""

    def __init__(self, message: str, update_id: bytes | None = None) -> None:
        super().__init__(message)
        self.update_id = update_id


class MalformedUpdate(InvalidUpdate):
    """Not msgpack, or missing/unknown keys, or values of the wrong type."""


class OversizedUpdate(InvalidUpdate):
    """A message or one of its fields exceeds a size limit."""


class ForgedUpdate(InvalidUpdate):
    """The signature does not verify, or an id does not match its public key."""


class ReplayedUpdate(InvalidUpdate):
    """This update was seen before."""


class StaleUpdate(InvalidUpdate):
    """A future-dated update that did not fit among the held ones (catch-up brings it again)."""


class ConflictingCreate(InvalidUpdate):
    """A create of an existing id with other public keys: the identity equivocated."""


class BrokenChainUpdate(InvalidUpdate):
    """The previous-update link does not belong to the caller's chain."""


class RejectedError(DModelError):
    """A valid update that this node did not accept."""

    def __init__(self, message: str, db_id: str | None = None) -> None:
        super().__init__(message)
        self.db_id = db_id


class UnauthorizedError(RejectedError):
    """The caller may not make this change (and the policy does not defer to listeners)."""


class VetoedError(RejectedError):
    """A before-listener raised; ``__cause__`` is the listener's exception."""

    def __init__(
        self,
        message: str,
        db_id: str | None = None,
        listener: Any = None,
        callback: str | None = None,
    ) -> None:
        super().__init__(message, db_id)
        self.listener = listener
        self.callback = callback


class StoreError(DModelError):
    """The store failed; ``__cause__`` is the redis-py error."""


class StoreUnavailableError(StoreError):
    """Redis cannot be reached or the embedded server cannot start."""


class IntegrityError(StoreError):
    """Stored data does not match the signed update it claims to come from (tampering)."""


class NetworkError(DModelError):
    """A socket could not be bound, or the bus thread died."""


class ProtocolError(NetworkError, ValueError):
    """A message from a peer (sync request or reply) that does not follow the protocol."""


class ToolError(DModelError):
    """A failure of one of the tools behind the ``dmodel`` command (``dmodel.tools``)."""


class CommandError(ToolError):
    """A ``dmodel peer`` command that failed for a reason of the protocol itself.

    ``code`` is the ``error`` of the answer (``ProtocolError``, ``Timeout``,
    ``UnknownModel`` ...); a driver raises it for an answer that is not ok.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.code, str(self))


class DemoFailure(ToolError):
    """A step of ``dmodel demo`` did not behave as narrated."""


__all__ = [
    "BrokenChainUpdate",
    "CommandError",
    "ConfigurationError",
    "StoreInUseError",
    "ConflictingCreate",
    "CryptoError",
    "DModelError",
    "DecryptionError",
    "DemoFailure",
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
    "NodeNotRunningError",
    "ObjectNotFoundError",
    "OversizedUpdate",
    "ProtocolError",
    "QueryError",
    "RejectedError",
    "ReplayedUpdate",
    "StaleUpdate",
    "StoreError",
    "StoreUnavailableError",
    "ToolError",
    "UnauthorizedError",
    "VetoedError",
    "WaitTimeout",
]
