"""The training engine: one loop (loop.py), where it runs (session.py), how it starts (launch.py)."""

from sslcore.engine.context import EvalContext, MethodContext

__all__ = ["EvalContext", "MethodContext"]
