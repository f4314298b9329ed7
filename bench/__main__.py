"""`make bench`: run the benchmark layers, each printing its table and
writing its JSON and PNG charts to bench/results/.

    python -m bench                 every layer of `make bench`, in turn
    python -m bench block fs        only those layers
    python -m bench --quick fs      small sizes (a smoke run)
    python -m bench.LAYER --help    a layer's own options (run it alone)

Layers: block (the replicated block device), locking (the cluster lock
manager), fs (the filesystem against a local directory, a FUSE
passthrough and the image-backed mount), fuse_layer (replfs.fuse against
pyfuse3), dual (dual-primary: both nodes at once), and peer (replfs
against a GlusterFS replica-2 volume; not in the default set: `make
bench-peer` installs GlusterFS first).  Docs: docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# (name, what it measures, the layer's --quick option if it has one)
LAYERS = [
    ("block", "replicated block device: raw file, standalone, protocols A/B/C, TLS, "
              "device file", "--quick"),
    ("locking", "cluster lock manager round trips", "--quick"),
    ("fs", "filesystem: local dir, passthrough, image, resource mounts", "--quick"),
    ("fuse_layer", "replfs.fuse against pyfuse3, per request", "--quick"),
    ("dual", "dual-primary: one node against both nodes at once", "--quick"),
]
EXTRA = [("peer", "replfs against GlusterFS replica 2 (make bench-peer)", "--quick")]
DEFAULT = [name for name, _, _ in LAYERS]


def parse_args(argv):
    names = [n for n, _, _ in LAYERS + EXTRA]
    ap = argparse.ArgumentParser(
        prog="python -m bench", description="Run replfs's benchmarks layer by layer.",
        epilog="layers:\n" + "\n".join(f"  {n:<11} {d}" for n, d, _ in LAYERS + EXTRA)
               + "\n\ndefault: " + " ".join(DEFAULT)
               + "\nA layer's own options: python -m bench.LAYER --help",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("layers", nargs="*", metavar="LAYER",
                    help="layers to run, in this order (default: all but peer)")
    ap.add_argument("--quick", action="store_true",
                    help="small sizes in every layer, for a smoke run")
    ap.add_argument("--list", action="store_true", help="list the layers and exit")
    args = ap.parse_args(argv)
    bad = [n for n in args.layers if n not in names]
    if bad:
        ap.error(f"unknown layer(s): {', '.join(bad)} (choose from {', '.join(names)})")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.list:
        for n, d, _ in LAYERS + EXTRA:
            print(f"{n:<11} {d}")
        return 0
    quick = {n: q for n, _, q in LAYERS + EXTRA}
    rc = 0
    failed = []
    for name in args.layers or DEFAULT:
        print(f"\n######## bench.{name}", flush=True)
        layer_argv = [quick[name]] if args.quick and quick[name] else []
        try:
            mod = importlib.import_module(f"bench.{name}")
            r = mod.main(layer_argv)
        except KeyboardInterrupt:
            print(f"bench.{name}: interrupted", file=sys.stderr)
            return 130
        except SystemExit as e:          # a layer's own usage error
            r = e.code if isinstance(e.code, int) else 1
        except Exception as e:           # one broken layer does not stop the others
            print(f"bench.{name} FAILED: {type(e).__name__}: {e}", flush=True)
            r = 1
        if r:
            failed.append(name)
            rc = 1
    if failed:
        print(f"\nlayers that failed: {', '.join(failed)}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
