"""IPv4 address planning (configurator/ipam.py): the pure core, no network."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from homenet.configurator.ipam import AddressExhausted, LanPlan, addresses_of, plan_address


def ip(text: str) -> IPv4Address:
    return IPv4Address(text)


@pytest.fixture
def lan() -> LanPlan:
    # Statics .2-.99 and .201-.254; DHCP hands out .100-.200.
    return LanPlan.build("192.168.1.0/24", "192.168.1.1", "192.168.1.100", "192.168.1.200")


@pytest.fixture
def small_lan() -> LanPlan:
    # A /28 whose DHCP pool eats most of it: only .12, .13 and .14 are static addresses.
    return LanPlan.build("192.168.1.0/28", "192.168.1.1", "192.168.1.2", "192.168.1.11")


def plan(lan: LanPlan, device_id: str = "dev-1", *, previous: str | None = None,
         reported: tuple[str, ...] = (), in_use: dict[str, str] | None = None) -> IPv4Address:
    return plan_address(lan, device_id,
                        previous=ip(previous) if previous else None,
                        reported=[ip(a) for a in reported],
                        in_use={ip(a): holder for a, holder in (in_use or {}).items()})


def plan_everyone(lan: LanPlan, device_ids: list[str]) -> dict[str, IPv4Address]:
    """Plan devices one after the other, as the configurator does, each seeing the others."""
    in_use: dict[IPv4Address, str] = {}
    for device_id in device_ids:
        in_use[plan_address(lan, device_id, previous=None, reported=[], in_use=in_use)] = device_id
    return {holder: address for address, holder in in_use.items()}


# --- which addresses are candidates at all -------------------------------------------------

def test_static_addresses_exclude_network_broadcast_gateway_and_pool(small_lan):
    assert list(small_lan.static_addresses()) == [ip("192.168.1.12"), ip("192.168.1.13"),
                                                   ip("192.168.1.14")]
    assert small_lan.static_capacity() == 3


@pytest.mark.parametrize("address", ["192.168.1.0", "192.168.1.255", "192.168.1.1",
                                     "192.168.1.100", "192.168.1.150", "192.168.1.200",
                                     "192.168.2.10", "10.0.0.5"])
def test_is_static_refuses_network_broadcast_gateway_pool_and_foreign_addresses(lan, address):
    assert not lan.is_static(ip(address))


@pytest.mark.parametrize("address", ["192.168.1.2", "192.168.1.99", "192.168.1.201", "192.168.1.254"])
def test_is_static_accepts_host_addresses_outside_the_pool(lan, address):
    assert lan.is_static(ip(address))


def test_dns_defaults_to_the_gateway(lan):
    assert lan.dns == (ip("192.168.1.1"),)


def test_dns_servers_given_are_kept_in_order():
    lan = LanPlan.build("10.0.0.0/24", "10.0.0.1", "10.0.0.100", "10.0.0.200", dns=["9.9.9.9", "1.1.1.1"])
    assert lan.dns == (ip("9.9.9.9"), ip("1.1.1.1"))


# --- safety: never a bad or duplicate address ----------------------------------------------

def test_address_is_never_inside_the_dhcp_pool(lan):
    addresses = plan_everyone(lan, [f"dev-{n}" for n in range(lan.static_capacity())])
    assert not any(lan.in_pool(a) for a in addresses.values())


def test_address_is_never_network_broadcast_or_gateway(small_lan):
    addresses = set(plan_everyone(small_lan, ["a", "b", "c"]).values())
    assert addresses.isdisjoint({ip("192.168.1.0"), ip("192.168.1.15"), ip("192.168.1.1")})
    assert all(a in small_lan.subnet for a in addresses)


def test_every_static_address_is_handed_out_once_before_exhaustion(lan):
    addresses = plan_everyone(lan, [f"dev-{n}" for n in range(lan.static_capacity())])
    assert len(set(addresses.values())) == lan.static_capacity()
    assert set(addresses.values()) == set(lan.static_addresses())


def test_address_in_use_by_another_device_is_never_given(lan):
    got = plan(lan, "dev-2", in_use={"192.168.1.2": "dev-1"})
    assert got != ip("192.168.1.2")


def test_previous_address_now_held_by_another_device_is_not_kept(lan):
    got = plan(lan, "dev-2", previous="192.168.1.50", in_use={"192.168.1.50": "dev-1"})
    assert got == ip("192.168.1.2")


def test_reported_address_held_by_another_device_is_not_adopted(lan):
    got = plan(lan, "dev-2", reported=("192.168.1.50",), in_use={"192.168.1.50": "dev-1"})
    assert got == ip("192.168.1.2")


def test_reported_address_inside_the_dhcp_pool_is_not_adopted(lan):
    # A device that got a DHCP lease must move to a static address, or DHCP could hand it out again.
    assert plan(lan, reported=("192.168.1.150",)) == ip("192.168.1.2")


def test_reported_gateway_address_is_not_adopted(lan):
    assert plan(lan, reported=("192.168.1.1",)) == ip("192.168.1.2")


# --- stability -----------------------------------------------------------------------------

def test_previous_address_is_kept_even_when_a_lower_one_is_free(lan):
    assert plan(lan, previous="192.168.1.77") == ip("192.168.1.77")


def test_previous_address_is_kept_when_the_in_use_map_names_the_device_itself(lan):
    got = plan(lan, "dev-1", previous="192.168.1.77", in_use={"192.168.1.77": "dev-1"})
    assert got == ip("192.168.1.77")


def test_previous_address_wins_over_a_reported_one(lan):
    assert plan(lan, previous="192.168.1.77", reported=("192.168.1.30",)) == ip("192.168.1.77")


def test_address_the_device_already_uses_is_adopted_when_free(lan):
    assert plan(lan, reported=("192.168.1.30",)) == ip("192.168.1.30")


def test_first_usable_reported_address_is_adopted(lan):
    got = plan(lan, reported=("192.168.1.150", "192.168.1.40", "192.168.1.30"))
    assert got == ip("192.168.1.40")


def test_after_renumbering_the_address_keeps_its_host_part_in_the_new_subnet():
    renumbered = LanPlan.build("10.0.0.0/24", "10.0.0.1", "10.0.0.100", "10.0.0.200")
    got = plan(renumbered, previous="192.168.1.77", reported=("192.168.1.77",))
    assert got == ip("10.0.0.77")


def test_after_renumbering_a_host_part_held_by_another_or_in_the_pool_is_not_kept():
    renumbered = LanPlan.build("10.0.0.0/24", "10.0.0.1", "10.0.0.100", "10.0.0.200")
    assert plan(renumbered, previous="192.168.1.77", in_use={"10.0.0.77": "other"}) == ip("10.0.0.2")
    assert plan(renumbered, previous="192.168.1.150") == ip("10.0.0.2")


def test_planning_is_deterministic(lan):
    in_use = {"192.168.1.2": "other", "192.168.1.4": "another"}
    assert {plan(lan, in_use=in_use) for _ in range(5)} == {ip("192.168.1.3")}


# --- lowest free otherwise -----------------------------------------------------------------

def test_lowest_free_static_address_is_chosen(lan):
    assert plan(lan) == ip("192.168.1.2")


def test_lowest_free_skips_addresses_held_by_others(lan):
    got = plan(lan, in_use={"192.168.1.2": "a", "192.168.1.3": "b", "192.168.1.5": "c"})
    assert got == ip("192.168.1.4")


def test_lowest_free_continues_above_the_pool_when_below_is_full():
    lan = LanPlan.build("192.168.1.0/24", "192.168.1.1", "192.168.1.3", "192.168.1.250")
    got = plan(lan, in_use={"192.168.1.2": "a"})
    assert got == ip("192.168.1.251")


# --- exhaustion ----------------------------------------------------------------------------

def test_one_device_more_than_static_addresses_raises_address_exhausted(small_lan):
    devices = [f"dev-{n}" for n in range(small_lan.static_capacity())]
    in_use = {address: holder for holder, address in plan_everyone(small_lan, devices).items()}
    with pytest.raises(AddressExhausted) as excinfo:
        plan_address(small_lan, "one-too-many", previous=None, reported=[], in_use=in_use)
    message = str(excinfo.value)
    assert "192.168.1.0/28" in message
    assert "192.168.1.2-192.168.1.11" in message
    assert "3" in message


def test_exhaustion_never_falls_back_to_a_held_reported_or_previous_address(small_lan):
    in_use = {"192.168.1.12": "a", "192.168.1.13": "b", "192.168.1.14": "c"}
    with pytest.raises(AddressExhausted):
        plan(small_lan, "d", previous="192.168.1.12", reported=("192.168.1.13",), in_use=in_use)


def test_a_device_that_already_holds_an_address_keeps_it_on_a_full_lan(small_lan):
    in_use = {"192.168.1.12": "a", "192.168.1.13": "b", "192.168.1.14": "c"}
    assert plan(small_lan, "b", previous="192.168.1.13", in_use=in_use) == ip("192.168.1.13")


# --- LanPlan validation --------------------------------------------------------------------

def test_gateway_outside_the_subnet_is_refused():
    with pytest.raises(ValueError, match=r"gateway 10\.0\.0\.1 is outside 192\.168\.1\.0/24"):
        LanPlan.build("192.168.1.0/24", "10.0.0.1", "192.168.1.100", "192.168.1.200")


@pytest.mark.parametrize("start, end", [("192.168.2.100", "192.168.1.200"),
                                        ("192.168.1.100", "192.168.2.200")])
def test_pool_outside_the_subnet_is_refused(start, end):
    with pytest.raises(ValueError, match="is outside 192.168.1.0/24"):
        LanPlan.build("192.168.1.0/24", "192.168.1.1", start, end)


def test_empty_pool_is_refused():
    with pytest.raises(ValueError, match=r"DHCP pool 192\.168\.1\.200-192\.168\.1\.100 is empty"):
        LanPlan.build("192.168.1.0/24", "192.168.1.1", "192.168.1.200", "192.168.1.100")


def test_single_address_pool_is_allowed():
    lan = LanPlan.build("192.168.1.0/24", "192.168.1.1", "192.168.1.100", "192.168.1.100")
    assert lan.in_pool(ip("192.168.1.100"))
    assert lan.static_capacity() == 253 - 1


def test_lan_plan_can_be_built_from_objects():
    lan = LanPlan(IPv4Network("10.1.0.0/16"), ip("10.1.0.1"), ip("10.1.1.0"), ip("10.1.1.255"))
    assert lan.is_static(ip("10.1.0.2")) and not lan.is_static(ip("10.1.1.7"))


# --- addresses_of --------------------------------------------------------------------------

def test_addresses_of_keeps_ipv4_and_skips_ipv6_and_junk():
    cidrs = ["192.168.1.20/24", "fe80::1/64", "not an address", "", "10.0.0.5/8", "10.0.0.300/8"]
    assert addresses_of(cidrs) == [ip("192.168.1.20"), ip("10.0.0.5")]
