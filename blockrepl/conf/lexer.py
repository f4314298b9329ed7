"""Stage 1 of reading replfs.conf: text to tokens, each with file:line.

The token language is drbd.conf's: bare words (anything up to white
space or one of ``{ } ; " #``), double-quoted strings in which ``\\"``
and ``\\\\`` are escapes, the three punctuation tokens, and comments
from ``#`` to the end of the line.  A quoted string may not span lines,
so a forgotten closing quote is reported on the line that opened it
rather than wherever the next quote happens to be.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from replfs.errors import EXIT_SYNTAX, ReplfsError

from .model import Location


class Kind(Enum):
    WORD = "word"
    STRING = "string"
    LBRACE = "{"
    RBRACE = "}"
    SEMI = ";"
    EOF = "end of file"


@dataclass(frozen=True)
class Token:
    kind: Kind
    text: str           # the value: unquoted and unescaped for STRING
    where: Location

    def describe(self) -> str:
        """How an error message names this token."""
        if self.kind is Kind.EOF:
            return "end of file"
        if self.kind is Kind.STRING:
            return f'"{self.text}"'
        return f"'{self.text}'"


# Characters that end a bare word.  Everything else, including '[', ']',
# ':' and '/', is part of the word so that addresses such as
# [fd00::1]:7789 and paths stay one token.
SPECIAL = frozenset('{};"#')
_PUNCT = {"{": Kind.LBRACE, "}": Kind.RBRACE, ";": Kind.SEMI}


def syntax_error(where: Location, what: str) -> ReplfsError:
    return ReplfsError(f"{where}: {what}", EXIT_SYNTAX)


def tokenize(text: str, file: str) -> list[Token]:
    """All tokens of text, ending with one EOF token."""
    tokens: list[Token] = []
    line = 1
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
            i += 1
        elif c.isspace():
            i += 1
        elif c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif c in _PUNCT:
            tokens.append(Token(_PUNCT[c], c, Location(file, line)))
            i += 1
        elif c == '"':
            i, value = _string(text, i, Location(file, line))
            tokens.append(Token(Kind.STRING, value, Location(file, line)))
        else:
            start = i
            while i < n and not text[i].isspace() and text[i] not in SPECIAL:
                i += 1
            tokens.append(Token(Kind.WORD, text[start:i], Location(file, line)))
    tokens.append(Token(Kind.EOF, "", Location(file, line)))
    return tokens


def _string(text: str, i: int, where: Location) -> tuple[int, str]:
    """Scan the quoted string opening at text[i]; return (next index, value)."""
    out: list[str] = []
    i += 1
    n = len(text)
    while i < n:
        c = text[i]
        if c == '"':
            return i + 1, "".join(out)
        if c == "\n":
            break
        if c == "\\" and i + 1 < n and text[i + 1] in '"\\':
            out.append(text[i + 1])
            i += 2
            continue
        out.append(c)
        i += 1
    raise syntax_error(where, "unterminated quoted string (missing closing '\"' on this line)")


def quote(value: str) -> str:
    """Write value so that tokenize() gives it back as one token."""
    if value and not any(ch.isspace() or ch in SPECIAL or ch == "\\" for ch in value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
