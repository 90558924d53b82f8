"""The per-VM process: CLI, sizing, process management, Scheduled Events, drain, sd_notify."""
