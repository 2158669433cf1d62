"""Id patterns for listeners, compiled once into matchers.

A listener is applied to a pattern that is matched against the *key* of a change:

    Model:oid                    an object (create, remove)
    Model:oid:field              a field (update, delete)
    Model:oid:field:dictkey      one entry of a DDict field

Grammar (everything else is literal text, compared exactly and case-sensitively):

    [id]    one or more characters, none of them a colon (one id segment)
    *       any text, possibly empty, colons included

So ``Person:[id]`` matches ``Person:abc`` but not ``Person:abc:name``;
``Person:[id]:*`` matches every field key of every Person (not the object keys);
``Person:*`` matches object and field keys of Person; ``*`` matches every key.
``[`` must open ``[id]`` and ``]`` must close it; any other use is an error.

Pure: no I/O. Matching never backtracks badly: patterns with more than one ``*``
run on a bit-parallel automaton, linear in the key length.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Final

from dmodel.errors import ConfigurationError

__all__ = ["MAX_PATTERN_LENGTH", "Filter", "compile"]

MAX_PATTERN_LENGTH: Final = 1024

_PLACEHOLDERS: Final = ("id",)

# Token kinds after parsing.
_LIT, _ID, _STAR = 0, 1, 2

# How a Filter matches.
_EXACT, _ANY, _PREFIX, _REGEX, _NFA = range(5)

_Token = tuple[int, str]


@dataclass(frozen=True, slots=True)
class Filter:
    """A compiled id pattern; build it with :func:`compile`.

    ``model`` is the literal model name when the pattern starts with one (such as
    ``Person`` in ``Person:[id]:*``), else None; every key the filter matches then
    starts with ``model + ":"`` or equals ``model``.
    """

    pattern: str
    model: str | None
    _how: int = field(default=_EXACT, repr=False, compare=False)
    _text: str = field(default="", repr=False, compare=False)
    _regex: re.Pattern[str] | None = field(default=None, repr=False, compare=False)
    _nfa: _Automaton | None = field(default=None, repr=False, compare=False)
    field_name: str | None = field(default=None, repr=False, compare=False)
    """The field when the pattern is ``Model:<id>:field`` with a literal field and no ``*``:
    it then matches only keys whose field is exactly that (the registry indexes it)."""

    def match(self, key: str) -> bool:
        """True if ``key`` matches the whole pattern."""
        how = self._how
        if how == _EXACT:
            return key == self._text
        if how == _PREFIX:
            return key.startswith(self._text)
        if how == _ANY:
            return True
        if how == _REGEX:
            return self._regex.fullmatch(key) is not None  # type: ignore[union-attr]
        return self._nfa.run(key)  # type: ignore[union-attr]

    def __str__(self) -> str:
        return self.pattern


def compile(pattern: str | Filter) -> Filter:
    """Compile ``pattern`` into a :class:`Filter`; a Filter is returned unchanged.

    Raises ConfigurationError for an empty, over-long or malformed pattern.
    """
    if isinstance(pattern, Filter):
        return pattern
    if not isinstance(pattern, str):
        raise ConfigurationError(
            f"a filter pattern must be a str, not {type(pattern).__name__}"
        )
    if not pattern:
        raise ConfigurationError("empty filter pattern (use '*' to match every key)")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ConfigurationError(
            f"filter pattern of {len(pattern)} characters is over the limit of "
            f"{MAX_PATTERN_LENGTH}"
        )
    tokens = _parse(pattern)
    model = _literal_model(tokens)
    stars = sum(1 for kind, _ in tokens if kind == _STAR)
    ids = sum(1 for kind, _ in tokens if kind == _ID)
    flt = _compile(pattern, tokens, model, stars, ids)
    name = _literal_field(tokens, model, stars)
    return flt if name is None else dataclasses.replace(flt, field_name=name)


def _literal_field(tokens: list[_Token], model: str | None, stars: int) -> str | None:
    """The third segment of a three-segment pattern without '*' if it is literal."""
    if model is None or stars or tokens[-1][0] != _LIT:
        return None
    if sum(text.count(":") for kind, text in tokens if kind == _LIT) != 2:
        return None
    last = tokens[-1][1]
    if ":" not in last:
        return None
    return last.rpartition(":")[2] or None


def _compile(pattern: str, tokens: list[_Token], model: str | None, stars: int,
             ids: int) -> Filter:

    if stars == 0 and ids == 0:
        return Filter(pattern, model, _EXACT, tokens[0][1])
    if stars == 1 and ids == 0 and tokens[-1][0] == _STAR:
        if len(tokens) == 1:
            return Filter(pattern, model, _ANY)
        return Filter(pattern, model, _PREFIX, tokens[0][1])
    if stars <= 1 and _ids_end_at_colons(tokens):
        # At most one '*', and every [id] runs up to a colon or the end, so the regex
        # engine has one run to backtrack over: quadratic at worst in the key length.
        return Filter(pattern, model, _REGEX, _regex=re.compile(_to_regex(tokens), re.DOTALL))
    return Filter(pattern, model, _NFA, _nfa=_Automaton(tokens))


def _ids_end_at_colons(tokens: list[_Token]) -> bool:
    """True if each [id] is followed by the end or by literal text starting with ':'."""
    for i, (kind, _) in enumerate(tokens):
        if kind == _ID and i + 1 < len(tokens):
            next_kind, next_text = tokens[i + 1]
            if next_kind != _LIT or not next_text.startswith(":"):
                return False
    return True


def _parse(pattern: str) -> list[_Token]:
    """Split into literal, [id] and * tokens; merge runs of literals and of stars."""
    tokens: list[_Token] = []
    literal: list[str] = []

    def push(kind: int, text: str = "") -> None:
        if literal:
            tokens.append((_LIT, "".join(literal)))
            literal.clear()
        if kind == _STAR and tokens and tokens[-1][0] == _STAR:
            return
        tokens.append((kind, text))

    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            push(_STAR)
            i += 1
        elif c == "[":
            close = pattern.find("]", i + 1)
            inner_open = pattern.find("[", i + 1)
            if close < 0 or (0 <= inner_open < close):
                raise ConfigurationError(
                    f"unbalanced '[' at position {i} in filter pattern {pattern!r}"
                )
            name = pattern[i + 1 : close]
            if name not in _PLACEHOLDERS:
                known = ", ".join(f"[{p}]" for p in _PLACEHOLDERS)
                raise ConfigurationError(
                    f"unknown placeholder [{name}] in filter pattern {pattern!r} "
                    f"(known: {known} and *)"
                )
            push(_ID)
            i = close + 1
        elif c == "]":
            raise ConfigurationError(
                f"unbalanced ']' at position {i} in filter pattern {pattern!r}"
            )
        else:
            literal.append(c)
            i += 1
    if literal:
        tokens.append((_LIT, "".join(literal)))
    return tokens


def _literal_model(tokens: list[_Token]) -> str | None:
    """The pattern's first segment if it is non-empty literal text, else None."""
    kind, text = tokens[0]
    if kind != _LIT:
        return None
    head, colon, _ = text.partition(":")
    if not head:
        return None
    if colon or len(tokens) == 1:
        return head
    # The literal runs into a wildcard before any colon ("Per*", "Person[id]").
    return None


