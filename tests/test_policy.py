"""Evaluation (configurator/policy.py, profiles.py, ports.py): device info -> configuration items."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from homenet.configurator.ipam import AddressExhausted, LanPlan
from homenet.configurator.policy import NetworkView, PlanError, evaluate, primary_interface
from homenet.configurator.ports import OVERFLOW, PortsExhausted, allocate
from homenet.configurator.profiles import PROFILES, profile_for
from homenet.schemas.messages import (DSCP, DeviceInfo, IgmpItem, Interface, Ipv4Item, PortMappingItem,
                                      QosClass, QosItem, Target)

LAN = LanPlan.build("192.168.1.0/24", "192.168.1.1", "192.168.1.100", "192.168.1.200")
SMALL_LAN = LanPlan.build("192.168.1.0/28", "192.168.1.1", "192.168.1.2", "192.168.1.11")


def device(device_id: str = "dev-1", device_type: str = "generic", *,
           interfaces: list[Interface] | None = None, addresses: tuple[str, ...] = ()) -> DeviceInfo:
    if interfaces is None:
        interfaces = [Interface(name="eth0", mac="02:00:00:00:00:01", addresses=list(addresses))]
    return DeviceInfo(device_id=device_id, device_type=device_type, interfaces=interfaces)


def view(lan: LanPlan = LAN, *, addresses: dict[str, str] | None = None,
         ports: dict[tuple[str, int], str] | None = None) -> NetworkView:
    return NetworkView(lan, {IPv4Address(a): h for a, h in (addresses or {}).items()}, dict(ports or {}))


def only(items, cls):
    found = [i for i in items if isinstance(i, cls)]
    assert len(found) == 1, f"expected one {cls.__name__} in {items}"
    return found[0]


def mappings(items) -> list[PortMappingItem]:
    return [i for i in items if isinstance(i, PortMappingItem)]


def holdings(device_id: str, items) -> tuple[dict[IPv4Address, str], dict[tuple[str, int], str]]:
    """What a planned device holds, as the configurator would put it into the next NetworkView."""
    addresses = {i.address: device_id for i in items if isinstance(i, Ipv4Item)}
    ports = {(m.protocol, m.external_port): device_id for m in mappings(items)}
    return addresses, ports


# --- built-in profiles ---------------------------------------------------------------------

EXPECTED = {
    # device type: (qos class, dscp, port mappings (protocol, internal port), igmp)
    "iptv-stb": (QosClass.VIDEO, 32, [], True),
    "nas": (QosClass.BULK, 8, [("tcp", 443)], False),
    "media-player": (QosClass.INTERACTIVE, 34, [], True),
    "game-console": (QosClass.VOICE, 46, [("udp", 3074)], False),
    "smart-speaker": (QosClass.VOICE, 46, [], False),
    "camera": (QosClass.VIDEO, 32, [], False),
    "generic": (QosClass.BEST_EFFORT, 0, [], False),
}


def test_every_built_in_profile_has_an_expectation():
    assert set(PROFILES) == set(EXPECTED)


@pytest.mark.parametrize("device_type", sorted(EXPECTED))
def test_profile_yields_ipv4_with_gateway_dns_and_prefix(device_type):
    items = evaluate(device(device_type=device_type), view()).items
    ipv4 = only(items, Ipv4Item)
    assert ipv4.interface == "eth0"
    assert ipv4.mac == "02:00:00:00:00:01"
    assert ipv4.address == IPv4Address("192.168.1.2")
    assert ipv4.prefix_len == 24
    assert ipv4.gateway == IPv4Address("192.168.1.1")
    assert [str(d) for d in ipv4.dns] == ["192.168.1.1"]
    assert ipv4.target is Target.AGENT


@pytest.mark.parametrize("device_type", sorted(EXPECTED))
def test_profile_yields_its_qos_class_and_dscp(device_type):
    qos_class, dscp, _, _ = EXPECTED[device_type]
    plan = evaluate(device(device_type=device_type), view())
    qos = only(plan.items, QosItem)
    assert (qos.qos_class, qos.dscp) == (qos_class, dscp)
    assert qos.target is Target.GATEWAY
    assert plan.profile.name == device_type


@pytest.mark.parametrize("device_type", sorted(EXPECTED))
def test_profile_yields_its_port_mappings(device_type):
    _, _, wanted, _ = EXPECTED[device_type]
    items = evaluate(device(device_type=device_type), view()).items
    got = [(m.protocol, m.internal_port, m.external_port) for m in mappings(items)]
    assert got == [(protocol, port, port) for protocol, port in wanted]
    assert all(m.target is Target.GATEWAY and m.description for m in mappings(items))


@pytest.mark.parametrize("device_type", sorted(EXPECTED))
def test_profile_enables_igmp_only_for_multicast_video_players(device_type):
    *_, igmp = EXPECTED[device_type]
    items = evaluate(device(device_type=device_type), view()).items
    igmp_items = [i for i in items if isinstance(i, IgmpItem)]
    assert igmp_items == ([IgmpItem(enabled=True)] if igmp else [])


def test_dscp_code_points_are_the_standard_ones():
    assert DSCP[QosClass.VIDEO] == 32  # CS4
    assert DSCP[QosClass.VOICE] == 46  # EF
    assert DSCP[QosClass.BULK] == 8  # CS1
    assert DSCP[QosClass.INTERACTIVE] == 34  # AF41
    assert DSCP[QosClass.BEST_EFFORT] == 0  # CS0


def test_iptv_set_top_box_items_in_order():
    items = evaluate(device("stb-1", "iptv-stb"), view()).items
    assert [i.kind for i in items] == ["ipv4", "qos", "igmp"]


def test_nas_items_in_order():
    items = evaluate(device("nas-1", "nas"), view()).items
    assert [i.kind for i in items] == ["ipv4", "qos", "port_mapping"]


def test_unknown_device_type_falls_back_to_generic():
    plan = evaluate(device(device_type="toaster"), view())
    assert plan.profile is PROFILES["generic"]
    assert profile_for("toaster") is PROFILES["generic"]
    assert [i.kind for i in plan.items] == ["ipv4", "qos"]
    assert only(plan.items, QosItem).qos_class is QosClass.BEST_EFFORT


# --- determinism and stability -------------------------------------------------------------

@pytest.mark.parametrize("device_type", sorted(EXPECTED))
def test_evaluate_is_deterministic(device_type):
    info = device(device_type=device_type, addresses=("192.168.1.150/24",))
    network = view(addresses={"192.168.1.2": "other"}, ports={("tcp", 443): "other"})
    first, second = evaluate(info, network), evaluate(info, network)
    assert first.items == second.items
    assert first.profile == second.profile


def test_replan_with_previous_config_gives_equal_items():
    info = device("nas-1", "nas")
    first = evaluate(info, view()).items
    addresses, ports = holdings("nas-1", first)
    again = evaluate(info, NetworkView(LAN, addresses, ports), first).items
    assert again == first


def test_previous_address_and_external_ports_are_kept_on_replan():
    previous = [
        Ipv4Item(interface="eth0", address=IPv4Address("192.168.1.60"), prefix_len=24,
                 gateway=IPv4Address("192.168.1.1")),
        PortMappingItem(protocol="tcp", external_port=40007, internal_port=443),
    ]
    items = evaluate(device("nas-1", "nas"), view(), previous).items
    assert only(items, Ipv4Item).address == IPv4Address("192.168.1.60")
    assert [m.external_port for m in mappings(items)] == [40007]


def test_address_the_device_reports_is_adopted():
    items = evaluate(device(addresses=("192.168.1.42/24",)), view()).items
    assert only(items, Ipv4Item).address == IPv4Address("192.168.1.42")


def test_address_held_by_another_device_is_not_given():
    items = evaluate(device("dev-2", addresses=("192.168.1.42/24",)),
                     view(addresses={"192.168.1.42": "dev-1", "192.168.1.2": "dev-3"})).items
    assert only(items, Ipv4Item).address == IPv4Address("192.168.1.3")


def test_renumbered_lan_moves_the_device_into_the_new_subnet():
    first = evaluate(device("stb-1", "iptv-stb"), view()).items
    new_lan = LanPlan.build("10.0.0.0/24", "10.0.0.1", "10.0.0.100", "10.0.0.200")
    items = evaluate(device("stb-1", "iptv-stb", addresses=("192.168.1.2/24",)), view(new_lan), first).items
    ipv4 = only(items, Ipv4Item)
    assert (ipv4.address, ipv4.gateway, ipv4.prefix_len) == (IPv4Address("10.0.0.2"), IPv4Address("10.0.0.1"), 24)


# --- port conflicts ------------------------------------------------------------------------

def test_second_nas_gets_an_overflow_port_and_keeps_it():
    first_items = evaluate(device("nas-1", "nas"), view()).items
    assert [m.external_port for m in mappings(first_items)] == [443]

    addresses, ports = holdings("nas-1", first_items)
    second_items = evaluate(device("nas-2", "nas"), NetworkView(LAN, addresses, ports)).items
    (second,) = mappings(second_items)
    assert second.external_port in OVERFLOW and second.external_port >= 40000
    assert second.internal_port == 443
    assert only(second_items, Ipv4Item).address != only(first_items, Ipv4Item).address

    more_addresses, more_ports = holdings("nas-2", second_items)
    both = NetworkView(LAN, {**addresses, **more_addresses}, {**ports, **more_ports})
    assert evaluate(device("nas-2", "nas"), both, second_items).items == second_items

    # Even when 443 becomes free (the first NAS left), the second keeps its port: no churn.
    alone = NetworkView(LAN, more_addresses, more_ports)
    assert mappings(evaluate(device("nas-2", "nas"), alone, second_items).items) == [second]


def test_third_nas_gets_the_next_overflow_port():
    ports = {("tcp", 443): "nas-1", ("tcp", 40000): "nas-2"}
    items = evaluate(device("nas-3", "nas"), view(ports=ports)).items
    assert [m.external_port for m in mappings(items)] == [40001]


def test_same_port_number_on_another_protocol_does_not_conflict():
    assert allocate("nas-1", "tcp", 443, previous=None, in_use={("udp", 443): "other"}) == 443


def test_previous_external_port_now_held_by_another_device_is_not_kept():
    got = allocate("nas-2", "tcp", 443, previous=40000,
                   in_use={("tcp", 40000): "nas-3", ("tcp", 443): "nas-1"})
    assert got == 40001


def test_port_exhaustion_raises_plan_error_naming_the_port():
    in_use = {("tcp", 443): "nas-1", **{("tcp", p): "someone" for p in OVERFLOW}}
    with pytest.raises(PortsExhausted, match="tcp.*443"):
        allocate("nas-2", "tcp", 443, previous=None, in_use=in_use)
    with pytest.raises(PlanError, match="tcp.*443") as excinfo:
        evaluate(device("nas-2", "nas"), view(ports=in_use))
    assert isinstance(excinfo.value.__cause__, PortsExhausted)


# --- errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("interfaces", [
    [],
    [Interface(name="eth0", mac="02:00:00:00:00:01", up=False)],
    [Interface(name="wlan0", mac=None)],
    [Interface(name="lo", mac="00:00:00:00:00:00", addresses=["127.0.0.1/8"])],
], ids=["none", "down", "no-mac", "loopback"])
def test_device_without_an_up_interface_with_a_mac_cannot_be_planned(interfaces):
    with pytest.raises(PlanError, match="dev-1 reports no interface that is up and has a MAC"):
        evaluate(device(interfaces=interfaces), view())


def test_address_exhaustion_is_a_plan_error_not_a_duplicate():
    full = {"192.168.1.12": "a", "192.168.1.13": "b", "192.168.1.14": "c"}
    with pytest.raises(PlanError, match=r"192\.168\.1\.0/28") as excinfo:
        evaluate(device("d", addresses=("192.168.1.12/28",)), view(SMALL_LAN, addresses=full))
    assert isinstance(excinfo.value.__cause__, AddressExhausted)


# --- primary interface ---------------------------------------------------------------------

def test_primary_interface_prefers_one_already_on_the_lan():
    info = device(interfaces=[
        Interface(name="eth0", mac="02:00:00:00:00:01", addresses=["10.9.9.9/24"]),
        Interface(name="wlan0", mac="02:00:00:00:00:02", addresses=["fe80::2/64", "192.168.1.50/24"]),
    ])
    assert primary_interface(info, LAN).name == "wlan0"
    ipv4 = only(evaluate(info, view()).items, Ipv4Item)
    assert (ipv4.interface, ipv4.mac, ipv4.address) == ("wlan0", "02:00:00:00:00:02", IPv4Address("192.168.1.50"))


def test_primary_interface_is_the_first_usable_one_when_none_is_on_the_lan():
    info = device(interfaces=[
        Interface(name="lo", mac="00:00:00:00:00:00", addresses=["127.0.0.1/8"]),
        Interface(name="eth0", mac="02:00:00:00:00:01", up=False, addresses=["192.168.1.9/24"]),
        Interface(name="eth1", mac="02:00:00:00:00:03"),
        Interface(name="wlan0", mac="02:00:00:00:00:02"),
    ])
    assert primary_interface(info, LAN).name == "eth1"


def test_an_interface_that_is_down_is_never_primary_even_if_on_the_lan():
    info = device(interfaces=[
        Interface(name="eth0", mac="02:00:00:00:00:01", up=False, addresses=["192.168.1.9/24"]),
        Interface(name="wlan0", mac="02:00:00:00:00:02"),
    ])
    assert primary_interface(info, LAN).name == "wlan0"
