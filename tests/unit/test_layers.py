"""The layers of replfs stack one way, and the cores are pure.

Layers, bottom up (a module may import its own layer and those below):

    ground   replfs.errors, replfs.blockdev, replfs.blockflags, replfs.filemode, replfs.ipc,
             replfs.fuse, replfs.tls, replfs.metrics   (shared by every layer above)
    mirror   replfs.blockrepl            (the DRBD-style block mirror)
    locking  replfs.locking              (the o2cb-style cluster stack)
    fs       replfs.fs                   (the cluster filesystem)
    roof     replfs.daemon, replfs.cli, replfs.devfile, replfs.demo,
             replfs.localpair, replfs.nfs   (what runs them, and serves them)

mirror and locking are side by side: neither imports the other.

Pure modules (below) do no I/O: they import nothing that reaches sockets,
files, clocks, randomness, threads or processes -- directly or through
other replfs modules (checked on the whole import closure).  They are
what the simulators and property tests run.
"""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
FOLDERS = {"blockrepl": "replfs.blockrepl", "locking": "replfs.locking", "fs": "replfs.fs",
           "replfs": "replfs"}

GROUND = ("replfs.errors", "replfs.blockdev", "replfs.blockflags", "replfs.filemode", "replfs.ipc", "replfs.fuse",
          "replfs.tls", "replfs.metrics")
LAYERS = [("ground", GROUND), ("mirror", ("replfs.blockrepl",)),
          ("locking", ("replfs.locking",)), ("fs", ("replfs.fs",)),
          ("roof", ("replfs.daemon", "replfs.cli", "replfs.devfile", "replfs.demo",
                    "replfs.localpair", "replfs.nfs"))]
RANK = {"ground": 0, "mirror": 1, "locking": 1, "fs": 2, "roof": 3}

PURE = [
    "replfs.blockrepl.core",
    "replfs.blockrepl.proto", "replfs.blockrepl.meta", "replfs.blockrepl.conf.lexer",
    "replfs.blockrepl.conf.model", "replfs.blockrepl.conf.options",
    "replfs.locking.dlm", "replfs.locking.heartbeat.core", "replfs.locking.net.proto",
    "replfs.fuse.proto", "replfs.fuse.locks", "replfs.ipc.frames",
    "replfs.fs.format", "replfs.fs.journal", "replfs.fs.extents", "replfs.fs.dirs",
    "replfs.fs.alloc", "replfs.fs.cache", "replfs.blockrepl.engine", "replfs.blockflags",
]
IMPURE = {"trio", "socket", "os", "time", "random", "secrets", "threading", "subprocess",
          "asyncio", "select", "fcntl", "signal", "shutil", "pyfuse3", "io", "tempfile"}


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for folder, pkg in FOLDERS.items():
        for p in (ROOT / folder).rglob("*.py"):
            rel = p.relative_to(ROOT / folder).with_suffix("")
            parts = [pkg] + [x for x in rel.parts if x != "__init__"]
            out[".".join(parts)] = p
    return out


def imports_of(name: str, path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            found |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = package.split(".")
                base = base[:len(base) - (n.level - 1)]
                mod = ".".join(base + ([n.module] if n.module else []))
            else:
                mod = n.module or ""
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in n.names}   # (from pkg import module)
    return found


def layer_of(mod: str) -> str | None:
    for layer, prefixes in LAYERS:
        if any(mod == p or mod.startswith(p + ".") for p in prefixes):
            return layer
    return None


def test_every_module_has_a_layer():
    missing = [m for m in modules() if m != "replfs" and layer_of(m) is None]
    assert not missing, f"modules in no layer: {missing}"


def test_layers_stack_one_way():
    mods = modules()
    bad = []
    for name, path in mods.items():
        mine = layer_of(name)
        if mine is None:
            continue
        for imp in imports_of(name, path):
            other = layer_of(imp)
            if other is None or other == mine:
                continue
            if RANK[other] >= RANK[mine]:
                bad.append(f"{name} ({mine}) imports {imp} ({other})")
    assert not bad, "\n".join(bad)


def test_pure_modules_do_no_io():
    mods = modules()
    targets = [m for m in mods if any(m == p or m.startswith(p + ".") for p in PURE)]
    assert len(targets) > 30
    bad = []
    for start in targets:
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m in seen:
                continue
            seen.add(m)
            for imp in imports_of(m, mods[m]):
                top = imp.split(".")[0]
                if top in IMPURE:
                    bad.append(f"{start}: {m} imports {imp}")
                elif imp in mods:
                    todo.append(imp)
    assert not bad, "\n".join(sorted(set(bad)))
