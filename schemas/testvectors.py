"""Test vectors for makers of agents (schemas/vectors/), generated from fixed keys.

Ed25519 is deterministic, so the same seeds give the same bytes every time: a test fails when
the committed files drift from what this module makes, and tests/test_vectors.py checks them
with our code and with implementations that are not ours (OpenSSL, a second RFC 8785 library).
`python -m homenet.schemas.testvectors` rewrites the directory.

`verdict` is the receiver's side of the contract in one function: what a configurator or an
agent decides about a payload, given the sender's key and the last `seq` accepted from it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import rfc8785
from nacl.signing import SigningKey

from .envelope import ContractError, canonical, decode, signed_by
from .signing import b64, pairing_code, unb64

VECTOR_DIR = Path(__file__).parent / "vectors"
SEEDS = {
    "device": bytes(range(32)),
    "configurator": bytes(range(32, 64)),
    "other": bytes(range(64, 96)),
}
"""Fixed private seeds (never use them for anything but vectors)."""
DEVICE, CONFIGURATOR = "hn-020000000001", "configurator"
TIME = "2026-12-04T20:00:00.000+00:00"
KEY_ID = {"device": DEVICE, "configurator": CONFIGURATOR}
VERDICTS = ("valid", "bad_signature", "bad_encoding", "replayed", "not_integer", "unknown_kind", "not_json")


def _key(name: str) -> SigningKey:
    return SigningKey(SEEDS[name])


def public(name: str) -> bytes:
    return bytes(_key(name).verify_key)


def _sign(name: str, data: bytes) -> str:
    return b64(_key(name).sign(data).signature)


def _bodies() -> list[tuple[str, str, dict[str, Any]]]:
    """(signer, kind, body) of one message of every kind; strings beyond ASCII where escaping matters."""
    key = b64(public("device"))
    info = {"device_id": DEVICE, "device_type": "iptv-stb", "model": "Télé-Box 4K \u2028 \U0001f4fa",
            "hostname": "stb", "agent_version": "0.1.0", "capabilities": ["executor:iproute2"],
            "interfaces": [{"name": "eth0", "mac": "02:00:00:00:00:01", "up": True,
                            "addresses": ["192.168.1.57/24", "fe80::1/64"]}],
            "applied_version": 0, "public_key": key, "needs_credentials": True}
    config_items = [
        {"kind": "ipv4", "target": "agent", "interface": "eth0", "mac": "02:00:00:00:00:01",
         "address": "192.168.1.20", "prefix_len": 24, "gateway": "192.168.1.1", "dns": ["192.168.1.1"]},
        {"kind": "qos", "target": "gateway", "qos_class": "video", "dscp": 32},
        {"kind": "igmp", "target": "gateway", "enabled": True},
        {"kind": "port_mapping", "target": "gateway", "protocol": "tcp", "external_port": 8443,
         "internal_port": 443, "description": "remote viewing"},
    ]
    return [
        ("configurator", "configurator.state", {"state": "online", "configurator_id": CONFIGURATOR, "epoch": 3,
                                                "public_key": b64(public("configurator"))}),
        ("device", "register", info),
        ("configurator", "register.reply", {"re": "7f0d5c1e2b3a49588a6e1d2c3b4a5968", "status": "accepted",
                                            "reason": "", "config_version": 1,
                                            "credentials": {"username": DEVICE, "password": "s3cret-Pässwort"}}),
        ("configurator", "config", {"device_id": DEVICE, "version": 1, "epoch": 3, "profile": "iptv-stb",
                                    "items": config_items}),
        ("device", "config.result", {"re": "c0ffee00c0ffee00c0ffee00c0ffee00", "version": 1, "status": "ok",
                                     "items": [{"item": "ipv4", "status": "applied", "detail": ""}],
                                     "in_force": {"ipv4": {"address": "192.168.1.20", "prefix_len": 24,
                                                           "gateway": "192.168.1.1", "dns": ["192.168.1.1"]}}}),
        ("device", "info", {**info, "applied_version": 1, "needs_credentials": False}),
        ("configurator", "rpc", {"method": "state", "params": {}}),
        ("device", "rpc.reply", {"re": "0123456789abcdef0123456789abcdef", "ok": True,
                                 "result": {"applied_version": 1}, "error": ""}),
        ("configurator", "gateway.state", {"driver": "linux", "lan": "192.168.1.0/24", "igmp_proxy": True,
                                           "devices": 1}),
        ("configurator", "gateway.device", {"device_id": DEVICE, "reservation": {
            "device_id": DEVICE, "mac": "02:00:00:00:00:01", "address": "192.168.1.20"}, "port_mappings": [],
            "qos": [{"device_id": DEVICE, "address": "192.168.1.20", "qos_class": "video", "dscp": 32}],
            "igmp": True}),
        ("configurator", "command", {"op": "pair", "device_id": None, "code": "123-456", "user": None,
                                     "read_only": True}),
        ("configurator", "command.reply", {"re": "abcdefabcdefabcdefabcdefabcdefab", "ok": True, "error": "",
                                           "result": {"device_id": DEVICE}}),
        ("configurator", "event", {"event": "config.applied", "severity": "info", "device_id": DEVICE,
                                   "topic": None, "sender": None, "reason": "", "detail": {"version": 1}}),
    ]


def envelope(signer: str, kind: str, body: dict[str, Any], seq: int, msg_id: str) -> dict[str, Any]:
    return {"v": 1, "kind": kind, "id": msg_id, "seq": seq, "from": KEY_ID.get(signer, DEVICE),
            "time": TIME, "body": body}


def signed(signer: str, unsigned: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    return {**unsigned, "sig": _sign(key or signer, canonical(unsigned))}


def valid_cases() -> list[dict[str, Any]]:
    cases = []
    for n, (signer, kind, body) in enumerate(_bodies(), start=1):
        unsigned = envelope(signer, kind, body, seq=40 + n, msg_id=f"{n:032x}")
        data = canonical(unsigned)
        message = {**unsigned, "sig": _sign(signer, data)}
        # as sent: members in another order and with spaces, to show that only the canonical form is signed
        sent = json.dumps(dict(reversed(message.items())), ensure_ascii=True, indent=1)
        cases.append({"name": kind, "signer": signer, "payload": sent, "canonical": data.decode(),
                      "canonical_hex": data.hex(), "sig": message["sig"], "verdict": "valid"})
    return cases


def _escaped(signer: str, unsigned: dict[str, Any]) -> str:
    """Signed over sorted, compact JSON with `\\u` escapes instead of raw UTF-8: not RFC 8785."""
    wrong = json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return json.dumps({**unsigned, "sig": _sign(signer, wrong)}, ensure_ascii=False)


def invalid_cases() -> list[dict[str, Any]]:
    register = next(b for s, k, b in _bodies() if k == "register")
    rpc = envelope("configurator", "rpc", {"method": "ping", "params": {}}, seq=60, msg_id="9" * 32)
    reg = envelope("device", "register", register, seq=61, msg_id="8" * 32)
    good = signed("configurator", rpc)
    floated = {**rpc, "body": {"method": "ping", "params": {"timeout": 1.5}}}
    raw_sig = _key("configurator").sign(canonical(rpc)).signature
    flipped = bytes([raw_sig[0] ^ 1]) + raw_sig[1:]

    def dump(obj: dict[str, Any]) -> str:
        return json.dumps(obj, ensure_ascii=False)

    def case(name: str, payload: str, verdict: str, why: str, signer: str = "configurator",
             last_seq: int = 0) -> dict[str, Any]:
        return {"name": name, "signer": signer, "last_seq": last_seq, "payload": payload,
                "verdict": verdict, "why": why}

    hex_key = {**register, "public_key": public("device").hex()}
    return [
        case("flipped signature bit", dump({**rpc, "sig": b64(flipped)}), "bad_signature",
             "the first bit of the signature is flipped"),
        case("signed by another key", dump(signed("configurator", rpc, key="other")), "bad_signature",
             "a valid signature, by a key that is not the sender's"),
        case("body changed after signing", dump({**good, "body": {"method": "refresh", "params": {}}}),
             "bad_signature", "the signature covers the body too"),
        case("signed with \\u escapes", _escaped("device", reg), "bad_signature",
             "the signature covers ASCII-escaped JSON; RFC 8785 keeps non-ASCII text as raw UTF-8",
             signer="device"),
        case("signed with whitespace", dump({**rpc, "sig": _sign("configurator", json.dumps(
            rpc, sort_keys=True).encode())}), "bad_signature",
             "the signature covers JSON with spaces after ':' and ','"),
        case("signature without padding", dump({**rpc, "sig": base64.b64encode(raw_sig).decode().rstrip("=")}),
             "bad_encoding", "sig is unpadded base64; it must be standard padded base64"),
        case("signature in base64url", dump({**rpc, "sig": base64.urlsafe_b64encode(raw_sig).decode()}),
             "bad_encoding", "sig uses the URL-safe alphabet (`-`, `_`); it must be the standard one"),
        case("signature in hex", dump({**rpc, "sig": raw_sig.hex()}), "bad_encoding",
             "sig is hex; it must be base64 of the raw 64 bytes"),
        case("public key in hex", dump(signed("device", {**reg, "body": hex_key})), "bad_encoding",
             "public_key is hex; it must be standard padded base64 of the raw 32 bytes", signer="device"),
        case("replayed seq", dump(good), "replayed", "seq 60 is not above 60, the last accepted", last_seq=60),
        case("older seq", dump(good), "replayed", "seq 60 is below 75, the last accepted", last_seq=75),
        case("float in the body", dump({**floated, "sig": _sign("configurator", rfc8785.dumps(floated))}),
             "not_integer", "numbers in a signed message are integers (signed as JCS would serialize 1.5)"),
        case("unknown kind", dump(signed("configurator", {**rpc, "kind": "reboot"})), "unknown_kind",
             "v1 has no kind `reboot`"),
        case("not JSON", "{\"v\":1,", "not_json", "a truncated payload"),
    ]


def verdict(payload: bytes, signer_key: bytes, last_seq: int = 0) -> str:
    """What a receiver decides about a live message from the holder of `signer_key` (a
    `register` carries its own key: the caller passes that one)."""
    try:
        raw = json.loads(payload)
    except ValueError:
        return "not_json"
    try:
        envelope_, body = decode(payload)
    except ContractError as exc:
        text = str(exc)
        return ("not_integer" if "not an integer" in text else "unknown_kind" if "unknown kind" in text
                else "not_json" if text.startswith("not JSON") else "bad_encoding")
    if envelope_.kind == "register" and (getattr(body, "public_key", None) or "") and \
            len(unb64(body.public_key) or b"") != 32:
        return "bad_encoding"
    sig = unb64(envelope_.sig or "")
    if sig is None or len(sig) != 64 or b64(sig) != raw.get("sig"):
        return "bad_encoding"
    if not signed_by(envelope_, signer_key):
        return "bad_signature"
    if envelope_.seq <= last_seq:
        return "replayed"
    return "valid"


def pairing_vector() -> dict[str, Any]:
    key = public("device")
    data = b"homenet-pairing:" + key
    digest = hashlib.sha256(data).digest()
    number = int.from_bytes(digest[:8], "big")
    return {"public_key": b64(key), "public_key_hex": key.hex(), "input_hex": data.hex(),
            "sha256_hex": digest.hex(), "first_8_bytes_big_endian": str(number),
            "modulo_1000000": number % 1_000_000, "code": pairing_code(key)}


def generate() -> dict[str, str]:
    """File name -> text of every vector file."""
    keys = {name: {"seed_hex": seed.hex(), "public_key": b64(public(name)), "public_key_hex": public(name).hex(),
                   **({"sender": KEY_ID[name]} if name in KEY_ID else {})}
            for name, seed in SEEDS.items()}
    files = {"keys.json": keys, "valid.json": valid_cases(),
             "invalid.json": invalid_cases(), "pairing.json": pairing_vector()}
    return {name: json.dumps(obj, indent=2, ensure_ascii=False) + "\n" for name, obj in files.items()}


def write(directory: Path = VECTOR_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in generate().items():
        (directory / name).write_text(text, encoding="utf-8")
        written.append(directory / name)
    return written


if __name__ == "__main__":
    for p in write(Path(sys.argv[1]) if len(sys.argv) > 1 else VECTOR_DIR):
        print(p)
