"""The worker's stage names and consumer groups: shared by the faust app, the worker's command
line and the embedded stack (which starts workers without importing faust)."""

from __future__ import annotations

ALL_STAGES = ("capture", "assemble", "understand", "diagnose", "act", "verify")
CAPTURE_ONLY = ("capture",)  # a capture process: its own consumer group, scaled out by partition


def app_id(stages: tuple[str, ...]) -> str:
    """The faust app id (= consumer group) of a worker running ``stages``. Capture processes
    form their own group, so any number of them split the OTLP partitions among themselves
    while one worker runs the ordered stages."""
    return "closeloop-capture" if tuple(stages) == CAPTURE_ONLY else "closeloop"
