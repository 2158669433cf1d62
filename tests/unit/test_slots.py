"""quick_init: a frozen slotted dataclass with the faster __init__ behaves as before."""

from __future__ import annotations

import dataclasses
from dataclasses import InitVar, dataclass, field

import pytest

from dmodel._slots import quick_init
from dmodel.errors import MalformedUpdate
from dmodel.merge import Register
from dmodel.update import Op


def test_a_quick_init_class_keeps_its_dataclass_behaviour() -> None:
    reg = Register(b"v", 5)
    assert (reg.version, reg.value, reg.encrypted, reg.deleted) == (b"v", 5, False, False)
    assert reg == Register(version=b"v", value=5) and hash(reg) == hash(Register(b"v", 5))
    assert repr(reg) == "Register(version=b'v', value=5, encrypted=False, deleted=False)"
    with pytest.raises(dataclasses.FrozenInstanceError):
        reg.value = 6  # type: ignore[misc]
    assert dataclasses.replace(reg, deleted=True) == Register(b"v", 5, False, True)
    with pytest.raises(TypeError):
        Register()  # type: ignore[call-arg]


def test_quick_init_runs_post_init() -> None:
    with pytest.raises(MalformedUpdate):  # Op checks itself in __post_init__
        Op("not an id", "set", "name", 1)


def test_quick_init_refuses_what_it_cannot_build() -> None:
    with pytest.raises(TypeError):
        @quick_init
        @dataclass(frozen=True, slots=True)
        class WithFactory:
            items: list[int] = field(default_factory=list)
    with pytest.raises(TypeError):
        @quick_init
        @dataclass(frozen=True, slots=True)
        class WithInitVar:
            a: int
            b: InitVar[int] = 0
