"""The envelope around every JSON payload, and its canonical encoding.

`seq` (per sender, strictly increasing, persisted) and `sig` are part of v1 from the start so
that the security work can make them mandatory without changing the wire format. Canonical
encoding (sorted keys, no spaces, UTF-8) is what a signature will cover.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from . import strictjson
from .messages import BODIES, Model
from .signing import b64, unb64, verify

MAX_PAYLOAD = 64 * 1024
"""Largest payload a homenet service accepts; the embedded broker's own limit is larger."""


class ContractError(ValueError):
    """A payload that is not a valid v1 message; the text says what was wrong."""


class Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    _signed: bytes = PrivateAttr(default=b"")
    """Canonical bytes of the envelope as received, without `sig`: what the signature covers."""

    v: Literal[1] = 1
    kind: Annotated[str, Field(max_length=32)]
    id: Annotated[str, Field(min_length=1, max_length=64)]
    seq: Annotated[int, Field(ge=0, lt=2**63, strict=True)]
    """An integer: `"5"` and `5.0` are refused, not coerced."""
    sender: Annotated[str, Field(alias="from", min_length=1, max_length=64)]
    time: AwareDatetime

    @field_validator("time")
    @classmethod
    def _plausible(cls, value: datetime) -> datetime:
        """A device clock may be wrong at day 0, never by millennia: 9999-12-31 overflowed
        the first date arithmetic done on it."""
        if not 1970 <= value.year < 3000:
            raise ValueError(f"time {value.isoformat()} is not between 1970 and 3000")
        return value
    body: dict[str, Any]
    sig: str | None = None


def canonical(obj: Any) -> bytes:
    """Deterministic JSON bytes: the form that is hashed and signed."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def encode(kind: str, body: Model, *, sender: str, seq: int, msg_id: str | None = None,
           sign: Callable[[bytes], bytes] | None = None) -> tuple[str, bytes]:
    """Wrap a body in an envelope, signed when `sign` is given; return (message id, payload)."""
    if BODIES.get(kind) is not type(body):
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
    if sign is not None:
        envelope["sig"] = b64(sign(canonical(envelope)))
    return msg_id, canonical(envelope)


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
           max_size: int = MAX_PAYLOAD) -> tuple[Envelope, Model]:
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
    model = BODIES.get(envelope.kind)
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
