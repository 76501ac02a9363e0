"""Registers the ``fp4`` torch.library ops on import (kernel modules load lazily)."""

from . import library  # noqa: F401
