"""The public surface is explicit: changing it is a decision, so this test names it."""

from __future__ import annotations

import dmodel
from dmodel import errors


def test_public_names_are_pinned() -> None:
    assert sorted(dmodel.__all__) == sorted([
        "BrokenChainUpdate", "Change", "ConfigurationError", "Context", "CryptoError",
        "DAction", "DDict", "DField", "DList", "DModel", "DModelError", "DecryptionError",
        "EncryptedValue", "FieldError", "FieldTypeError", "FieldValueError", "ForgedUpdate",
        "IntegrityError", "InvalidUpdate", "KeyringError", "MalformedUpdate",
        "ModelDefinitionError", "NetworkError", "Node", "NodeNotRunningError",
        "ObjectNotFoundError", "OversizedUpdate", "RejectedError", "ReplayedUpdate",
        "StaleUpdate", "StoreError", "StoreUnavailableError", "UnauthorizedError",
        "VetoedError", "default_node", "launch", "object_list",
        "object_list_owned", "set_loglevel", "shutdown", "transaction", "wait_for",
    ])
    for name in dmodel.__all__:
        assert getattr(dmodel, name) is not None


def test_every_exception_derives_from_the_root() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.DModelError), name
        assert getattr(dmodel, name, cls) is cls
    assert issubclass(errors.InvalidUpdate, ValueError)
    assert issubclass(errors.ObjectNotFoundError, LookupError)
    assert issubclass(errors.FieldTypeError, TypeError)
    assert issubclass(errors.ProtocolError, errors.NetworkError)
    assert issubclass(errors.ProtocolError, ValueError)
    assert issubclass(errors.WaitTimeout, TimeoutError)


def test_the_tools_raise_from_the_tree() -> None:
    from dmodel.tools import demo, peer

    assert issubclass(errors.CommandError, errors.ToolError)
    assert issubclass(errors.DemoFailure, errors.ToolError)
    assert peer.CommandError is errors.CommandError
    assert demo.DemoFailure is errors.DemoFailure
