"""Reading replfs.conf, the drbd.conf-style configuration of the block mirror.

In stages, as drbdadm does it: lexer (text -> tokens with file:line),
parser (tokens -> raw tree, includes expanded), postparse (inheritance,
defaults, validation -> model.Config), dump (model -> canonical text).

    config = load("/etc/replfs/replfs.conf")
    for res in for_node(config, node):      # resources configured here
        me = check_node(config, res, node)  # this node's Host
"""
from __future__ import annotations

import dataclasses

from . import parser as _parser
from .dump import dump
from .model import Config, Host, Location, MetaDisk, Resource, Section
from .postparse import check_node, for_node, postparse

DEFAULT_PATH = "/etc/replfs/replfs.conf"

__all__ = [
    "DEFAULT_PATH", "Config", "Host", "Location", "MetaDisk", "Resource", "Section",
    "check_node", "dump", "for_node", "load", "parse_text",
]


def load(path: str = DEFAULT_PATH, *, node: str | None = None) -> Config:
    """Read path and the files it includes into a checked Config.

    node is accepted for callers that know it, but no node check happens
    here: a config may hold resources for other nodes, and only verbs that
    act on a resource call check_node().
    """
    del node
    return _checked(_parser.parse_file(path))


def parse_text(text: str, path: str = "<string>") -> Config:
    """Parse configuration text; path is used in messages and for includes."""
    return _checked(_parser.parse_text(text, path))


def _checked(raw: _parser.RawConfig) -> Config:
    return dataclasses.replace(postparse(raw), secret_files=_files_setting(raw, "shared-secret"))


def _files_setting(raw: _parser.RawConfig, name: str) -> tuple[str, ...]:
    """The files in which some section sets option ``name``, in order."""
    sections = list(raw.common.values())
    for r in raw.resources:
        sections += r.sections.values()
    files = (o.where.file for s in sections for o in s.options if o.name == name)
    return tuple(dict.fromkeys(files))
