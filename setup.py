"""Package discovery for the split source layout.

The import root is ``replfs`` but three of its sub-packages live in
top-level folders (blockrepl/, locking/, fs/).  setuptools' automatic
discovery cannot see through such a mapping, so the package list is
computed here and pyproject.toml keeps the rest of the metadata.
"""
import os

from setuptools import setup

ROOTS = {
    "replfs": "replfs",
    "replfs.blockrepl": "blockrepl",
    "replfs.locking": "locking",
    "replfs.fs": "fs",
}


def _packages():
    found = []
    for name, folder in ROOTS.items():
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            if "__init__.py" in filenames:
                rel = os.path.relpath(dirpath, folder)
                found.append(name if rel == "." else name + "." + rel.replace(os.sep, "."))
    return found


# the NFS export's preload library is built from its C source on the
# node (replfs/nfs/ganesha.py: shim_path), so the source ships with it
setup(packages=_packages(), package_dir=ROOTS,
      package_data={"replfs.nfs": ["fsid_preload.c"]})
