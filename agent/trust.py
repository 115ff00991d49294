"""The configurator key this device trusts: provisioned, or pinned on first use."""

from __future__ import annotations

from pathlib import Path

from homenet.durable import write_atomic
from homenet.schemas.signing import b64, unb64


class PinnedKey:
    """The configurator key this device trusts, kept in a file."""

    def __init__(self, path: Path, provisioned: Path | None) -> None:
        self.path = provisioned or path
        self.provisioned = provisioned is not None
        self.key: bytes | None = None
        if self.path.exists():
            self.key = unb64(self.path.read_text().strip())
            if self.key is None or len(self.key) != 32:
                raise ValueError(f"{self.path} does not hold a base64 Ed25519 configurator key")
        elif self.provisioned:
            raise ValueError(f"provisioned configurator key {self.path} does not exist")

    def pin(self, key: bytes) -> None:
        write_atomic(self.path, (b64(key) + "\n").encode(), mode=0o644)
        self.key = key
