"""Ed25519 key pairs kept on disk (owner-only), through the `cryptography` library."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from homenet.durable import write_atomic
from homenet.schemas.signing import b64, fingerprint, verify

__all__ = ["KeyPair", "b64", "fingerprint", "verify"]


class KeyPair:
    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public = private.public_key().public_bytes(serialization.Encoding.Raw,
                                                         serialization.PublicFormat.Raw)

    @classmethod
    def generate(cls) -> "KeyPair":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> "KeyPair":
        """The key at `path`, made (mode 0600) on first use."""
        path = Path(path)
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path} does not hold an Ed25519 private key")
            return cls(key)
        pair = cls.generate()
        write_atomic(path, pair._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        return pair

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)
