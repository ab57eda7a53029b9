"""Example agents that closeloop watches and improves (importable for ``closeloop demo``)."""
