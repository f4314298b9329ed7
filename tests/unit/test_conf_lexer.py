"""The replfs.conf lexer: tokens, line numbers, quoting, lexical errors."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replfs.blockrepl.conf import parse_text
from replfs.blockrepl.conf.lexer import Kind, quote, tokenize
from replfs.errors import EXIT_SYNTAX, ReplfsError


def kinds_and_texts(text: str) -> list[tuple[Kind, str, int]]:
    return [(t.kind, t.text, t.where.line) for t in tokenize(text, "f")]


def test_tokens_with_lines():
    text = 'on  test03 {\n\tdevice /dev/drbd0; # comment { ; "\n  address [fd00::1]:7789;\n}'
    assert kinds_and_texts(text) == [
        (Kind.WORD, "on", 1), (Kind.WORD, "test03", 1), (Kind.LBRACE, "{", 1),
        (Kind.WORD, "device", 2), (Kind.WORD, "/dev/drbd0", 2), (Kind.SEMI, ";", 2),
        (Kind.WORD, "address", 3), (Kind.WORD, "[fd00::1]:7789", 3), (Kind.SEMI, ";", 3),
        (Kind.RBRACE, "}", 4), (Kind.EOF, "", 4),
    ]


def test_quoted_strings_and_escapes():
    toks = tokenize(r'x "a b; {c}" "say \"hi\"" "back\\slash" "\n stays"' + "\n", "f")
    assert [t.text for t in toks[:-1]] == ["x", "a b; {c}", 'say "hi"', "back\\slash", "\\n stays"]
    assert [t.kind for t in toks[1:-1]] == [Kind.STRING] * 4


def test_word_stops_at_punctuation_and_comment():
    assert [t.text for t in tokenize("a;b{c}d#e\nf", "f")] == \
        ["a", ";", "b", "{", "c", "}", "d", "f", ""]


def test_unterminated_string_names_the_opening_line():
    with pytest.raises(ReplfsError) as info:
        tokenize('resource r {\n  net { shared-secret "abc;\n  }\n}\n', "x.conf")
    assert info.value.exit_code == EXIT_SYNTAX
    assert info.value.message == \
        "x.conf:2: unterminated quoted string (missing closing '\"' on this line)"
    with pytest.raises(ReplfsError) as info:
        tokenize('\n\n"abc\\"', "y.conf")  # an escaped quote does not close it
    assert info.value.message.startswith("y.conf:3: unterminated quoted string")


def test_unexpected_close_brace_and_eof_line_numbers():
    with pytest.raises(ReplfsError) as info:
        parse_text("global { usage-count no; }\n\n}\n", "z.conf")
    assert info.value.exit_code == EXIT_SYNTAX
    assert info.value.message == "z.conf:3: unexpected '}' at top level (no open section to close)"
    with pytest.raises(ReplfsError) as info:
        parse_text("common {\n net {\n  ping-int 3;\n\n", "z.conf")
    assert info.value.message == ("z.conf:5: unexpected end of file: missing '}' to close "
                                  "section 'net' opened at line 2")


@given(st.text(alphabet=st.one_of(
    st.sampled_from('\\"{};# \t'),
    st.characters(blacklist_characters="\n", blacklist_categories=["Cs"])), max_size=30))
def test_quote_gives_back_one_token(value):
    toks = tokenize(quote(value), "q")
    assert len(toks) == 2 and toks[0].text == value and toks[0].kind in (Kind.WORD, Kind.STRING)
