"""closeloop: the infrastructure under a self-improving AI agent.

Five layers joined by Kafka topics and stored in ClickHouse: capture (OTLP spans),
understand (intents and tags), diagnose (root causes), act (pull requests) and
review (human approval and measured verdicts).
"""

from __future__ import annotations

__version__ = "0.1.0"
