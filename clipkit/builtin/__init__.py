"""Builtin plugins. Each registers its parts through the same hooks a third-party plugin uses."""
