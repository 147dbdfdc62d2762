"""Command-line interface: one small module per command, heavy imports inside ``run``."""
