"""Starting Ray for a run: ``ray.init`` with sslcore's job settings (worker niceness, plugin modules)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
from typing import Any

from sslcore.errors import UserError


def init_ray(address: str | None, modules: list[str]) -> bool:
    """``ray.init`` as sslcore runs it; returns True when this call started (or joined) Ray, False when Ray
    was initialised before."""
    import ray

    if ray.is_initialized():
        local_modules = uninstalled_module_paths(modules)
        if local_modules:
            logging.getLogger(__name__).warning(
                "Ray was initialised before sslcore; plugin modules %s reach the workers only if they are "
                "importable there", local_modules)
        return False
    if address is None:
        # Ray starts its workers at niceness 15, below its own processes (nice 0): on a machine whose cores
        # the training worker is meant to fill, every wake-up of raylet, GCS or an idle actor then stalls one
        # of its compute threads, and the whole parallel op waits for it. Measured on 2 cores: the same bf16
        # ResNet step at 0.6-0.85x of in-process speed at nice 15, ~0.9x at nice 0 (bench/results.md).
        os.environ.setdefault("RAY_worker_niceness", "0")
    # Plugin modules the workers cannot import (not installed) travel with the job; Ray takes local
    # py_modules only at the job level, in ray.init.
    job_env: dict[str, Any] = {"worker_process_setup_hook": "sslcore.engine.launch.quiet_ray_worker"}
    local_modules = uninstalled_module_paths(modules)
    if local_modules:
        job_env["py_modules"] = local_modules
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=True, configure_logging=False,
                 runtime_env=job_env)
    except ConnectionError as exc:
        raise UserError(f"--address {address}: cannot join that Ray cluster ({str(exc).splitlines()[-1]}); "
                        f"check the address (ray status) or leave --address out to start a local one") from None
    return True


def uninstalled_module_paths(modules: list[str]) -> list[str]:
    """Folders or files of plugin modules that are importable here but not installed, for Ray's py_modules."""
    installed = importlib.metadata.packages_distributions()
    paths = []
    for name in modules:
        top = name.split(".")[0]
        spec = importlib.util.find_spec(top)
        if top in installed or spec is None or spec.origin is None:
            continue
        paths.append(spec.submodule_search_locations[0] if spec.submodule_search_locations else spec.origin)
    return paths
