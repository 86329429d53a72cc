"""Set-up that every Ray worker process of an sslcore job runs first (``worker_process_setup_hook``).

Every process of the job imports this module, Ray's own actors included, so it imports nothing but the
standard library: importing sslcore.engine would pull in torch, ~1.5 s in each of them (bench/results.md).
"""

import logging


def quiet_ray_worker() -> None:
    """Without Ray's dashboard (not installed by ray[train]) the state API is absent, and Ray Train's
    placement-group cleaner would warn about it every second."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(
        logging.ERROR)
