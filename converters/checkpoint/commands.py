"""CLI commands that read and write existing checkpoints (convert, inspect, verify)."""

COMMANDS: list = []
