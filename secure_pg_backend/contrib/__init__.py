"""Integrations with third-party packages (each imported only when used)."""

__all__ = []
