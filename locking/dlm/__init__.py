"""dlm-lite: a sans-IO distributed lock manager core modelled on o2dlm.

``core.DlmNode`` is the whole per-node state machine; ``messages`` is its
wire format; ``modes`` the lock modes; ``lockres`` the master-side queues.
Nothing in this package performs I/O, reads a clock or draws random
numbers: a driver feeds events in and carries the returned actions out.
"""
