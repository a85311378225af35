"""The training-step board of a distributed run: a tiny Ray actor holding the latest training step of
every running cell, which the driver polls for its progress bars.

This module imports nothing: an actor is a worker process of its own, and whatever its class's module
imports (torch, the harness) is imported again in that process, on the same CPUs as the cells.
"""


class StepBoard:
    def __init__(self) -> None:
        self.steps: dict[str, int] = {}

    def report(self, key: str, steps_done: int) -> None:
        self.steps[key] = steps_done

    def snapshot(self) -> dict[str, int]:
        return dict(self.steps)
