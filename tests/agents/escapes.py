"""A broken agent for the conformance tests: it signs (and sends) sorted, compact JSON with
`\\u` escapes for every character beyond ASCII, not the RFC 8785 bytes (otherwise it is
`homenet-agent`). Run it with a model name beyond ASCII."""

import json
import sys

from homenet.schemas import envelope

envelope.canonical = lambda obj: json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()

from homenet.agent.cli import main  # noqa: E402

sys.exit(main())
