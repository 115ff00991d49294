"""The index of who holds which address and port (configurator/holdings.py): planning with it
gives what planning against every other record gives, without looking at every record."""

from __future__ import annotations

from ipaddress import IPv4Address

from homenet.configurator.holdings import Holdings
from homenet.configurator.ipam import LanPlan
from homenet.configurator.policy import evaluate
from homenet.configurator.records import DeviceRecord
from homenet.schemas.messages import Config, DeviceInfo, Interface, Ipv4Item, PortMappingItem

LAN = LanPlan.build("192.168.1.0/24", "192.168.1.1", "192.168.1.100", "192.168.1.200")


def planned(holdings: Holdings, device_id: str, device_type: str = "generic", addresses: tuple[str, ...] = (),
            previous: DeviceRecord | None = None) -> DeviceRecord:
    """Plan a device the way the configurator does, and record what it now holds."""
    info = DeviceInfo(device_id=device_id, device_type=device_type,
                      interfaces=[Interface(name="eth0", mac="02:00:00:00:00:01", addresses=list(addresses))])
    items = evaluate(info, holdings.view(LAN, device_id, "linux"), previous.config.items if previous else []).items
    record = DeviceRecord(device_id=device_id, info=info,
                          config=Config(device_id=device_id, version=1, epoch=1, profile=device_type, items=items))
    holdings.update(record)
    return record


def address(record: DeviceRecord) -> IPv4Address:
    return next(i.address for i in record.config.items if isinstance(i, Ipv4Item))


def test_new_devices_get_the_lowest_free_static_addresses_in_order():
    holdings = Holdings()
    got = [address(planned(holdings, f"dev-{i}")) for i in range(5)]
    assert got == [IPv4Address(f"192.168.1.{n}") for n in range(2, 7)]


def test_an_address_freed_below_the_others_is_given_to_the_next_new_device():
    holdings = Holdings()
    for i in range(5):
        planned(holdings, f"dev-{i}")
    holdings.remove("dev-1")  # held 192.168.1.3
    assert address(planned(holdings, "newcomer")) == IPv4Address("192.168.1.3")
    assert address(planned(holdings, "another")) == IPv4Address("192.168.1.7")


def test_a_device_does_not_stand_in_its_own_way_on_a_re_plan():
    holdings = Holdings()
    first = planned(holdings, "nas-1", "nas")
    again = planned(holdings, "nas-1", "nas", previous=first)
    assert again.config.items == first.config.items


def test_an_address_a_device_reports_is_not_given_to_another():
    holdings = Holdings()
    squatter = DeviceRecord(device_id="printer", info=DeviceInfo(
        device_id="printer", device_type="generic",
        interfaces=[Interface(name="eth0", mac="02:00:00:00:00:09", addresses=["192.168.1.2/24"])]))
    holdings.update(squatter)
    assert address(planned(holdings, "dev-1")) == IPv4Address("192.168.1.3")


def test_a_wanted_port_held_by_another_device_goes_to_the_overflow_range():
    holdings = Holdings()
    planned(holdings, "nas-1", "nas")
    second = planned(holdings, "nas-2", "nas")
    ports = [m.external_port for m in second.config.items if isinstance(m, PortMappingItem)]
    assert ports and all(p >= 40000 for p in ports)


def test_built_from_records_it_holds_what_they_hold():
    grown = Holdings()
    records = [planned(grown, f"dev-{i}", "nas" if i % 2 else "generic") for i in range(6)]
    rebuilt = Holdings(records)
    assert address(planned(rebuilt, "next")) == address(planned(grown, "next"))

