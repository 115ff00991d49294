"""Extensions: switched on and off by settings, fed by the bus only with what was committed."""

from __future__ import annotations

from homenet.configurator.bus import Bus, DeviceChanged
from homenet.configurator.extensions import enabled
from homenet.settings import GatewaySettings, HomeAssistantSettings, Switch

from .harness import Gateway, wait_until


def test_each_extension_is_switched_off_by_its_setting() -> None:
    names = lambda s: [cls.name for cls in enabled(s)]  # noqa: E731
    assert names(GatewaySettings()) == ["homeassistant", "metrics", "web"]
    assert names(GatewaySettings(web=Switch(enabled=False), homeassistant=HomeAssistantSettings(enabled=False))) \
        == ["metrics"]
    assert names(GatewaySettings(web=Switch(enabled=False), metrics=Switch(enabled=False),
                                 homeassistant=HomeAssistantSettings(enabled=False))) == []


def test_a_failing_listener_does_not_stop_the_others() -> None:
    bus, seen = Bus(), []
    bus.subscribe(lambda n: 1 / 0)
    bus.subscribe(seen.append)
    bus.emit("x")  # type: ignore[arg-type]
    assert seen == ["x"]


def test_the_bus_tells_committed_device_changes_and_forgetting(gateway: Gateway) -> None:
    assert gateway.configurator is not None
    seen: list[object] = []
    gateway.configurator.bus.subscribe(seen.append)
    gateway.agent("nas")
    gateway.wait_configured("test-nas")
    states = [n.record.state.value for n in seen if isinstance(n, DeviceChanged)]
    assert states[0] == "configuring" and states[-1] == "configured"
    committed = wait_until(lambda: [n for n in seen if type(n).__name__ == "Committed"], what="a commit")
    assert committed[0].seconds > 0
