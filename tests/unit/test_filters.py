"""The id-pattern grammar of dmodel.filters."""

import pytest

from dmodel import filters
from dmodel.errors import ConfigurationError

OID = "3xk2abcdefghijklmnopqrstuvwxyz23"
OBJ = f"Person:{OID}"
FIELD = f"{OBJ}:name"
ENTRY = f"{OBJ}:tags:color"
OTHER = f"Company:{OID}"

KEYS = [OBJ, FIELD, ENTRY, OTHER, f"{OTHER}:name", f"{OBJ}:salary"]


@pytest.mark.parametrize(
    ("pattern", "matched"),
    [
        ("Person:[id]", {OBJ}),
        ("Person:[id]:*", {FIELD, ENTRY, f"{OBJ}:salary"}),
        ("Person:*", {OBJ, FIELD, ENTRY, f"{OBJ}:salary"}),
        ("Person:[id]:salary", {f"{OBJ}:salary"}),
        (f"Person:{OID}:name", {FIELD}),
        (OBJ, {OBJ}),
        ("*", set(KEYS)),
        ("[id]:[id]", {OBJ, OTHER}),
        ("[id]:[id]:name", {FIELD, f"{OTHER}:name"}),
        ("*:name", {FIELD, f"{OTHER}:name"}),
        ("Person:[id]:[id]", {FIELD, f"{OBJ}:salary"}),
        ("Person:[id]:tags:[id]", {ENTRY}),
        ("*:[id]:*:color", {ENTRY}),
        ("*n*", set(KEYS)),
        ("Comp*", {OTHER, f"{OTHER}:name"}),
        ("Person", set()),
    ],
)
def test_documented_patterns(pattern: str, matched: set[str]) -> None:
    flt = filters.compile(pattern)
    assert {k for k in KEYS if flt.match(k)} == matched


def test_id_needs_a_non_empty_segment() -> None:
    flt = filters.compile("Person:[id]")
    assert not flt.match("Person:")
    assert not flt.match("Person")
    assert flt.match("Person:x")


def test_star_matches_empty_text_and_colons() -> None:
    assert filters.compile("Person:*").match("Person:")
    assert filters.compile("a*b").match("ab")
    assert filters.compile("a*b").match("a:::b")
    assert filters.compile("a**b").match("ab")
    assert not filters.compile("Person:*").match("Person")


def test_literal_text_is_not_a_regex() -> None:
    flt = filters.compile("P.rson:(x)+")
    assert flt.match("P.rson:(x)+")
    assert not flt.match("Person:(x)+")
    assert not flt.match("P.rson:xx")


def test_matching_is_case_sensitive() -> None:
    assert not filters.compile("person:[id]").match(OBJ)


def test_keys_with_newlines() -> None:
    assert filters.compile("Person:*").match("Person:a\nb")
    assert filters.compile("*:x").match("a\n:x")
    assert filters.compile("Person:[id]").match("Person:a\nb")


@pytest.mark.parametrize(
    ("pattern", "model"),
    [
        ("Person:[id]", "Person"),
        ("Person:[id]:*", "Person"),
        ("Person:*", "Person"),
        (f"Person:{OID}:name", "Person"),
        ("Person", "Person"),
        ("*", None),
        ("[id]:[id]", None),
        ("Per*", None),
        ("Person*:x", None),
        ("Person[id]:x", None),
        (":x", None),
    ],
)
def test_model(pattern: str, model: str | None) -> None:
    assert filters.compile(pattern).model == model


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("", "empty"),
        ("Person:[id", "unbalanced '['"),
        ("Person:[", "unbalanced '['"),
        ("Person:[[id]]", "unbalanced '['"),
        ("Person:id]", "unbalanced ']'"),
        ("Person:[xyz]", "unknown placeholder [xyz]"),
        ("Person:[ID]", "unknown placeholder [ID]"),
        ("Person:[]", "unknown placeholder []"),
        ("x" * 1025, "over the limit of 1024"),
    ],
)
def test_invalid_patterns(pattern: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        filters.compile(pattern)


def test_invalid_pattern_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        filters.compile("")


def test_non_string_pattern() -> None:
    with pytest.raises(ConfigurationError, match="must be a str"):
        filters.compile(None)  # type: ignore[arg-type]


def test_longest_allowed_pattern() -> None:
    assert filters.compile("x" * 1024).match("x" * 1024)


def test_compile_returns_a_filter_unchanged() -> None:
    flt = filters.compile("Person:*")
    assert filters.compile(flt) is flt


def test_filter_is_frozen_and_compares_by_pattern() -> None:
    a, b = filters.compile("Person:*"), filters.compile("Person:*")
    assert a == b and hash(a) == hash(b)
    assert a != filters.compile("Person:**")
    assert str(a) == "Person:*" and a.pattern == "Person:*"
    with pytest.raises(AttributeError):
        a.pattern = "x"  # type: ignore[misc]


def test_many_stars_on_a_long_key() -> None:
    # A backtracking regex would take ages here; the automaton is linear.
    flt = filters.compile("*a*a*a*a*a*a*a*a*b")
    key = "a" * 2000
    assert not flt.match(key)
    assert flt.match(key + "b")
    colon_key = ":".join(["x"] * 1000)
    assert not filters.compile("*:*:*:*:[id]:y").match(colon_key)
    assert filters.compile("*:*:*:*:[id]:x").match(colon_key)


def test_adjacent_ids_on_a_long_key() -> None:
    # Ids not ending at a colon would make a regex backtrack polynomially.
    key = "a" * 3000
    assert not filters.compile("[id]a[id]a[id]a[id]b").match(key)
    assert filters.compile("[id]a[id]a[id]a[id]").match(key)
    assert not filters.compile("[id][id][id][id][id]:").match(key)


@pytest.mark.parametrize("pattern", ["Person:*", "Person:abc*"])
def test_prefix_matches_only_at_the_start(pattern: str) -> None:
    matcher = filters.compile(pattern)
    head = pattern[:-1]
    assert matcher.match(head + "tail")
    for key in ("Other" + head + "tail", "Manager:" + head + "tail", " " + head):
        assert not matcher.match(key), key  # the prefix somewhere inside is not a match
