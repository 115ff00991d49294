"""Who may publish and read what on the broker (pure: the amqtt plugin and the Mosquitto
dynamic-security provisioning both render these rules).

- configurator: everything under the topic root.
- device D (enrolled, username D): publish its own register, config/result, info, status,
  rpc/reply; read configurator/state and its own config, register/reply and rpc.
- unknown (no username; the client id is its device id): publish only its own register and
  status (its will: presence is not configuration); read configurator/state and its own
  register/reply.
- reader (read-only operator): read everything under the root, publish nothing.
- operator: what a reader may, and publish configurator commands.
"""

from __future__ import annotations

from enum import StrEnum

from homenet.schemas.topics import Topics, TopicError, check_device_id


class Role(StrEnum):
    CONFIGURATOR = "configurator"
    DEVICE = "device"
    UNKNOWN = "unknown"
    READER = "reader"
    OPERATOR = "operator"


DEVICE_PUBLISH = ("register", "config/result", "info", "status", "rpc/reply")
DEVICE_READ = ("config", "register/reply", "rpc")


def _under(topics: Topics, topic: str) -> bool:
    return topic == topics.root or topic.startswith(topics.root + "/")


def _device_topics(topics: Topics, device_id: str, channels: tuple[str, ...]) -> set[str]:
    try:
        return {topics.device(check_device_id(device_id), c) for c in channels}
    except TopicError:
        return set()


def may_publish(role: Role, name: str, topics: Topics, topic: str) -> bool:
    if role == Role.CONFIGURATOR:
        return _under(topics, topic)
    if role == Role.DEVICE:
        return topic in _device_topics(topics, name, DEVICE_PUBLISH)
    if role == Role.UNKNOWN:
        return topic in _device_topics(topics, name, ("register", "status"))
    if role == Role.OPERATOR:
        return topic == topics.command
    return False


def may_receive(role: Role, name: str, topics: Topics, topic: str) -> bool:
    """Whether a message on `topic` is delivered to this client."""
    if role in (Role.CONFIGURATOR, Role.READER, Role.OPERATOR):
        return _under(topics, topic)
    channels = DEVICE_READ if role == Role.DEVICE else ("register/reply",)
    return topic == topics.configurator_state or topic in _device_topics(topics, name, channels)


def may_subscribe(role: Role, name: str, topics: Topics, topic_filter: str) -> bool:
    """Privileged roles may use any filter (`homenet/#`, `#`): what they receive is still
    checked topic by topic. Devices may only subscribe to the exact topics they may receive."""
    if role in (Role.CONFIGURATOR, Role.READER, Role.OPERATOR):
        return True
    return may_receive(role, name, topics, topic_filter)
