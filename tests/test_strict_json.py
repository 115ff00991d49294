"""The holes `json.loads` and lax validation left in the wire contract (issue 11, point 9):
each payload is a `ContractError` naming what is wrong, never another exception."""

from __future__ import annotations

import json

import pytest

from homenet.schemas import ContractError, decode, encode
from homenet.schemas.messages import DeviceInfo, Interface


def signed_register(**envelope: object) -> bytes:
    _, payload = encode("register", DeviceInfo(device_id="dev-1", device_type="nas",
                                               interfaces=[Interface(name="eth0", mac="02:00:00:00:00:01")]),
                        sender="dev-1", seq=5)
    raw = json.loads(payload)
    raw.update(envelope)
    return json.dumps(raw).encode()


HOLES = {
    "nested 1,000 levels": (b'{"a":' * 1000 + b"1" + b"}" * 1000, "nested 1000 levels deep"),
    "a lone surrogate": (signed_register()[:-1] + b',"x":"\\ud800"}', "lone surrogate"),
    "an integer of 4,300 digits": (signed_register()[:-1] + b',"x":' + b"9" * 4300 + b"}", "outside 64 bits"),
    "seq of 10^4000": (signed_register(seq=0)
                       .replace(b'"seq": 0', b'"seq": 1' + b"0" * 4000), "outside 64 bits"),
    "seq as a string": (signed_register(seq="5"), "seq: Input should be a valid integer"),
    "seq as a float": (signed_register(seq=5.0), "seq: Input should be a valid integer"),
    "a key twice": (signed_register()[:-1] + b',"seq":6}', "key 'seq' appears twice"),
    "time 9999-12-31": (signed_register(time="9999-12-31T23:59:59Z"), "is not between 1970 and 3000"),
    "NaN": (signed_register()[:-1] + b',"x":NaN}', "NaN is not a JSON number"),
    "Infinity": (signed_register()[:-1] + b',"x":-Infinity}', "-Infinity is not a JSON number"),
}


@pytest.mark.parametrize("case", HOLES)
def test_each_hole_is_a_contract_error_with_a_reason(case: str) -> None:
    payload, reason = HOLES[case]
    with pytest.raises(ContractError, match=reason.replace("(", r"\(")):
        decode(payload, expected_kind="register")


def test_a_well_formed_message_still_decodes() -> None:
    envelope, body = decode(signed_register(), expected_kind="register")
    assert envelope.seq == 5 and body.device_id == "dev-1"
