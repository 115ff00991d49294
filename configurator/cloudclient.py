"""Signed requests from the home to the cloud servers, and verified replies.

Each request is one envelope (schemas/cloud.py) signed by the configurator's key, the
connection always opened by the home. A reply counts only when it is signed by the cloud's key
(given in the settings, or pinned from its first reply to `cloud.hello`) and answers this
request (`re`), so a reply cannot be replayed onto another request.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from homenet.keys import KeyPair
from homenet.schemas import ContractError, decode, encode, signed_by
from homenet.schemas.cloud import CLOUD_BODIES, CloudReply, Hello
from homenet.schemas.messages import Model
from homenet.schemas.signing import b64, unb64


class CloudError(Exception):
    """The cloud did not give a usable answer; `refused` when it answered with a refusal."""

    def __init__(self, reason: str, refused: bool = False) -> None:
        super().__init__(reason)
        self.refused = refused


class CloudClient:
    def __init__(self, url: str, home_id: str, key: KeyPair, next_seq: Callable[[], int],
                 cloud_key: bytes | None = None, cafile: Path | None = None) -> None:
        """`cloud_key`: the cloud's public key if known (else pinned by `hello`)."""
        self.url = url.rstrip("/")
        self.home_id = home_id
        self.key = key
        self.next_seq = next_seq
        self.cloud_key = cloud_key
        self._tls = ssl.create_default_context(cafile=str(cafile) if cafile else None) \
            if url.startswith("https") else None

    def hello(self, region: str, timeout: float) -> dict[str, Any]:
        """Bind this home's id to its key; pin the cloud's key from the reply if none is known."""
        return self.call("/v1/hello", "cloud.hello", Hello(public_key=b64(self.key.public), region=region), timeout)

    def call(self, path: str, kind: str, body: Model, timeout: float) -> dict[str, Any]:
        msg_id, payload = encode(kind, body, sender=self.home_id, seq=self.next_seq(), sign=self.key.sign,
                                 bodies=CLOUD_BODIES)
        request = urllib.request.Request(self.url + path, data=payload, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=self._tls) as reply:
                data = reply.read()
                pin = reply.headers.get("X-Homenet-Cloud-Key") if kind == "cloud.hello" else None
        except urllib.error.HTTPError as exc:
            raise CloudError(f"{path}: {exc.code} {_reason(exc)}", refused=True) from None
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise CloudError(f"{path}: cloud unreachable ({getattr(exc, 'reason', exc)})") from None
        return self._verify(path, msg_id, data, pin)

    def _verify(self, path: str, msg_id: str, data: bytes, pin: str | None) -> dict[str, Any]:
        try:
            envelope, reply = decode(data, expected_kind="cloud.reply", max_size=8 * 1024 * 1024, bodies=CLOUD_BODIES)
        except ContractError as exc:
            raise CloudError(f"{path}: bad reply: {exc}") from None
        key = self.cloud_key or (unb64(pin) if pin else None)
        if key is None or not signed_by(envelope, key):
            raise CloudError(f"{path}: reply not signed by the cloud's key")
        assert isinstance(reply, CloudReply)
        if reply.re != msg_id:
            raise CloudError(f"{path}: reply answers {reply.re!r}, not this request {msg_id!r}")
        self.cloud_key = key
        return reply.result


def _reason(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read()).get("error", exc.reason))
    except (ValueError, AttributeError, OSError):
        return str(exc.reason)
