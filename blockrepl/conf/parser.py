"""Stage 2 of reading replfs.conf: tokens to a raw syntax tree.

The tree keeps every statement with its file:line and checks only what
the grammar says: which keywords may appear where, that statements end
in ';' and blocks are balanced, and that option names are ones DRBD
knows.  Inheritance, defaults and cross-checks are post-parse's job
(postparse.py), which turns this tree into the model.

Grammar (drbd.conf, DRBD 8.3/8.4 style)::

    file      := { global | common | resource | include | skip }
    global    := 'global' '{' { option } '}'
    common    := 'common' '{' { 'protocol' X ';' | section } '}'
    resource  := 'resource' NAME '{' { res-item } '}'
    res-item  := 'protocol' X ';' | host-item | section | on | skip
    on        := 'on' NAME '{' { host-item } '}'
    host-item := ('device' | 'disk' | 'address' | 'meta-disk'
                  | 'flexible-meta-disk' | 'node-id') WORDS ';'
    section   := ('net' | 'disk' | 'syncer' | 'startup' | 'handlers'
                  | 'options') '{' { option } '}'
    option    := NAME { VALUE } ';'
    include   := 'include' PATTERN ';'
    skip      := 'skip' { WORD } '{' anything balanced '}'
"""
from __future__ import annotations

import glob
import os
import stat
from dataclasses import dataclass, field

from replfs.errors import EXIT_SYNTAX, ReplfsError

from . import options as opts
from .lexer import Kind, Token, syntax_error, tokenize
from .model import Location

HOST_KEYWORDS = ("device", "disk", "address", "meta-disk", "flexible-meta-disk", "node-id")
MAX_INCLUDE_DEPTH = 32
# Bounds on what one configuration may read: files included in all (a
# file that includes itself through a pattern matching two files would
# otherwise be read 2**MAX_INCLUDE_DEPTH times) and bytes per file.
MAX_INCLUDED_FILES = 1000
MAX_CONFIG_BYTES = 16 << 20


@dataclass
class RawOption:
    name: str
    value: str
    where: Location


@dataclass
class RawSection:
    name: str
    where: Location
    options: list[RawOption] = field(default_factory=list)


@dataclass
class RawStatement:
    """A host statement such as ``device /dev/drbd0 minor 0;``: its words."""
    keyword: str
    words: list[str]
    where: Location


@dataclass
class RawHost:
    name: str
    where: Location
    items: dict[str, RawStatement] = field(default_factory=dict)


@dataclass
class RawResource:
    name: str
    where: Location
    protocol: RawStatement | None = None
    items: dict[str, RawStatement] = field(default_factory=dict)  # inherited by hosts
    sections: dict[str, RawSection] = field(default_factory=dict)
    hosts: list[RawHost] = field(default_factory=list)


@dataclass
class RawConfig:
    path: str
    global_: RawSection | None = None
    common_protocol: RawStatement | None = None
    common_where: Location | None = None
    common: dict[str, RawSection] = field(default_factory=dict)
    resources: list[RawResource] = field(default_factory=list)
    files: int = field(default=0, compare=False, repr=False)   # included so far


def parse_text(text: str, path: str = "<string>") -> RawConfig:
    raw = RawConfig(path)
    _Parser(tokenize(text, path), path, raw, depth=0).file()
    return raw


def parse_file(path: str) -> RawConfig:
    raw = RawConfig(path)
    _parse_file_into(path, raw, depth=0, where=None)
    return raw


def _parse_file_into(path: str, raw: RawConfig, depth: int, where: Location | None) -> None:
    prefix = f"{where}: " if where else ""
    if where is not None:
        # An include pattern may match anything (include "/dev/*";): a
        # FIFO would block the reader for ever and a device could feed it
        # without end, so included files must be regular files (a
        # directory fails to open below, with its own message).
        raw.files += 1
        if raw.files > MAX_INCLUDED_FILES:
            raise syntax_error(where, f"more than {MAX_INCLUDED_FILES} files included "
                                      f"(does a file include itself?)")
        try:
            mode = os.stat(path).st_mode
        except OSError:
            mode = stat.S_IFREG         # reported by open() below
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise ReplfsError(f"{prefix}included file '{path}' is not a regular file",
                              EXIT_SYNTAX)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ReplfsError(f"{prefix}cannot read config file '{path}': {e.strerror}",
                          EXIT_SYNTAX) from e
    if len(data) > MAX_CONFIG_BYTES:
        raise ReplfsError(f"{prefix}config file '{path}' is larger than "
                          f"{MAX_CONFIG_BYTES >> 20} MiB", EXIT_SYNTAX)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        also = f" (included at {where})" if where else ""
        raise ReplfsError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x}){also}",
                          EXIT_SYNTAX) from None
    # as reading in text mode did: universal newlines
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    _Parser(tokenize(text, path), path, raw, depth).file()


