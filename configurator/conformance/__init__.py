"""`homenet conformance agent`: checks any agent, in any language, against docs/protocol.md.

A subpackage of the configurator because it plays the configurator's side: it needs the
gateway extra (the embedded broker) and ships with the `homenet` command, not with the agent.
"""

from .walk import RULES, Report, Timing, Verdict, check_agent

__all__ = ["RULES", "Report", "Timing", "Verdict", "check_agent"]
