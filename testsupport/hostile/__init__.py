"""Hostile parts for the standing attack suite (tests/attack/): documents, programs, servers."""
