"""Who may talk to the cloud: each home is known by its configurator's Ed25519 key.

A home's first request (`cloud.hello`) binds its id to the key that signed it (trust on first
use, as the home does with its devices); every later request must be signed by that key.
Replay protection is by `seq`: a home sends several requests at once (a long-poll is open while
a report goes out), so they may arrive out of order; a seq is accepted once, and only within a
window below the highest seen, never by time. The window is IPsec's (RFC 4303, 3.4.3): the
highest seq and a bitmask of the 63 below it, on the home's row, read and written under that
row's lock (SELECT … FOR UPDATE): two statements per request, whatever the process.
The cloud signs its replies with its own key, kept in the database so that every server
process signs with the same one.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from nacl.signing import SigningKey
from sqlalchemy.engine import Connection

from homenet.keys import KeyPair
from homenet.schemas import Envelope, signed_by
from homenet.schemas.cloud import Hello
from homenet.schemas.signing import b64, fingerprint, unb64

from .db import Migration, create, metadata, migrations, server_meta

REPLAY_WINDOW = 63
"""How far below the highest seq a home has used a late request may still arrive (the bits of
a signed 64-bit column)."""

homes = sa.Table(
    "homes", metadata,
    sa.Column("home_id", sa.String(64), primary_key=True),
    sa.Column("public_key", sa.String(64), nullable=False),
    sa.Column("region", sa.String(64), nullable=False, server_default=""),
    sa.Column("high_seq", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("seen_mask", sa.BigInteger, nullable=False, server_default="0",
              comment="bit i set: seq high_seq - 1 - i was accepted"),
    sa.Column("created", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)
migrations("homes", Migration(1, create(homes)))

# Built once: on the path of every request, statement construction was a fifth of its CPU.
_SELECT_HOME = sa.select(homes).where(homes.c.home_id == sa.bindparam("id")).with_for_update()
_UPDATE_WINDOW = homes.update().where(homes.c.home_id == sa.bindparam("id")).values(
    high_seq=sa.bindparam("high"), seen_mask=sa.bindparam("mask"))


class Refused(Exception):
    """A request the cloud does not serve; `status` is the HTTP status, the text the reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class Home:
    home_id: str
    public_key: str
    region: str
    peer: str = ""
    """The address the request came from: the home's WAN address (or its NAT's)."""


def authenticate(conn: Connection, envelope: Envelope, body: object) -> Home:
    """The home that sent this signed request, after its signature and seq are checked and the
    seq recorded (in `conn`'s transaction: a refused request leaves nothing behind)."""
    row = conn.execute(_SELECT_HOME, {"id": envelope.sender}).first()
    if isinstance(body, Hello):
        key = unb64(body.public_key)
        if key is None or len(key) != 32:
            raise Refused(400, "cloud.hello without a valid Ed25519 public_key")
        if not signed_by(envelope, key):
            raise Refused(401, f"bad or missing signature: cloud.hello not signed by the key it carries "
                               f"({fingerprint(key)})")
        if row is None:
            conn.execute(homes.insert().values(home_id=envelope.sender, public_key=body.public_key,
                                               region=body.region))
            row = conn.execute(_SELECT_HOME, {"id": envelope.sender}).one()
        elif row.public_key != body.public_key:
            raise Refused(403, f"another key ({fingerprint(unb64(row.public_key) or b'')}) is bound to "
                               f"home {envelope.sender!r}")
        elif row.region != body.region:
            conn.execute(homes.update().where(homes.c.home_id == row.home_id).values(region=body.region))
    elif row is None:
        raise Refused(403, f"unknown home {envelope.sender!r}: it must send cloud.hello first")
    elif not signed_by(envelope, unb64(row.public_key)):
        raise Refused(401, f"bad or missing signature: {envelope.kind} not signed by the key bound to home "
                           f"{envelope.sender!r}")
    _check_seq(conn, row.home_id, row.high_seq, row.seen_mask, envelope.seq)
    return Home(row.home_id, row.public_key, body.region if isinstance(body, Hello) else row.region)


def accept_seq(high: int, mask: int, seq: int) -> tuple[int, int] | None:
    """Pure: the window after accepting `seq`, or None when it is a replay or too old."""
    if seq > high:
        shift = seq - high
        mask = ((mask << shift) | (1 << (shift - 1))) & ((1 << REPLAY_WINDOW) - 1) if shift <= REPLAY_WINDOW else 0
        return seq, mask
    bit = high - seq - 1
    if seq == high or bit >= REPLAY_WINDOW or mask & (1 << bit):
        return None
    return high, mask | (1 << bit)


def _check_seq(conn: Connection, home_id: str, high: int, mask: int, seq: int) -> None:
    window = accept_seq(high, mask, seq)
    if window is None:
        raise Refused(409, f"replayed or out of order: seq {seq} from home {home_id!r} was already used "
                           f"or is more than {REPLAY_WINDOW} below {high}, the highest seen")
    conn.execute(_UPDATE_WINDOW, {"id": home_id, "high": window[0], "mask": window[1]})


def server_key(conn: Connection) -> KeyPair:
    """The cloud's signing key, made once (under the migration lock) and shared by every process."""
    value = conn.execute(sa.select(server_meta.c.value).where(server_meta.c.name == "signing_key")).scalar()
    if value is None:
        seed = bytes(SigningKey.generate())
        conn.execute(server_meta.insert().values(name="signing_key", value=b64(seed)))
        return KeyPair(SigningKey(seed))
    return KeyPair(SigningKey(unb64(value)))