class _Parser:
    def __init__(self, tokens: list[Token], path: str, raw: RawConfig, depth: int):
        self.tokens = tokens
        self.pos = 0
        self.path = path
        self.raw = raw
        self.depth = depth

    # --- token helpers ---
    def peek(self) -> Token:
        return self.tokens[self.pos]

    def next(self) -> Token:
        tok = self.tokens[self.pos]
        if tok.kind is not Kind.EOF:
            self.pos += 1
        return tok

    def word(self, what: str, after: str) -> Token:
        """A WORD or STRING token, naming what was expected otherwise."""
        tok = self.next()
        if tok.kind not in (Kind.WORD, Kind.STRING):
            raise syntax_error(tok.where, f"expected {what} after '{after}', found {tok.describe()}")
        return tok

    def expect(self, kind: Kind, after: str) -> Token:
        tok = self.next()
        if tok.kind is not kind:
            raise syntax_error(tok.where, f"expected '{kind.value}' after '{after}', found {tok.describe()}")
        return tok

    def words_until_semi(self, statement: str) -> list[Token]:
        """Value tokens up to and including the closing ';'."""
        values: list[Token] = []
        while True:
            tok = self.peek()
            if tok.kind in (Kind.WORD, Kind.STRING):
                values.append(self.next())
                continue
            if tok.kind is Kind.SEMI:
                self.next()
                return values
            written = " ".join([statement] + [v.text for v in values])
            raise syntax_error(tok.where, f"expected ';' after '{written}', found {tok.describe()}")

    def block_end(self, tok: Token, context: str, opened: Location) -> None:
        if tok.kind is Kind.EOF:
            raise syntax_error(tok.where, f"unexpected end of file: missing '}}' to close "
                                          f"{context} opened at line {opened.line}")

    # --- grammar ---
    def file(self) -> None:
        while True:
            tok = self.next()
            if tok.kind is Kind.EOF:
                return
            if tok.kind is Kind.RBRACE:
                raise syntax_error(tok.where, "unexpected '}' at top level (no open section to close)")
            if tok.kind is not Kind.WORD:
                raise syntax_error(tok.where, f"expected 'global', 'common', 'resource' or "
                                              f"'include', found {tok.describe()}")
            if tok.text == "global":
                self.global_(tok)
            elif tok.text == "common":
                self.common(tok)
            elif tok.text == "resource":
                self.resource(tok)
            elif tok.text == "include":
                self.include(tok)
            elif tok.text == "skip":
                self.skip(tok)
            else:
                raise syntax_error(tok.where, f"unknown keyword '{tok.text}' at top level "
                                              f"(expected global, common, resource or include)")

    def global_(self, start: Token) -> None:
        if self.raw.global_ is not None:
            raise syntax_error(start.where, f"second 'global' section (the first is at "
                                            f"{self.raw.global_.where})")
        self.raw.global_ = self.option_section("global", start)

    def common(self, start: Token) -> None:
        if self.raw.common_where is not None:
            raise syntax_error(start.where, f"second 'common' section (the first is at "
                                            f"{self.raw.common_where})")
        self.raw.common_where = start.where
        self.expect(Kind.LBRACE, "common")
        while True:
            tok = self.next()
            if tok.kind is Kind.RBRACE:
                return
            self.block_end(tok, "section 'common'", start.where)
            if tok.kind is Kind.WORD and tok.text == "protocol":
                self.raw.common_protocol = self.protocol(tok)
            elif tok.kind is Kind.WORD and tok.text in opts.SECTIONS:
                self.section_into(self.raw.common, tok)
            elif tok.kind is Kind.WORD and tok.text == "skip":
                self.skip(tok)
            else:
                raise syntax_error(tok.where, f"unknown keyword {tok.describe()} in section 'common'")

    def resource(self, start: Token) -> None:
        name = self.word("a resource name", "resource")
        if not name.text:
            raise syntax_error(name.where, "a resource name may not be empty")
        res = RawResource(name.text, start.where)
        context = f"resource {name.text}"
        self.expect(Kind.LBRACE, context)
        while True:
            tok = self.next()
            if tok.kind is Kind.RBRACE:
                break
            self.block_end(tok, f"'{context}'", start.where)
            if tok.kind is not Kind.WORD:
                raise syntax_error(tok.where, f"unknown keyword {tok.describe()} in section '{context}'")
            key = tok.text
            if key == "protocol":
                if res.protocol is not None:
                    raise syntax_error(tok.where, f"'protocol' given twice in '{context}' "
                                                  f"(first at line {res.protocol.where.line})")
                res.protocol = self.protocol(tok)
            elif key == "on":
                res.hosts.append(self.on(tok))
            elif key in opts.SECTIONS and self.peek().kind is Kind.LBRACE:
                self.section_into(res.sections, tok)
            elif key in HOST_KEYWORDS:
                self.host_item(res.items, tok, context)
            elif key in opts.SECTIONS:
                raise syntax_error(self.peek().where, f"expected '{{' after '{key}', "
                                                      f"found {self.peek().describe()}")
            elif key == "skip":
                self.skip(tok)
            elif key == "floating":
                raise syntax_error(tok.where, "'floating' sections are not supported by replfs: "
                                              "name each node with 'on HOSTNAME { ... }'")
            elif key == "volume":
                raise syntax_error(tok.where, "'volume' sections are not supported by replfs: "
                                              "use one resource per device")
            elif key in ("stacked-on-top-of", "connection", "connection-mesh", "proxy"):
                raise syntax_error(tok.where, f"'{key}' is not supported by replfs "
                                              f"(two-node resources only)")
            else:
                raise syntax_error(tok.where, f"unknown keyword '{key}' in section '{context}'")
        self.raw.resources.append(res)

    def on(self, start: Token) -> RawHost:
        name = self.word("a host name", "on")
        if not name.text:
            raise syntax_error(name.where, "a host name may not be empty")
        host = RawHost(name.text, start.where)
        context = f"on {name.text}"
        self.expect(Kind.LBRACE, context)
        while True:
            tok = self.next()
            if tok.kind is Kind.RBRACE:
                return host
            self.block_end(tok, f"section '{context}'", start.where)
            if tok.kind is Kind.WORD and tok.text in HOST_KEYWORDS:
                self.host_item(host.items, tok, context)
            elif tok.kind is Kind.WORD and tok.text == "skip":
                self.skip(tok)
            elif tok.kind is Kind.WORD and tok.text == "volume":
                raise syntax_error(tok.where, "'volume' sections are not supported by replfs: "
                                              "use one resource per device")
            else:
                raise syntax_error(tok.where, f"unknown keyword {tok.describe()} in "
                                              f"section '{context}'")

    def host_item(self, items: dict[str, RawStatement], tok: Token, context: str) -> None:
        key = "meta-disk" if tok.text == "flexible-meta-disk" else tok.text
        if key in items:
            raise syntax_error(tok.where, f"'{key}' given twice in '{context}' "
                                          f"(first at line {items[key].where.line})")
        words = self.words_until_semi(tok.text)
        if not words:
            raise syntax_error(tok.where, f"'{tok.text}' needs a value")
        items[key] = RawStatement(key, [w.text for w in words], tok.where)

    def protocol(self, start: Token) -> RawStatement:
        value = self.word("A, B or C", "protocol")
        self.expect_semi(f"protocol {value.text}")
        return RawStatement("protocol", [value.text], start.where)

    def expect_semi(self, written: str) -> None:
        tok = self.next()
        if tok.kind is not Kind.SEMI:
            raise syntax_error(tok.where, f"expected ';' after '{written}', found {tok.describe()}")

    def section_into(self, sections: dict[str, RawSection], start: Token) -> None:
        """Parse an option section; a repeated section adds to the first."""
        section = self.option_section(start.text, start)
        if start.text in sections:
            sections[start.text].options.extend(section.options)
        else:
            sections[start.text] = section

    def option_section(self, name: str, start: Token) -> RawSection:
        self.expect(Kind.LBRACE, name)
        section = RawSection(name, start.where)
        while True:
            tok = self.next()
            if tok.kind is Kind.RBRACE:
                return section
            self.block_end(tok, f"section '{name}'", start.where)
            if tok.kind is not Kind.WORD:
                raise syntax_error(tok.where, f"expected an option name in section '{name}', "
                                              f"found {tok.describe()}")
            if tok.text == "skip":
                self.skip(tok)
                continue
            if not opts.is_known(name, tok.text):
                raise syntax_error(tok.where, f"unknown option '{tok.text}' in section '{name}'")
            values = self.words_until_semi(tok.text)
            section.options.append(RawOption(tok.text, " ".join(v.text for v in values), tok.where))

    def skip(self, start: Token) -> None:
        """``skip ... { ... }``: DRBD's block comment, nested braces allowed."""
        while self.peek().kind in (Kind.WORD, Kind.STRING):
            self.next()
        self.expect(Kind.LBRACE, "skip")
        level = 1
        while level:
            tok = self.next()
            if tok.kind is Kind.EOF:
                self.block_end(tok, "'skip' block", start.where)
            elif tok.kind is Kind.LBRACE:
                level += 1
            elif tok.kind is Kind.RBRACE:
                level -= 1

    def include(self, start: Token) -> None:
        pattern = self.word("a file name or pattern", "include")
        self.expect_semi(f"include {pattern.text}")
        if self.depth >= MAX_INCLUDE_DEPTH:
            raise syntax_error(start.where, f"includes nested deeper than {MAX_INCLUDE_DEPTH} "
                                            f"levels (does a file include itself?)")
        if "\0" in pattern.text:
            # no file name has one (and os functions raise ValueError)
            raise syntax_error(pattern.where, "a NUL character in the name of an included file")
        base = os.path.dirname(self.path) if self.path != "<string>" else ""
        full = os.path.join(base, pattern.text)
        if glob.has_magic(full):
            names = sorted(glob.glob(full))
        elif os.path.exists(full):
            names = [full]
        else:
            raise syntax_error(start.where, f"included file '{full}' does not exist")
        for name in names:
            _parse_file_into(name, self.raw, self.depth + 1, start.where)
