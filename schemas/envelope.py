"""The envelope around every JSON payload, and its canonical encoding.

`seq` (per sender, strictly increasing, persisted) and `sig` are part of v1 from the start so
that the security work can make them mandatory without changing the wire format. A signature
covers the envelope without `sig` in RFC 8785 form (JSON Canonicalization Scheme), made by a
maintained library, so that an agent in any language can produce the same bytes with its own
(docs/protocol.md, Signing). Numbers in a message are integers only: JCS would serialize a
float as ECMAScript does, which few JSON libraries reproduce byte for byte.
"""

from __future__ import annotations

import json
import uuid
from decimal import Decimal
from datetime import datetime, timezone
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

import rfc8785
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from . import strictjson
from .messages import BODIES, Model
from .signing import b64, unb64, verify

SIGNATURE_PATTERN = r"^[A-Za-z0-9+/]{85}[AQgw]==$"
"""Standard padded base64 of a raw 64-byte Ed25519 signature: 88 characters."""
MAX_PAYLOAD = 64 * 1024
"""Largest payload a homenet service accepts; the embedded broker's own limit is larger."""


class ContractError(ValueError):
    """A payload that is not a valid v1 message; the text says what was wrong."""


class Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    _signed: bytes = PrivateAttr(default=b"")
    """Canonical bytes of the envelope as received, without `sig`: what the signature covers."""

    v: Literal[1] = Field(1, description="The contract version: 1. A v2 receiver keeps its own topic root.")
    kind: Annotated[str, Field(max_length=32, description="What the body is; one of the kinds below.",
                               json_schema_extra={"enum": sorted(BODIES)})]
    id: Annotated[str, Field(min_length=1, max_length=64, description=(
        "A unique id of this message (e.g. 32 hex digits of a random UUID); a reply names it in `re`."))]
    seq: Annotated[int, Field(ge=0, lt=2**63, strict=True, description=(
        "The sender's sequence number, an integer below 2^63 (`\"5\"` and `5.0` are refused): one counter "
        "for everything it sends, strictly increasing, kept across restarts; a receiver refuses a live "
        "message whose seq is not above the last accepted."))]
    sender: Annotated[str, Field(alias="from", min_length=1, max_length=64, description=(
        "Who sent it: the device id (an agent) or the configurator id."))]
    time: AwareDatetime = Field(description=(
        "When it was sent, RFC 3339 with an offset, in the years 1970-2999. Informative only: a device "
        "clock may be wrong."))

    @field_validator("time")
    @classmethod
    def _plausible(cls, value: datetime) -> datetime:
        """A device clock may be wrong at day 0, never by millennia: 9999-12-31 overflowed
        the first date arithmetic done on it."""
        if not 1970 <= value.year < 3000:
            raise ValueError(f"time {value.isoformat()} is not between 1970 and 3000")
        return value

    body: dict[str, Any] = Field(description="The message itself: the schema of its kind.")
    sig: str | None = Field(None, description=(
        "Ed25519 signature (RFC 8032) of the RFC 8785 canonical bytes of the envelope without `sig`: "
        "standard padded base64 of the raw 64 bytes."),
        json_schema_extra={"pattern": SIGNATURE_PATTERN})


def _no_floats(obj: Any, where: str = "") -> None:
    if isinstance(obj, (float, Decimal)):
        raise ContractError(f"{where or '(top)'}: {obj!r} is not an integer; numbers in a signed message are integers")
    if isinstance(obj, dict):
        for key, value in obj.items():
            _no_floats(value, f"{where}.{key}" if where else str(key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            _no_floats(value, f"{where}[{i}]")


def canonical(obj: Any) -> bytes:
    """RFC 8785 bytes of a JSON value: what is signed. ContractError for a float, an integer
    outside ±(2^53-1), or a string that is not Unicode text (a lone surrogate)."""
    _no_floats(obj)
    try:
        return rfc8785.dumps(obj)
    except rfc8785.CanonicalizationError as exc:
        raise ContractError(f"cannot be canonicalized (RFC 8785): {exc}") from None


def encode(kind: str, body: Model, *, sender: str, seq: int, msg_id: str | None = None,
           sign: Callable[[bytes], bytes] | None = None,
           bodies: Mapping[str, type[Model]] = BODIES) -> tuple[str, bytes]:
    """Wrap a body in an envelope, signed when `sign` is given; return (message id, payload).
    `bodies`: the contract's kinds (the cloud link has its own, schemas/cloud.py)."""
    if bodies.get(kind) is not type(body):
        raise ContractError(f"kind {kind!r} does not carry a {type(body).__name__}")
    msg_id = msg_id or uuid.uuid4().hex
    envelope = {
        "v": 1,
        "kind": kind,
        "id": msg_id,
        "seq": seq,
        "from": sender,
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "body": body.model_dump(mode="json"),
    }
    signed = canonical(envelope)  # also checks the whole message (integers only, Unicode text)
    if sign is None:
        return msg_id, signed
    envelope["sig"] = b64(sign(signed))
    # Sent as sorted, compact UTF-8 JSON by the C encoder: a receiver canonicalizes what it
    # parsed, so the payload need not be RFC 8785 itself (for v1's content it is the same bytes).
    return msg_id, json.dumps(envelope, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def signed_by(envelope: Envelope, public: bytes | None) -> bool:
    """True when the envelope carries a valid signature by `public`."""
    if public is None or envelope.sig is None:
        return False
    signature = unb64(envelope.sig)
    return signature is not None and verify(public, signature, envelope._signed)


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "(top)"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def decode(payload: bytes, *, expected_kind: str | None = None,
           max_size: int = MAX_PAYLOAD, bodies: Mapping[str, type[Model]] = BODIES) -> tuple[Envelope, Model]:
    """Parse and validate a payload; raise ContractError naming the first things wrong."""
    if len(payload) > max_size:
        raise ContractError(f"payload of {len(payload)} bytes is over the {max_size}-byte limit")
    try:
        raw = strictjson.loads(payload)
    except strictjson.JsonError as exc:
        raise ContractError(str(exc)) from None
    if not isinstance(raw, dict):
        raise ContractError(f"not a JSON object but a {type(raw).__name__}")
    try:
        envelope = Envelope.model_validate(raw)
    except ValidationError as exc:
        raise ContractError(f"bad envelope: {_describe(exc)}") from None
    model = bodies.get(envelope.kind)
    if model is None:
        raise ContractError(f"unknown kind {envelope.kind!r}")
    if expected_kind is not None and envelope.kind != expected_kind:
        raise ContractError(f"kind {envelope.kind!r} on a topic that carries {expected_kind!r}")
    envelope._signed = canonical({k: v for k, v in raw.items() if k != "sig"})
    try:
        body = model.model_validate(envelope.body)
    except ValidationError as exc:
        raise ContractError(f"bad {envelope.kind} body: {_describe(exc)}") from None
    return envelope, body
