"""A broken agent for the conformance tests: it confirms every config `ok` without applying or
reporting a single item (otherwise it is `homenet-agent`)."""

import sys

from homenet.agent import service

service.apply_safely = lambda *args, **kwargs: []

from homenet.agent.cli import main  # noqa: E402

sys.exit(main())
