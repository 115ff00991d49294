"""The Layer-2 bootstrap beacon: frame codec (byte layout in docs/beacon.md).

Ethernet II frames to ff:ff:ff:ff:ff:ff with EtherType 0x88B5 (IEEE local experimental).
Payload: a fixed header, then type-length-value fields; a beacon ends with an Ed25519
signature over every payload byte before the signature field. Unknown TLV types are skipped so
later versions can add fields; a short, malformed or oversized frame raises BeaconError.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv6Address

ETHERTYPE = 0x88B5
BROADCAST = b"\xff" * 6
MAGIC = b"HNET"
VERSION = 1
MIN_FRAME = 60
MAX_FRAME = 1400

TYPE_BEACON = 1
TYPE_SOLICIT = 2

T_IPV4 = 1      # 4 address + 1 prefix length + 2 port
T_IPV6_LL = 2   # 16 link-local address + 2 port
T_TLS = 3       # 2 port + 32 SHA-256 of the broker certificate
T_KEY = 4       # 32 Ed25519 public key of the configurator
T_ROOT = 5      # UTF-8 topic root
T_SIG = 0xFF    # 64 Ed25519 signature; last field of a beacon

_HEADER = struct.Struct("!4sBBH")    # magic, version, type, flags
_COUNTERS = struct.Struct("!II")     # epoch, counter
_TLV = struct.Struct("!BH")
_ETH = struct.Struct("!6s6sH")


class BeaconError(ValueError):
    """A frame that is not a well-formed homenet beacon or solicit; the text says why."""


@dataclass(frozen=True)
class Beacon:
    epoch: int
    counter: int
    key: bytes
    ipv4: tuple[IPv4Interface, int] | None = None
    ipv6_ll: tuple[IPv6Address, int] | None = None
    tls: tuple[int, bytes] | None = None
    root: str = "homenet/v1"


def _tlv(kind: int, value: bytes) -> bytes:
    return _TLV.pack(kind, len(value)) + value


def encode_beacon(beacon: Beacon, sign: Callable[[bytes], bytes]) -> bytes:
    body = _HEADER.pack(MAGIC, VERSION, TYPE_BEACON, 0) + _COUNTERS.pack(beacon.epoch, beacon.counter)
    body += _tlv(T_KEY, beacon.key)
    if beacon.ipv4:
        iface, port = beacon.ipv4
        body += _tlv(T_IPV4, iface.ip.packed + struct.pack("!BH", iface.network.prefixlen, port))
    if beacon.ipv6_ll:
        address, port = beacon.ipv6_ll
        body += _tlv(T_IPV6_LL, address.packed + struct.pack("!H", port))
    if beacon.tls:
        port, digest = beacon.tls
        body += _tlv(T_TLS, struct.pack("!H", port) + digest)
    body += _tlv(T_ROOT, beacon.root.encode())
    return body + _tlv(T_SIG, sign(body))


def encode_solicit() -> bytes:
    return _HEADER.pack(MAGIC, VERSION, TYPE_SOLICIT, 0)


def frame_type(payload: bytes) -> int:
    """TYPE_BEACON or TYPE_SOLICIT; BeaconError for anything else."""
    if len(payload) < _HEADER.size:
        raise BeaconError(f"truncated: {len(payload)} bytes, shorter than the {_HEADER.size}-byte header")
    magic, version, kind, _flags = _HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise BeaconError(f"bad magic {magic!r}")
    if version != VERSION:
        raise BeaconError(f"unsupported version {version}")
    if kind not in (TYPE_BEACON, TYPE_SOLICIT):
        raise BeaconError(f"unknown frame type {kind}")
    return kind


def _fields(payload: bytes, offset: int) -> tuple[dict[int, bytes], int]:
    """TLVs from `offset`; returns them and the offset where the signature TLV starts."""
    fields: dict[int, bytes] = {}
    while offset < len(payload):
        if offset + _TLV.size > len(payload):
            raise BeaconError("truncated field header")
        kind, length = _TLV.unpack_from(payload, offset)
        value = payload[offset + _TLV.size: offset + _TLV.size + length]
        if len(value) != length:
            raise BeaconError(f"field {kind} truncated: {len(value)} of {length} bytes")
        if kind in fields:
            raise BeaconError(f"field {kind} repeated")
        if kind == T_SIG:
            if offset + _TLV.size + length != len(payload):
                # trailing bytes can only be padding: every padding byte must be zero
                if any(payload[offset + _TLV.size + length:]):
                    raise BeaconError("data after the signature")
            fields[kind] = value
            return fields, offset
        fields[kind] = value
        offset += _TLV.size + length
    raise BeaconError("unsigned beacon: no signature field")


def _sized(fields: dict[int, bytes], kind: int, size: int, name: str) -> bytes | None:
    value = fields.get(kind)
    if value is not None and len(value) != size:
        raise BeaconError(f"{name} field has {len(value)} bytes, not {size}")
    return value


def decode_beacon(payload: bytes, verify: Callable[[bytes, bytes, bytes], bool]) -> Beacon:
    """Parse a beacon and check its signature with the key it carries (pinning is the caller's)."""
    if len(payload) > MAX_FRAME:
        raise BeaconError(f"{len(payload)} bytes, over the {MAX_FRAME}-byte limit")
    if frame_type(payload) != TYPE_BEACON:
        raise BeaconError("not a beacon")
    if len(payload) < _HEADER.size + _COUNTERS.size:
        raise BeaconError("truncated before the counters")
    epoch, counter = _COUNTERS.unpack_from(payload, _HEADER.size)
    fields, sig_at = _fields(payload, _HEADER.size + _COUNTERS.size)
    key = _sized(fields, T_KEY, 32, "key")
    signature = _sized(fields, T_SIG, 64, "signature")
    if key is None:
        raise BeaconError("no configurator key field")
    if not verify(key, signature, payload[:sig_at]):
        raise BeaconError("bad signature")
    ipv4 = tls = ipv6 = None
    if raw := _sized(fields, T_IPV4, 7, "IPv4"):
        prefix, port = struct.unpack("!BH", raw[4:])
        ipv4 = (IPv4Interface((raw[:4], prefix)), port)
    if raw := _sized(fields, T_IPV6_LL, 18, "IPv6 link-local"):
        ipv6 = (IPv6Address(raw[:16]), struct.unpack("!H", raw[16:])[0])
    if (raw := fields.get(T_TLS)) is not None:
        if len(raw) != 34:
            raise BeaconError(f"TLS field has {len(raw)} bytes, not 34")
        tls = (struct.unpack("!H", raw[:2])[0], raw[2:])
    try:
        root = fields.get(T_ROOT, b"homenet/v1").decode()
    except UnicodeDecodeError:
        raise BeaconError("topic root is not UTF-8") from None
    return Beacon(epoch, counter, key, ipv4, ipv6, tls, root)


def ethernet_frame(src: bytes, payload: bytes, ethertype: int = ETHERTYPE, dst: bytes = BROADCAST) -> bytes:
    """A whole Ethernet II frame, zero-padded to the 60-byte minimum."""
    frame = _ETH.pack(dst, src, ethertype) + payload
    if len(frame) > MAX_FRAME:
        raise BeaconError(f"frame of {len(frame)} bytes is over the {MAX_FRAME}-byte limit")
    return frame.ljust(MIN_FRAME, b"\0")


def parse_ethernet(frame: bytes) -> tuple[bytes, bytes, int, bytes]:
    """(dst, src, ethertype, payload) of a received frame."""
    if len(frame) < _ETH.size:
        raise BeaconError("frame shorter than an Ethernet header")
    dst, src, ethertype = _ETH.unpack_from(frame)
    return dst, src, ethertype, frame[_ETH.size:]
