"""Wire contract v1 (schemas/): envelope codec, message bodies, topics, canonical encoding."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from ipaddress import IPv4Address

import pytest
from pydantic import ValidationError

from homenet.schemas import (DEFAULT_ROOT, MAX_PAYLOAD, ContractError, Envelope, Topics, TopicError,
                             canonical, check_device_id, decode, encode)
from homenet.schemas.messages import (Command, CommandReply, BODIES, Config, ConfigResult, ConfiguratorState, DeviceInfo,
                                      Event, GatewayDevice, GatewaySummary, IgmpItem, Interface, Ipv4Item, ItemResult,
                                      ItemStatus, PortMapping, PortMappingItem, QosClass, QosItem,
                                      QosRule, RegisterReply, RegisterStatus, Reservation, ResultStatus,
                                      Rpc, RpcReply, Severity, item_key)
from homenet.schemas.topics import DEVICE_CHANNELS

STB = DeviceInfo(
    device_id="stb-1", device_type="iptv-stb", model="STB 9000", hostname="stb",
    agent_version="0.1.0", capabilities=["ipv4", "qos"], applied_version=3, public_key="a2V5",
    interfaces=[Interface(name="eth0", mac="02:00:00:00:00:01", addresses=["192.168.1.20/24", "fe80::1/64"]),
                Interface(name="wlan0", up=False)],
)

ITEMS = [
    Ipv4Item(interface="eth0", mac="02:00:00:00:00:01", address=IPv4Address("192.168.1.2"), prefix_len=24,
             gateway=IPv4Address("192.168.1.1"), dns=["192.168.1.1", "2001:db8::53"]),
    QosItem(qos_class=QosClass.VIDEO, dscp=32),
    PortMappingItem(protocol="tcp", external_port=40000, internal_port=443, description="NAS"),
    IgmpItem(enabled=True),
]

# One valid body per kind: the test below checks this covers every kind in BODIES.
SAMPLES = {
    "configurator.state": ConfiguratorState(state="online", configurator_id="gw-1", epoch=2, public_key="cGs="),
    "register": STB,
    "register.reply": RegisterReply(re="abc", status=RegisterStatus.ACCEPTED, config_version=4,
                                    credentials={"username": "stb-1", "password": "s3cret"}),
    "config": Config(device_id="stb-1", version=4, epoch=2, profile="iptv-stb", items=ITEMS),
    "config.result": ConfigResult(re="abc", version=4, status=ResultStatus.PARTIAL,
                                  items=[ItemResult(item="ipv4", status=ItemStatus.APPLIED),
                                         ItemResult(item="qos", status=ItemStatus.UNSUPPORTED, detail="no tc")],
                                  in_force={"ipv4": {"address": "192.168.1.2/24"}}),
    "info": STB.model_copy(update={"applied_version": 4}),
    "rpc": Rpc(method="refresh", params={"full": True}),
    "rpc.reply": RpcReply(re="abc", ok=False, error="not supported", result={"n": 1}),
    "gateway.state": GatewaySummary(driver="memory", lan="192.168.1.0/24", igmp_proxy=True, devices=2),
    "gateway.device": GatewayDevice(
        device_id="stb-1", igmp=True,
        reservation=Reservation(device_id="stb-1", mac="02:00:00:00:00:01", address=IPv4Address("192.168.1.2")),
        port_mappings=[PortMapping(device_id="stb-1", protocol="tcp", external_port=443,
                                   internal_address=IPv4Address("192.168.1.2"), internal_port=443)],
        qos=[QosRule(device_id="stb-1", address=IPv4Address("192.168.1.2"), qos_class=QosClass.VIDEO, dscp=32)]),
    "event": Event(event="register.rejected", severity=Severity.WARNING, device_id="x-1",
                   topic="homenet/v1/device/x-1/register", sender="x-1", reason="bad body",
                   detail={"seq": 7}),
    "command": Command(op="forget", device_id="nas-1"),
    "command.reply": CommandReply(re="abc", ok=False, error="no device 'nas-1'"),
}


def envelope(kind: str = "rpc", body: dict | None = None, **fields) -> dict:
    raw = {"v": 1, "kind": kind, "id": "m-1", "seq": 1, "from": "gw-1",
           "time": "2024-05-01T12:00:00.000+00:00", "body": {"method": "ping"} if body is None else body}
    raw.update(fields)
    return raw


def payload(raw) -> bytes:
    return json.dumps(raw).encode()


def decode_error(data: bytes, **kwargs) -> str:
    with pytest.raises(ContractError) as excinfo:
        decode(data, **kwargs)
    return str(excinfo.value)


# --- round trip ----------------------------------------------------------------------------

def test_samples_cover_every_kind():
    assert set(SAMPLES) == set(BODIES)
    assert all(type(body) is BODIES[kind] for kind, body in SAMPLES.items())


@pytest.mark.parametrize("kind", sorted(BODIES))
def test_encode_decode_round_trip(kind):
    body = SAMPLES[kind]
    msg_id, data = encode(kind, body, sender="gw-1", seq=42)
    env, decoded = decode(data, expected_kind=kind)
    assert decoded == body
    assert type(decoded) is type(body)
    assert (env.v, env.kind, env.id, env.seq, env.sender, env.sig) == (1, kind, msg_id, 42, "gw-1", None)
    assert env.time.tzinfo is not None


@pytest.mark.parametrize("kind", sorted(BODIES))
def test_encoded_payload_is_one_canonical_utf8_json_object(kind):
    _, data = encode(kind, SAMPLES[kind], sender="gw-1", seq=1, msg_id="fixed")
    raw = json.loads(data.decode("utf-8"))
    assert isinstance(raw, dict)
    assert set(raw) == {"v", "kind", "id", "seq", "from", "time", "body"}
    assert raw["id"] == "fixed"
    assert data == canonical(raw)
    assert len(data) <= MAX_PAYLOAD


def test_encode_gives_a_fresh_message_id_each_time():
    ids = {encode("rpc", SAMPLES["rpc"], sender="gw-1", seq=n)[0] for n in range(20)}
    assert len(ids) == 20


def test_encode_refuses_a_body_of_the_wrong_kind():
    with pytest.raises(ContractError, match="kind 'config' does not carry a Rpc"):
        encode("config", SAMPLES["rpc"], sender="gw-1", seq=1)


def test_encode_refuses_an_unknown_kind():
    with pytest.raises(ContractError, match="'nope'"):
        encode("nope", SAMPLES["rpc"], sender="gw-1", seq=1)


def test_decode_without_expected_kind_accepts_any_known_kind():
    _, data = encode("event", SAMPLES["event"], sender="gw-1", seq=1)
    env, body = decode(data)
    assert env.kind == "event" and body == SAMPLES["event"]


def test_decode_keeps_a_signature():
    env, _ = decode(payload(envelope(sig="c2ln")))
    assert env.sig == "c2ln"


def test_config_items_are_told_apart_by_kind():
    _, data = encode("config", SAMPLES["config"], sender="gw-1", seq=1)
    _, config = decode(data)
    assert [type(i) for i in config.items] == [Ipv4Item, QosItem, PortMappingItem, IgmpItem]
    assert [item_key(i) for i in config.items] == ["ipv4", "qos", "port_mapping:tcp/40000", "igmp"]


# --- decode errors say what was wrong ------------------------------------------------------

@pytest.mark.parametrize("data", [b"", b"{", b"hello", b"\xff\xfe\x00garbage", b'{"v": 1,}'])
def test_payload_that_is_not_json_is_refused(data):
    assert decode_error(data).startswith("not JSON")


@pytest.mark.parametrize("data, name", [(b"[1, 2]", "list"), (b'"text"', "str"), (b"42", "int"),
                                        (b"null", "NoneType")])
def test_json_that_is_not_an_object_is_refused(data, name):
    assert decode_error(data) == f"not a JSON object but a {name}"


@pytest.mark.parametrize("field", ["kind", "id", "seq", "from", "time", "body"])
def test_missing_envelope_field_is_named(field):
    raw = envelope()
    del raw[field]
    message = decode_error(payload(raw))
    assert message.startswith("bad envelope:")
    assert field in message
    assert "Field required" in message


def test_envelope_without_v_is_read_as_version_1():
    # `v` is the one envelope field with a default.
    raw = envelope()
    del raw["v"]
    env, _ = decode(payload(raw))
    assert env.v == 1


@pytest.mark.parametrize("field, value, says", [
    ("v", 2, "v: Input should be 1"),
    ("seq", -1, "seq: Input should be greater than or equal to 0"),
    ("seq", "one", "seq: Input should be a valid integer"),
    ("time", "2024-05-01T12:00:00", "time: Input should have timezone info"),
    ("time", "yesterday", "time:"),
    ("id", "", "id: String should have at least 1 character"),
    ("from", "x" * 65, "from: String should have at most 64 characters"),
    ("body", [], "body: Input should be a valid dictionary"),
])
def test_bad_envelope_field_is_named(field, value, says):
    message = decode_error(payload(envelope(**{field: value})))
    assert message.startswith("bad envelope:")
    assert says in message


def test_missing_envelope_field_message_names_the_field():
    raw = envelope()
    del raw["seq"]
    assert decode_error(payload(raw)) == "bad envelope: seq: Field required"


def test_extra_envelope_field_is_refused():
    message = decode_error(payload(envelope(colour="red")))
    assert message == "bad envelope: colour: Extra inputs are not permitted"


def test_unknown_kind_is_refused():
    assert decode_error(payload(envelope(kind="teleport"))) == "unknown kind 'teleport'"


def test_wrong_kind_for_the_topic_is_refused():
    message = decode_error(payload(envelope(kind="rpc")), expected_kind="config")
    assert message == "kind 'rpc' on a topic that carries 'config'"


@pytest.mark.parametrize("kind, body, says", [
    ("rpc", {"method": "ping", "params": "all"}, "params: Input should be a valid dictionary"),
    ("rpc", {"method": "reboot"}, "method: Input should be 'ping', 'refresh' or 'state'"),
    ("register", {"device_id": "stb-1", "device_type": "iptv-stb", "applied_version": "new"},
     "applied_version: Input should be a valid integer"),
    ("register", {"device_id": "stb-1", "device_type": "iptv-stb",
                  "interfaces": [{"name": "eth0", "mac": "02-00-00-00-00-01"}]},
     "interfaces.0.mac: String should match pattern"),
    ("config", {"device_id": "stb-1", "version": 1, "profile": "x",
                "items": [{"kind": "qos", "qos_class": "video", "dscp": 64}]},
     "items.0.qos.dscp: Input should be less than or equal to 63"),
    ("config", {"device_id": "stb-1", "version": 1, "profile": "x", "items": [{"kind": "wifi"}]},
     "items.0: Input tag 'wifi' found using 'kind' does not match any of the expected tags"),
    ("config", {"device_id": "a/b", "version": 1, "profile": "x", "items": []},
     "device_id: String should match pattern"),
])
def test_body_with_a_wrong_field_is_refused_naming_the_field(kind, body, says):
    message = decode_error(payload(envelope(kind=kind, body=body)))
    assert message.startswith(f"bad {kind} body:")
    assert says in message


def test_body_with_a_missing_field_is_refused_naming_the_field():
    message = decode_error(payload(envelope(kind="rpc.reply", body={"ok": True})))
    assert message == "bad rpc.reply body: re: Field required"


def test_body_with_an_extra_unknown_field_is_refused_naming_the_field():
    message = decode_error(payload(envelope(kind="rpc", body={"method": "ping", "prams": {}})))
    assert message == "bad rpc body: prams: Extra inputs are not permitted"


def test_nested_extra_field_is_refused_naming_its_path():
    body = STB.model_dump(mode="json")
    body["interfaces"][0]["speed"] = 1000
    message = decode_error(payload(envelope(kind="register", body=body)))
    assert message == "bad register body: interfaces.0.speed: Extra inputs are not permitted"


def test_payload_over_max_payload_is_refused_before_parsing():
    data = b"x" * (MAX_PAYLOAD + 1)  # not even JSON: the size check comes first
    assert decode_error(data) == f"payload of {MAX_PAYLOAD + 1} bytes is over the {MAX_PAYLOAD}-byte limit"


def test_valid_message_over_max_payload_is_refused():
    raw = envelope(kind="event", body={"event": "x", "reason": "r" * MAX_PAYLOAD})
    assert "over the" in decode_error(payload(raw))


def test_payload_of_exactly_max_payload_is_accepted():
    raw = envelope(kind="event", body={"event": "x", "reason": ""})
    raw["body"]["reason"] = "r" * (MAX_PAYLOAD - len(payload(raw)))
    data = payload(raw)
    assert len(data) == MAX_PAYLOAD
    decode(data)


def test_max_size_can_be_lowered():
    assert "over the 10-byte limit" in decode_error(payload(envelope()), max_size=10)


def test_contract_error_is_a_value_error():
    assert issubclass(ContractError, ValueError)


def test_envelope_model_is_frozen():
    env, _ = decode(payload(envelope()))
    with pytest.raises(ValidationError):
        env.seq = 2  # type: ignore[misc]
    assert isinstance(env, Envelope)


# --- topics --------------------------------------------------------------------------------

def test_fixed_topics_under_the_default_root():
    topics = Topics()
    assert topics.root == DEFAULT_ROOT == "homenet/v1"
    assert topics.configurator_state == "homenet/v1/configurator/state"
    assert topics.gateway_state == "homenet/v1/gateway/state"
    assert topics.gateway_device("stb-1") == "homenet/v1/gateway/device/stb-1"
    assert topics.gateway_devices == "homenet/v1/gateway/device/+"
    assert topics.events == "homenet/v1/events"
    assert topics.all == "homenet/v1/#"


@pytest.mark.parametrize("channel", sorted(DEVICE_CHANNELS))
@pytest.mark.parametrize("root", [DEFAULT_ROOT, "site-7/homenet"])
def test_device_topic_round_trip(root, channel):
    topics = Topics(root)
    topic = topics.device("stb-1", channel)
    assert topic == f"{root}/device/stb-1/{channel}"
    parsed = topics.parse_device(topic)
    assert (parsed.device_id, parsed.channel) == ("stb-1", channel)
    assert parsed.kind == DEVICE_CHANNELS[channel][0]


@pytest.mark.parametrize("channel", sorted(DEVICE_CHANNELS))
def test_device_filter_matches_one_channel_of_every_device(channel):
    assert Topics().device_filter(channel) == f"homenet/v1/device/+/{channel}"


def test_every_device_channel_carries_a_kind_of_the_contract():
    for kind, _retained in DEVICE_CHANNELS.values():
        assert kind in BODIES or kind == "status"


def test_retained_channels_are_those_of_the_design():
    retained = {channel for channel, (_, keep) in DEVICE_CHANNELS.items() if keep}
    assert retained == {"config", "config/result", "info", "status"}


@pytest.mark.parametrize("channel", ["nope", "", "config/", "register/reply/extra"])
def test_unknown_channel_is_refused(channel):
    with pytest.raises(TopicError, match="unknown"):
        Topics().device("stb-1", channel)
    with pytest.raises(TopicError, match="unknown"):
        Topics().device_filter(channel)
    with pytest.raises(TopicError, match="unknown channel"):
        Topics().parse_device(f"homenet/v1/device/stb-1/{channel}")


@pytest.mark.parametrize("topic", ["homenet/v2/device/stb-1/config", "other/device/stb-1/config",
                                   "homenet/v1/devices/stb-1/config", "homenet/v1/events", ""])
def test_topic_outside_the_device_tree_is_refused(topic):
    with pytest.raises(TopicError, match="is not under homenet/v1/device/"):
        Topics().parse_device(topic)


BAD_IDS = {
    "slash": "a/b",
    "plus": "+",
    "hash": "#",
    "plus-inside": "dev+1",
    "hash-inside": "dev#",
    "dollar": "$x",
    "sys": "$SYS",
    "empty": "",
    "too-long": "a" * 64,
    "space": "my device",
    "leading-space": " dev",
    "trailing-space": "dev ",
    "trailing-newline": "dev\n",
    "newline-inside": "de\nv",
    "tab": "dev\t1",
    "leading-dot": ".hidden",
    "leading-dash": "-rf",
    "non-ascii": "gerät",
    "nul": "dev\x00",
}


@pytest.mark.parametrize("device_id", BAD_IDS.values(), ids=BAD_IDS.keys())
def test_unsafe_device_id_is_rejected_by_check_device_id(device_id):
    with pytest.raises(TopicError, match="is not a safe topic level"):
        check_device_id(device_id)


@pytest.mark.parametrize("device_id", BAD_IDS.values(), ids=BAD_IDS.keys())
def test_unsafe_device_id_is_rejected_by_the_topic_builder(device_id):
    with pytest.raises(TopicError):
        Topics().device(device_id, "config")


@pytest.mark.parametrize("device_id", [i for i in BAD_IDS.values() if "/" not in i],
                         ids=[k for k, i in BAD_IDS.items() if "/" not in i])
def test_unsafe_device_id_is_rejected_by_the_topic_parser(device_id):
    with pytest.raises(TopicError):
        Topics().parse_device(f"homenet/v1/device/{device_id}/config")


def test_device_id_with_a_slash_cannot_smuggle_a_channel():
    # "a/b/config" splits as device "a", channel "b/config": unknown channel, refused.
    with pytest.raises(TopicError, match="unknown channel"):
        Topics().parse_device("homenet/v1/device/a/b/config")


@pytest.mark.parametrize("device_id", BAD_IDS.values(), ids=BAD_IDS.keys())
def test_unsafe_device_id_is_rejected_in_message_bodies_too(device_id):
    with pytest.raises(ValidationError):
        DeviceInfo(device_id=device_id, device_type="generic")


@pytest.mark.parametrize("device_id", ["a", "A", "0", "stb-1", "nas_2.local", "a" * 63,
                                       "Pi4-B.living_room", "00-1a-2b-3c-4d-5e"])
def test_safe_device_id_is_accepted(device_id):
    assert check_device_id(device_id) == device_id
    assert Topics().parse_device(Topics().device(device_id, "info")).device_id == device_id
    assert DeviceInfo(device_id=device_id, device_type="generic").device_id == device_id


def test_non_string_device_id_is_rejected():
    with pytest.raises(TopicError):
        check_device_id(42)  # type: ignore[arg-type]


# --- canonical encoding --------------------------------------------------------------------

def test_canonical_is_independent_of_key_order():
    a = {"b": 1, "a": {"y": [1, 2], "x": None}, "c": "é"}
    b = {"c": "é", "a": {"x": None, "y": [1, 2]}, "b": 1}
    assert canonical(a) == canonical(b)


def test_canonical_is_sorted_compact_utf8():
    assert canonical({"b": 1, "a": [1, 2], "c": "é"}) == '{"a":[1,2],"b":1,"c":"é"}'.encode("utf-8")


def test_canonical_keeps_list_order():
    assert canonical([2, 1]) != canonical([1, 2])


def test_canonical_round_trips_through_json():
    obj = {"z": [1, {"k": True}], "a": "ünïcode", "n": None, "i": -7}
    assert json.loads(canonical(obj)) == obj


def test_canonical_is_rfc8785_sorting_keys_by_utf16_code_units():
    # "\U0001f600" (UTF-16 D83D DE00) sorts before "\ufb01" (FB01) in JCS, after it by code point
    assert canonical({"\ufb01": 1, "\U0001f600": 2}) == '{"\U0001f600":2,"\ufb01":1}'.encode()


def test_canonical_refuses_floats_anywhere():
    with pytest.raises(ContractError, match=r"detail.x\[1\]: 1.5 is not an integer"):
        canonical({"detail": {"x": [1, 1.5]}})


def test_canonical_refuses_integers_beyond_the_safe_range():
    with pytest.raises(ContractError, match="RFC 8785"):
        canonical({"n": 2 ** 53})


def test_a_received_float_is_refused_with_the_field_named():
    raw = envelope()
    raw["body"] = {"method": "ping", "params": {"timeout": 1.5}}
    with pytest.raises(ContractError, match="body.params.timeout: 1.5 is not an integer"):
        decode(json.dumps(raw).encode())


def test_canonical_is_stable_across_calls():
    obj = envelope()
    assert len({canonical(obj) for _ in range(10)}) == 1


def test_encode_time_is_rfc3339_with_timezone():
    _, data = encode("rpc", SAMPLES["rpc"], sender="gw-1", seq=1)
    stamp = datetime.fromisoformat(json.loads(data)["time"])
    assert stamp.tzinfo is not None
    assert abs((datetime.now(timezone.utc) - stamp).total_seconds()) < 60
