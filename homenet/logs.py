"""One log format for every homenet process (journald and terminals alike)."""

from __future__ import annotations

import logging


def setup(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    if not verbose:  # amqtt and transitions log every packet at INFO
        for noisy in ("amqtt", "transitions"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
