"""Test configuration: deterministic hypothesis runs that leave no example database in the checkout."""

from __future__ import annotations

from hypothesis import settings

settings.register_profile("longmem", database=None, derandomize=True)
settings.load_profile("longmem")
