"""Ed25519 keys on disk and signatures (homenet/keys.py, schemas/signing.py, on PyNaCl).

Key files must stay readable across the move from `cryptography` to PyNaCl, and signatures
must be plain RFC 8032 Ed25519: `cryptography` (a dependency of the gateway) is the reference.
"""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from homenet.keys import KeyPair
from homenet.schemas.signing import verify

RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_a_key_written_by_cryptography_loads_and_signs_the_same(tmp_path: Path) -> None:
    reference = Ed25519PrivateKey.generate()
    path = tmp_path / "agent.key"
    path.write_bytes(reference.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    pair = KeyPair.load_or_create(path)
    assert pair.public == reference.public_key().public_bytes(*RAW)
    assert pair.sign(b"payload") == reference.sign(b"payload")  # Ed25519 is deterministic


def test_a_new_key_is_owner_only_pkcs8_that_cryptography_reads(tmp_path: Path) -> None:
    path = tmp_path / "agent.key"
    pair = KeyPair.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(loaded, Ed25519PrivateKey)
    assert loaded.public_key().public_bytes(*RAW) == pair.public
    assert KeyPair.load_or_create(path).public == pair.public  # the same key on the next start
    Ed25519PublicKey.from_public_bytes(pair.public).verify(pair.sign(b"m"), b"m")


@pytest.mark.parametrize("text", [
    b"",
    b"not a key\n",
    b"-----BEGIN PRIVATE KEY-----\n!!!!\n-----END PRIVATE KEY-----\n",
    # an Ed448 key: another algorithm in the same PKCS#8 frame
    b"-----BEGIN PRIVATE KEY-----\n" + base64.b64encode(bytes.fromhex("3047020100300506032b6571043b0439")
                                                         + bytes(57)) + b"\n-----END PRIVATE KEY-----\n",
    # the Ed25519 header with a seed one byte short
    b"-----BEGIN PRIVATE KEY-----\n" + base64.b64encode(bytes.fromhex("302e020100300506032b657004220420")
                                                         + bytes(31)) + b"\n-----END PRIVATE KEY-----\n",
])
def test_a_file_that_is_not_an_ed25519_key_is_refused(tmp_path: Path, text: bytes) -> None:
    path = tmp_path / "agent.key"
    path.write_bytes(text)
    with pytest.raises(ValueError, match="does not hold an Ed25519 private key"):
        KeyPair.load_or_create(path)


def test_verify_accepts_only_the_signers_valid_signature() -> None:
    pair, other = KeyPair.generate(), KeyPair.generate()
    signature = pair.sign(b"data")
    assert verify(pair.public, signature, b"data")
    assert not verify(pair.public, signature, b"date")
    assert not verify(other.public, signature, b"data")
    assert not verify(pair.public, signature[:-1] + bytes([signature[-1] ^ 1]), b"data")
    assert not verify(pair.public, signature[:63], b"data")  # malformed: False, not an exception
    assert not verify(pair.public[:31], signature, b"data")
