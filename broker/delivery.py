"""QoS 1 to a client in amqtt 0.12.1 kept until it is acknowledged, as MQTT 3.1.1 asks.

amqtt waits 5 s (hard-coded) for a PUBACK, then drops the message; and when the connection
ends first, it drops it too (its `finally` discards the in-flight message whatever happened).
A device stalled for longer than that, or whose link failed with a message on the way, never
got it: a live `register.reply` was lost. MQTT 3.1.1 §4.4 [MQTT-4.4.0-1]: an unacknowledged
PUBLISH of a persistent session is sent again, with the same packet id and DUP set, when the
client reconnects; amqtt does that from `session.inflight_out` (`_retry_deliveries`) if the
message is still there.

So here, for the broker's handlers only: while connected the PUBACK is awaited without a
deadline (the keepalive, 1.5 x the client's, ends a dead connection), and a message not
acknowledged when its connection ends stays in flight, to be sent again on the session's next
connection. A clean session is discarded at disconnect with everything in it, as before.
Written against amqtt 0.12.1 (pinned); its QoS 0 and QoS 2 flows and the incoming side are
unchanged.
"""

from __future__ import annotations

import asyncio
from typing import Any

from amqtt.mqtt.constants import QOS_1
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.protocol.handler import OUTGOING
from amqtt.session import OutgoingApplicationMessage

_amqtt_qos1_flow = BrokerProtocolHandler._handle_qos1_message_flow


async def _qos1_until_acknowledged(self: Any, app_message: Any) -> None:
    if app_message.direction != OUTGOING or app_message.qos != QOS_1 or app_message.puback_packet:
        await _amqtt_qos1_flow(self, app_message)  # incoming, and amqtt's own checks
        return
    packet_id = app_message.packet_id
    if packet_id not in self.session.inflight_out and isinstance(app_message, OutgoingApplicationMessage):
        self.session.inflight_out[packet_id] = app_message
    retry = app_message.publish_packet is not None
    app_message.publish_packet = app_message.build_publish_packet(dup=retry)
    waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    self._puback_waiters[packet_id] = waiter  # before sending: the PUBACK may come back at once
    try:
        await self._send_packet(app_message.publish_packet)
        app_message.puback_packet = await waiter
    finally:
        self._puback_waiters.pop(packet_id, None)
    # acknowledged: only now is it no longer in flight (cancelled -> stays, sent again on reconnect)
    self.session.inflight_out.pop(packet_id, None)


def install() -> None:
    """Make the broker's protocol handlers keep QoS 1 messages until their PUBACK."""
    BrokerProtocolHandler._handle_qos1_message_flow = _qos1_until_acknowledged
