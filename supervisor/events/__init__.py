"""Interruption notices: the watcher thread, the eviction policy, one module per notice source."""
