"""The progress board of a distributed run: a tiny Ray actor holding the latest training step of every
running cell and the pairs each of its evaluation pieces (the whole cell, or a shard) has scored, which the
driver polls for its progress bars.

This module imports nothing: an actor is a worker process of its own, and whatever its class's module
imports (torch, the harness) is imported again in that process, on the same CPUs as the cells.
"""


class StepBoard:
    def __init__(self) -> None:
        self.steps: dict[str, int] = {}
        self.pairs: dict[str, dict[int, int]] = {}  # cell key → {first pair of the piece: pairs scored}

    def report(self, key: str, steps_done: int) -> None:
        self.steps[key] = steps_done

    def report_pairs(self, key: str, piece: int, pairs_done: int) -> None:
        self.pairs.setdefault(key, {})[piece] = pairs_done

    def snapshot(self) -> dict[str, int]:
        return dict(self.steps)

    def progress(self) -> dict[str, dict[str, int]]:
        """``{"steps": {cell: training steps done}, "pairs": {cell: pairs scored in this run, over its pieces}}``."""
        return {"steps": dict(self.steps), "pairs": {key: sum(pieces.values()) for key, pieces in self.pairs.items()}}
