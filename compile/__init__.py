"""Compile-then-load: turn a checkpoint and an engine configuration into an artifact directory."""
