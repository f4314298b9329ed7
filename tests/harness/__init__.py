"""Test harness: fault-injecting TCP proxy and helpers for real node daemons."""
