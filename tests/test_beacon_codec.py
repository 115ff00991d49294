"""The beacon frame codec: what a valid frame is, and that anything else is refused with a reason."""

from __future__ import annotations

from ipaddress import IPv4Interface, IPv6Address

import pytest

from homenet.keys import KeyPair, verify
from homenet.schemas.beacon import (MIN_FRAME, TYPE_BEACON, TYPE_SOLICIT, Beacon, BeaconError, decode_beacon,
                                    encode_beacon, encode_solicit, ethernet_frame, frame_type, parse_ethernet)

KEY = KeyPair.generate()
MAC = bytes.fromhex("020000000001")


def beacon(**changes: object) -> Beacon:
    fields = dict(epoch=3, counter=7, key=KEY.public, ipv4=(IPv4Interface("192.168.50.1/24"), 1883),
                  ipv6_ll=(IPv6Address("fe80::1"), 1883), tls=(8883, b"\x11" * 32), root="homenet/v1")
    return Beacon(**{**fields, **changes})


def test_a_signed_beacon_round_trips_through_an_ethernet_frame() -> None:
    frame = ethernet_frame(MAC, encode_beacon(beacon(), KEY.sign))
    dst, src, ethertype, payload = parse_ethernet(frame)
    assert (dst, src, ethertype) == (b"\xff" * 6, MAC, 0x88B5)
    assert frame_type(payload) == TYPE_BEACON
    assert decode_beacon(payload, verify) == beacon()


def test_optional_endpoints_may_be_absent() -> None:
    minimal = beacon(ipv4=None, tls=None)
    assert decode_beacon(encode_beacon(minimal, KEY.sign), verify) == minimal


def test_solicit_is_padded_to_the_ethernet_minimum() -> None:
    frame = ethernet_frame(MAC, encode_solicit())
    assert len(frame) == MIN_FRAME
    assert frame_type(parse_ethernet(frame)[3]) == TYPE_SOLICIT


def test_frames_over_1400_bytes_are_refused() -> None:
    with pytest.raises(BeaconError, match="over the 1400-byte limit"):
        ethernet_frame(MAC, encode_beacon(beacon(root="x" * 1400), KEY.sign))


def test_beacon_signed_by_another_key_than_the_one_it_carries_is_refused() -> None:
    forged = encode_beacon(beacon(), KeyPair.generate().sign)
    with pytest.raises(BeaconError, match="bad signature"):
        decode_beacon(forged, verify)


def test_any_changed_byte_breaks_the_signature() -> None:
    payload = bytearray(encode_beacon(beacon(), KEY.sign))
    payload[9] ^= 1  # the epoch
    with pytest.raises(BeaconError, match="bad signature"):
        decode_beacon(bytes(payload), verify)


@pytest.mark.parametrize("cut", [3, 10, 20, 60, -1])
def test_truncated_beacons_are_refused(cut: int) -> None:
    with pytest.raises(BeaconError):
        decode_beacon(encode_beacon(beacon(), KEY.sign)[:cut], verify)


def test_unsigned_beacon_is_refused() -> None:
    payload = encode_beacon(beacon(), KEY.sign)
    unsigned = payload[: -(3 + 64)]
    with pytest.raises(BeaconError, match="unsigned beacon"):
        decode_beacon(unsigned, verify)


@pytest.mark.parametrize("payload,reason", [
    (b"XXXX\x01\x01\x00\x00", "bad magic"),
    (b"HNET\x02\x01\x00\x00", "unsupported version 2"),
    (b"HNET\x01\x09\x00\x00", "unknown frame type 9"),
    (b"HN", "truncated"),
])
def test_foreign_frames_are_refused_with_the_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(BeaconError, match=reason):
        frame_type(payload)
