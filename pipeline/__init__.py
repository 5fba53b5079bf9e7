"""rynn-pipe: robot demonstrations -> pretokenized shards -> a unified VLA + world model."""

__version__ = "0.1.0"
