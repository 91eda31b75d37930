"""Engines: where client work executes. Algorithm code never knows which one runs it."""

from potluck.engines.base import Engine, available_engines, make_engine

__all__ = ["Engine", "available_engines", "make_engine"]
