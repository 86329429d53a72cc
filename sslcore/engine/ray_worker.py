"""Set-up that every Ray worker process of an sslcore job runs first (``worker_process_setup_hook``).

Every process of the job imports this module, Ray's own actors included, so it imports nothing but the
standard library: importing sslcore.engine would pull in torch, ~1.5 s in each of them (bench/results.md).
"""

import logging
import os
import sys

VERBOSE_ENV = "SSLCORE_VERBOSE"  # set for the job by the driver under --verbose


def quiet_ray_worker() -> None:
    """Keep Ray Train's bookkeeping off the console (it stays in Ray Train's log files, which the driver
    copies to the run's ray.log); ``--verbose`` shows it.

    Without Ray's dashboard (not installed by ray[train]) the state API is absent, and Ray Train's
    placement-group cleaner would warn about it every second. Ray Train's per-report line comes from a
    logger named by its file's path, outside ``ray.train`` and so outside ``RunConfig.logging_config``.
    """
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(
        logging.ERROR)
    ray = sys.modules.get("ray")
    if ray is not None and "RAY_ADDRESS" not in os.environ:
        # Ray Train's helpers that look for "the" cluster (its placement-group cleaner) fail with a traceback
        # when another Ray instance runs on the machine: this process's own cluster is the one
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    if ray is not None and os.environ.get(VERBOSE_ENV) != "1":
        context = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")
        logging.getLogger(context).setLevel(logging.WARNING)
