"""The mirror's sans-IO replication engine (engine.py), its actions
(actions.py) and the cooperative flows it is written in (flows.py)."""
