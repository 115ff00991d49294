"""A broken agent for the conformance tests: it takes any signature as the configurator's
(otherwise it is `homenet-agent`)."""

import sys

from homenet.agent import service

service.signed_by = lambda envelope, key: envelope.sig is not None

from homenet.agent.cli import main  # noqa: E402

sys.exit(main())
