"""`make bench`: run every benchmark in turn."""
import sys

from . import block, dual, fs, fuse_layer, locking


def main() -> int:
    rc = 0
    for mod in (block, locking, fs, fuse_layer, dual):
        print(f"\n######## {mod.__name__}", flush=True)
        rc |= mod.main([])
    return rc


if __name__ == "__main__":
    sys.exit(main())
