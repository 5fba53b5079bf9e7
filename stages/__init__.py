"""Pipeline stages: one module per stage, each exposing a `STAGE` spec (see pipeline/runner.py)."""
