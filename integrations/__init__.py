"""Entrocraft inside other RL frameworks (docs/integrations.md).

``integrations.trl`` (needs ``pip install -e ".[trl]"``) and ``integrations.verl`` (needs the ``verl`` extra
and ``pip install --no-deps verl==0.9.1``) import their library at module top; nothing else in this project
imports TRL or verl, so this package itself imports neither.
"""

__all__: list[str] = []