def _to_regex(tokens: list[_Token]) -> str:
    parts = []
    for kind, text in tokens:
        if kind == _LIT:
            parts.append(re.escape(text))
        elif kind == _ID:
            parts.append("[^:]+")
        else:
            parts.append(".*")
    return "".join(parts)


class _Automaton:
    """Bit-parallel NFA (shift-and) for patterns with several ``*``.

    Bit i set means "the first i steps of the pattern are matched". Steps are single
    characters (literal text), NC (one non-colon character), NCLOOP (zero or more
    non-colons: the rest of an [id]) and ANYLOOP (``*``). Loops are epsilon steps.
    """

    __slots__ = ("_lit", "_nc", "_any_loop", "_loops", "_eps", "_accept", "_start",
                 "_head", "_tail", "_min_len")

    def __init__(self, tokens: list[_Token]) -> None:
        lit: dict[str, int] = {}
        nc = any_loop = nc_loop = 0
        pos = min_len = 0
        for kind, text in tokens:
            if kind == _LIT:
                for ch in text:
                    lit[ch] = lit.get(ch, 0) | (1 << pos)
                    pos += 1
                min_len += len(text)
            elif kind == _ID:
                nc |= 1 << pos
                nc_loop |= 1 << (pos + 1)
                pos += 2
                min_len += 1
            else:
                any_loop |= 1 << pos
                pos += 1
        self._lit = lit
        self._nc = nc
        self._any_loop = any_loop
        self._loops = any_loop | nc_loop
        self._eps = any_loop | nc_loop
        self._accept = 1 << pos
        self._start = self._closure(1)
        # Cheap necessary conditions that reject most keys before the automaton runs.
        self._head = tokens[0][1] if tokens[0][0] == _LIT else ""
        self._tail = tokens[-1][1] if tokens[-1][0] == _LIT else ""
        self._min_len = min_len

    def _closure(self, states: int) -> int:
        eps = self._eps
        while states & eps:
            more = states | ((states & eps) << 1)
            if more == states:
                break
            states = more
        return states

    def run(self, key: str) -> bool:
        if (
            len(key) < self._min_len
            or not key.startswith(self._head)
            or not key.endswith(self._tail)
        ):
            return False
        states = self._start
        lit, nc, any_loop, loops, eps = self._lit, self._nc, self._any_loop, self._loops, self._eps
        for ch in key:
            if ch == ":":
                states = ((states & lit.get(ch, 0)) << 1) | (states & any_loop)
            else:
                states = ((states & (lit.get(ch, 0) | nc)) << 1) | (states & loops)
            if not states:
                return False
            while states & eps:  # epsilon closure, inlined: this loop is the hot path
                more = states | ((states & eps) << 1)
                if more == states:
                    break
                states = more
        return bool(states & self._accept)
