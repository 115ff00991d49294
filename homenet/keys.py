"""Ed25519 key pairs kept on disk (owner-only), through libsodium (PyNaCl).

The file is PEM PKCS#8 (RFC 8410), the form `cryptography` and `openssl genpkey -algorithm
ed25519` write: keys made before the move to PyNaCl, or provisioned with openssl, still load.
An Ed25519 PrivateKeyInfo is one fixed 16-byte DER header and the 32-byte seed, so it is
matched whole; anything else (another algorithm, an encrypted key, a stray attribute) is
refused rather than half understood.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from nacl.signing import SigningKey

from homenet.durable import write_atomic
from homenet.schemas.signing import b64, fingerprint, verify

__all__ = ["KeyPair", "b64", "fingerprint", "verify"]

_PKCS8_ED25519 = bytes.fromhex("302e020100300506032b657004220420")
"""SEQUENCE { INTEGER 0, SEQUENCE { OID 1.3.101.112 (id-Ed25519) }, OCTET STRING { OCTET STRING (32) } }"""
_BEGIN, _END = b"-----BEGIN PRIVATE KEY-----", b"-----END PRIVATE KEY-----"


def _to_pem(seed: bytes) -> bytes:
    return b"\n".join((_BEGIN, base64.b64encode(_PKCS8_ED25519 + seed), _END)) + b"\n"


def _from_pem(text: bytes) -> bytes | None:
    """The seed in a PEM PKCS#8 Ed25519 private key, or None for anything else."""
    lines = text.strip().splitlines()
    if len(lines) < 3 or lines[0].strip() != _BEGIN or lines[-1].strip() != _END:
        return None
    try:
        der = base64.b64decode(b"".join(line.strip() for line in lines[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(der) != len(_PKCS8_ED25519) + 32 or not der.startswith(_PKCS8_ED25519):
        return None
    return der[len(_PKCS8_ED25519):]


class KeyPair:
    def __init__(self, private: SigningKey) -> None:
        self._private = private
        self.public = bytes(private.verify_key)

    @classmethod
    def generate(cls) -> "KeyPair":
        return cls(SigningKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> "KeyPair":
        """The key at `path`, made (mode 0600) on first use."""
        path = Path(path)
        if path.exists():
            seed = _from_pem(path.read_bytes())
            if seed is None:
                raise ValueError(f"{path} does not hold an Ed25519 private key")
            return cls(SigningKey(seed))
        pair = cls.generate()
        write_atomic(path, _to_pem(bytes(pair._private)))
        return pair

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data).signature
