"""OpenTelemetry and logging for one process."""
