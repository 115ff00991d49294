"""The gateway's state on the wire: a summary and one message per device, so nothing grows
with the home (one message for 5,000 devices was 307 KB, over both brokers' 256 KiB limit)."""

from __future__ import annotations

from ipaddress import IPv4Address

from homenet.configurator.gatewaystate import Published, merge, split
from homenet.schemas import encode
from homenet.schemas.messages import GatewayState, PortMapping, QosClass, QosRule, Reservation


def home(n: int, lan: str = "10.0.0.0/16") -> GatewayState:
    ids = [f"hn-{i:012x}" for i in range(n)]
    address = [IPv4Address("10.0.0.10") + i for i in range(n)]
    return GatewayState(
        driver="linux", lan=lan, igmp_proxy=True, igmp_devices=sorted(ids[::3]),
        reservations=[Reservation(device_id=d, mac="02:00:00:00:00:01", address=a) for d, a in zip(ids, address)],
        port_mappings=[PortMapping(device_id=ids[1], protocol="tcp", external_port=443, internal_address=address[1],
                                   internal_port=443, description="NAS remote access")] if n > 1 else [],
        qos=[QosRule(device_id=d, address=a, qos_class=QosClass.VIDEO, dscp=32) for d, a in zip(ids, address)])


def test_the_parts_make_the_whole_again() -> None:
    state = home(7)
    summary, devices = split(state)
    assert summary.devices == 7 and summary.igmp_proxy and summary.lan == "10.0.0.0/16"
    assert devices["hn-000000000001"].port_mappings[0].external_port == 443
    assert devices["hn-000000000003"].igmp and not devices["hn-000000000004"].igmp
    assert merge(summary, devices.values()) == state


def test_no_message_grows_with_the_number_of_devices() -> None:
    summary, devices = split(home(5000))
    sizes = [len(encode("gateway.device", d, sender="configurator", seq=1)[1]) for d in devices.values()]
    assert len(encode("gateway.state", summary, sender="configurator", seq=1)[1]) < 300
    assert max(sizes) < 1024, "one device's part is a few hundred bytes, whatever the home's size"


def test_only_what_changed_is_sent_again() -> None:
    published = Published()
    summary, devices = published.changes(home(3))
    assert summary is not None and sorted(devices) == ["hn-000000000000", "hn-000000000001", "hn-000000000002"]
    assert published.changes(home(3)) == (None, {})

    fewer = home(3).model_copy(update={"reservations": home(3).reservations[:2], "qos": home(3).qos[:2]})
    summary, devices = published.changes(fewer)
    assert summary is not None and summary.devices == 2  # the third has nothing left on the gateway
    assert devices == {"hn-000000000002": None}

    published.forget()  # after a reconnect: everything again
    summary, devices = published.changes(fewer)
    assert summary is not None and len(devices) == 2
