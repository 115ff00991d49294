"""Ed25519 signatures over the canonical encoding, and key encodings used on the wire.

Ed25519 comes from libsodium through PyNaCl: the same RFC 8032 signatures as any other
implementation, in about 2 MB of an agent's memory where `cryptography` took 9 MB
(docs/performance.md, Footprint).
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey


def verify(public: bytes, signature: bytes, data: bytes) -> bool:
    """True only for a valid signature of `data` by `public`; malformed keys or signatures are False."""
    try:
        VerifyKey(public).verify(data, signature)
        return True
    except (BadSignatureError, ValueError):
        return False


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def unb64(text: str) -> bytes | None:
    """Decoded bytes, or None for text that is not base64."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def fingerprint(public: bytes) -> str:
    """Short, readable key id for logs: the first 8 bytes of its SHA-256, hex."""
    return hashlib.sha256(public).hexdigest()[:16]


def pairing_code(public: bytes) -> str:
    """Six digits derived from a device's key, shown by the device, typed by its owner."""
    number = int.from_bytes(hashlib.sha256(b"homenet-pairing:" + public).digest()[:8], "big") % 1_000_000
    return f"{number // 1000:03d}-{number % 1000:03d}"


def canonical_pairing_code(typed: str) -> str:
    """The code as `pairing_code` writes it, from what an owner types: `229670`, `229-670` and
    `229 670` are the same code. ValueError when it is not six digits."""
    digits = "".join(c for c in typed if c not in " -")
    if len(digits) != 6 or not digits.isdigit():
        raise ValueError(f"pairing code {typed!r} is not six digits (e.g. 229-670, as the device shows it)")
    return f"{digits[:3]}-{digits[3:]}"
