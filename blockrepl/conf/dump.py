"""Stage 4: the canonical text of a configuration, as ``drbdadm dump`` prints it.

Everything post-parse decided is written out explicitly (protocol, the
minor of every device, the address family, merged common options) so
that the text means the same on its own and parse(dump(x)) == x.
Indentation is by tabs; option sections come after the ``on`` sections.
"""
from __future__ import annotations

from . import options as opts
from .lexer import quote
from .model import Config, Host, MetaDisk, Resource, Section


def dump(config: Config, resource: Resource | str | None = None) -> str:
    """The whole configuration, or only one resource of it."""
    if resource is not None:
        if isinstance(resource, str):
            resource = config.resource(resource)
        return "\n".join(_resource(resource)) + "\n"
    blocks: list[list[str]] = []
    if config.global_.options:
        blocks.append(_section("global", config.global_, 0))
    if config.common or config.common_protocol is not None:
        lines = ["common {"]
        if config.common_protocol is not None:
            lines.append(f"\tprotocol {config.common_protocol};")
        for name in _ordered(config.common):
            lines += _section(name, config.common[name], 1)
        lines.append("}")
        blocks.append(lines)
    for res in config.resources.values():
        blocks.append(_resource(res))
    text = "\n\n".join("\n".join(block) for block in blocks)
    return f"# {config.path}\n" + (text + "\n" if text else "")


def _ordered(sections: dict[str, Section]) -> list[str]:
    known = [name for name in opts.SECTIONS if name in sections]
    return known + [name for name in sections if name not in opts.SECTIONS]


def _section(name: str, section: Section, depth: int) -> list[str]:
    pad = "\t" * depth
    lines = [f"{pad}{name} {{"]
    for key, value in section.options:
        lines.append(f"{pad}\t{key} {quote(value)};" if value else f"{pad}\t{key};")
    lines.append(f"{pad}}}")
    return lines


def _resource(res: Resource) -> list[str]:
    lines = [f"resource {quote(res.name)} {{", f"\tprotocol {res.protocol};"]
    for host in res.hosts:
        lines += _host(host)
    for name in opts.SECTIONS:
        section: Section = getattr(res, name)
        if section.options:
            lines += _section(name, section, 1)
    lines.append("}")
    return lines


def _host(host: Host) -> list[str]:
    family = "ipv6" if ":" in host.address else "ipv4"
    endpoint = f"[{host.address}]:{host.port}" if family == "ipv6" else f"{host.address}:{host.port}"
    lines = [
        f"\ton {quote(host.name)} {{",
        f"\t\tdevice\t\t{quote(host.device)} minor {host.minor};",
        f"\t\tdisk\t\t{quote(host.disk)};",
        f"\t\tmeta-disk\t{_meta_disk(host.meta_disk)};",
        f"\t\taddress\t\t{family} {endpoint};",
    ]
    if host.node_id is not None:
        lines.append(f"\t\tnode-id\t\t{host.node_id};")
    lines.append("\t}")
    return lines


def _meta_disk(meta: MetaDisk) -> str:
    if meta.internal:
        return "internal"
    assert meta.path is not None
    if meta.index is None:
        return quote(meta.path)
    return f"{quote(meta.path)} [{meta.index}]"
