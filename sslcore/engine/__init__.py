"""The training engine: one loop (loop.py), where it runs (session.py), how it starts (launch.py)."""

__all__ = ["EvalContext", "MethodContext"]


def __getattr__(name: str) -> object:
    # lazily: every Ray process of a job imports sslcore.engine.ray_worker (its setup hook), and context imports
    # torch, ~2 s of CPU in each of Ray Train's own processes too
    if name in __all__:
        from sslcore.engine import context

        return getattr(context, name)
    raise AttributeError(f"module 'sslcore.engine' has no attribute {name!r}")
