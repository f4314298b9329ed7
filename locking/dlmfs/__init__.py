"""dlmfs: ocfs2_dlmfs semantics over FUSE (see fs.py)."""
