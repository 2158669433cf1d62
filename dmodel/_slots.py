"""A faster ``__init__`` for the frozen slotted dataclasses on the write and apply paths.

A frozen dataclass's generated ``__init__`` sets each field through
``object.__setattr__`` looked up by name, which costs about twice what setting the slot
through its descriptor does; an update of 100 field changes builds several hundred such
objects (ops, registers, writes, events). ``quick_init`` replaces the generated method
with one that sets the slots directly. The class stays a frozen dataclass in every other
respect (equality, hash, repr, assignment refused), and mypy still sees the dataclass's
own signature.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, TypeVar

T = TypeVar("T")


def quick_init(cls: type[T]) -> type[T]:
    """Give the frozen, slotted dataclass ``cls`` an ``__init__`` that sets its slots
    directly (same parameters, defaults and ``__post_init__`` call)."""
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    if list(inspect.signature(cls).parameters) != [f.name for f in fields]:
        raise TypeError(f"quick_init: {cls.__name__} takes more than its fields")  # InitVar
    namespace: dict[str, Any] = {}
    args, body = [], []
    for i, f in enumerate(fields):
        if not f.init or f.kw_only or f.default_factory is not dataclasses.MISSING:
            raise TypeError(f"quick_init: {cls.__name__}.{f.name} needs the generated __init__")
        namespace[f"_set{i}"] = cls.__dict__[f.name].__set__
        if f.default is dataclasses.MISSING:
            args.append(f.name)
        else:
            namespace[f"_default{i}"] = f.default
            args.append(f"{f.name}=_default{i}")
        body.append(f"    _set{i}(self, {f.name})")
    if hasattr(cls, "__post_init__"):
        body.append("    self.__post_init__()")
    source = f"def __init__(self, {', '.join(args)}):\n" + "\n".join(body) + "\n"
    exec(source, namespace)  # noqa: S102 - built from the class's own field names
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__doc__ = cls.__init__.__doc__
    setattr(cls, "__init__", init)  # noqa: B010 - mypy refuses assigning a method
    return cls


__all__ = ["quick_init"]
