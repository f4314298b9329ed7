"""The shared NFS export of a replfs volume: NFS-Ganesha's configuration
and process (ganesha.py), the preload library that gives Ganesha the
volume's filesystem id (fsid_preload.c), and a small NFSv3 client for
probes and tests (rpc.py)."""
