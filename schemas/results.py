"""What makes a `config.result` a true answer to a `config` (docs/protocol.md, config.result).

One pure rule, shared by the configurator (which refuses a result that breaks it), the agent
(which builds its status with `overall`) and the conformance kit (which checks a foreign agent).
"""

from __future__ import annotations

from collections import Counter

from .messages import Config, ConfigResult, ItemStatus, ResultStatus, Target, item_key

FINE = (ItemStatus.APPLIED, ItemStatus.UNCHANGED)


def overall(statuses: list[ItemStatus]) -> ResultStatus:
    """Any item rolled back -> rolled_back; all fine (or none at all) -> ok; none fine -> failed;
    some -> partial."""
    if ItemStatus.ROLLED_BACK in statuses:
        return ResultStatus.ROLLED_BACK
    fine = sum(s in FINE for s in statuses)
    if fine == len(statuses):
        return ResultStatus.OK
    return ResultStatus.FAILED if fine == 0 else ResultStatus.PARTIAL


def agent_keys(config: Config) -> list[str]:
    """The item keys a result to `config` must account for: its agent items, in order."""
    return [item_key(item) for item in config.items if item.target == Target.AGENT]


def result_problem(result: ConfigResult, config: Config, config_id: str) -> str | None:
    """Why `result` does not answer `config` (sent with message id `config_id`), or None.

    It must name that config's id in `re` and its version, give exactly one item result per
    agent item (no gateway item, nothing else), and its status must follow from the items."""
    if result.re != config_id:
        return f"re {result.re!r} is not the id {config_id!r} of config version {config.version}"
    if result.version != config.version:
        return f"version {result.version} is not the config's version {config.version}"
    wanted, got = Counter(agent_keys(config)), Counter(r.item for r in result.items)
    if wanted != got:
        missing, extra = sorted((wanted - got).elements()), sorted((got - wanted).elements())
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + \
                ([f"not agent items of this config (or repeated): {', '.join(extra)}"] if extra else [])
        return f"items do not match the config's agent items: {'; '.join(parts)}"
    expected = overall([r.status for r in result.items])
    if result.status != expected:
        return f"status {result.status.value} does not follow from its items (they make it {expected.value})"
    return None
