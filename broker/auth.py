"""Our amqtt auth plugin.

amqtt's AnonymousAuthPlugin marks every session anonymous, and anonymous sessions lose their
persistent state and queued QoS 1 messages. This plugin admits a client only with a well-formed
client id and leaves the session non-anonymous. Credentials and ACLs come with the security work.
"""

from __future__ import annotations

import re

from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

# amqtt names clients that send an empty id (mosquitto_sub does) "amqtt/<random>".
CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


class ClientIdAuthPlugin(BaseAuthPlugin):
    async def authenticate(self, *, session: Session) -> bool:
        client_id = session.client_id or ""
        if CLIENT_ID.match(client_id):
            session.is_anonymous = False
            return True
        self.context.logger.warning("refused client id %r: not a well-formed client id", client_id)
        return False
