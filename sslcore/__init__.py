"""sslcore: self-supervised visual representation learning with pluggable methods, on Ray Train."""

import pluggy

__version__ = "0.1.0"

#: Decorator for plugin hook implementations: ``@sslcore.hookimpl def register_losses(register): ...``
hookimpl = pluggy.HookimplMarker("sslcore")

__all__ = ["__version__", "hookimpl"]
