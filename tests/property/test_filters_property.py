"""dmodel.filters against an obviously-correct reference matcher."""

from functools import cache

from hypothesis import given
from hypothesis import strategies as st

from dmodel import filters

# Small alphabets so that generated keys and patterns often line up.
SEGMENT_CHARS = "ab2:"
LITERAL_CHARS = "ab2:"

segments = st.text(alphabet="ab2", min_size=1, max_size=4)
oids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz234567", min_size=32, max_size=32)

keys = st.text(alphabet=SEGMENT_CHARS, max_size=14)
tokens = st.lists(
    st.one_of(
        st.text(alphabet=LITERAL_CHARS, min_size=1, max_size=3).map(lambda t: ("lit", t)),
        st.just(("id", "")),
        st.just(("star", "")),
    ),
    min_size=1,
    max_size=7,
)


def render(toks: list[tuple[str, str]]) -> str:
    return "".join({"lit": t, "id": "[id]", "star": "*"}[kind] for kind, t in toks)


def reference_match(toks: list[tuple[str, str]], key: str) -> bool:
    """Backtracking over tokens, straight from the grammar's definition."""
    toks = tuple(toks)

    @cache
    def go(i: int, pos: int) -> bool:
        if i == len(toks):
            return pos == len(key)
        kind, text = toks[i]
        if kind == "lit":
            return key.startswith(text, pos) and go(i + 1, pos + len(text))
        if kind == "star":
            return any(go(i + 1, end) for end in range(pos, len(key) + 1))
        # [id]: one or more characters, no colon among them
        end = pos
        while end < len(key) and key[end] != ":":
            end += 1
            if go(i + 1, end):
                return True
        return False

    return go(0, 0)


@given(tokens, keys)
def test_matches_like_the_reference(toks: list[tuple[str, str]], key: str) -> None:
    assert filters.compile(render(toks)).match(key) == reference_match(toks, key)


@given(tokens, tokens)
def test_rendered_pattern_of_a_filter_matches_like_the_reference(
    toks: list[tuple[str, str]], key_toks: list[tuple[str, str]]
) -> None:
    # Keys built from the pattern alphabet, including "[id]" and "*" as literal text.
    key = render(key_toks)
    assert filters.compile(render(toks)).match(key) == reference_match(toks, key)


@given(st.lists(segments, min_size=1, max_size=4), oids)
def test_a_key_matches_its_own_exact_filter(rest: list[str], oid: str) -> None:
    key = ":".join(["Person", oid, *rest])
    flt = filters.compile(key)
    assert flt.match(key)
    assert flt.model == "Person"
    assert not flt.match(key + "x")
    assert not flt.match(key[:-1])


@given(st.text(min_size=1, max_size=40).filter(lambda t: "[" not in t and "]" not in t))
def test_any_text_without_brackets_matches_itself(text: str) -> None:
    assert filters.compile(text).match(text)


@given(st.lists(st.text(alphabet="ab2:", max_size=5), min_size=1, max_size=4))
def test_id_never_matches_across_colons(parts: list[str]) -> None:
    key = "".join(parts)
    assert filters.compile("[id]").match(key) == (bool(key) and ":" not in key)
    assert filters.compile("x:[id]").match("x:" + key) == (bool(key) and ":" not in key)


@given(oids, st.lists(segments, min_size=1, max_size=3))
def test_model_id_filter_never_matches_a_field_key(oid: str, fields: list[str]) -> None:
    flt = filters.compile("Person:[id]")
    assert flt.match(f"Person:{oid}")
    assert not flt.match(":".join(["Person", oid, *fields]))
    assert filters.compile("Person:[id]:*").match(":".join(["Person", oid, *fields]))


@given(tokens, keys)
def test_model_is_a_sound_index(toks: list[tuple[str, str]], key: str) -> None:
    # If a filter names a model, it can only match keys of that model.
    flt = filters.compile(render(toks))
    if flt.model is not None and flt.match(key):
        assert key.partition(":")[0] == flt.model
