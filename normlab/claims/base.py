"""What every claim module provides, and what a verdict contains."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

from ..store import RunRecord
from ..train.config import TrainConfig
from .stats import INCONCLUSIVE

SCALES = ("quick", "full")


@dataclass
class StudyContext:
    """The setting a claim is tested in: data set, scale, seeds and device."""

    dataset: str
    data: object
    scale: str = "quick"
    seeds: int = 3
    device: str = "cpu"

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds))

    def seeds_up_to(self, cap: Optional[int]) -> list[int]:
        """Return the seeds, at most ``cap`` of them (all of them when ``cap`` is None)."""
        return self.seed_list if cap is None else self.seed_list[:cap]


@dataclass
class Verdict:
    """The outcome of testing one claim.

    ``effect`` and ``interval`` are in the unit that ``effect_label`` states; ``interval``
    is a 95% interval across seeds.
    """

    claim: str
    statement: str
    verdict: str
    effect: Optional[float]
    interval: Optional[tuple[float, float]]
    effect_label: str
    dataset: str
    scale: str
    runs: int
    summary: str
    hypothesis: str
    grid: str
    metric: str
    decision_rule: str
    details: dict = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)
    wall_time: float = 0.0
    data_source: str = ""

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["interval"] = list(self.interval) if self.interval is not None else None
        return data


class Claim(ABC):
    """One claim about BatchNorm: its hypothesis, its grid of runs and its decision rule.

    Subclasses fix ``decision_rule`` in code before any run, and :meth:`decide` applies it
    to the stored runs without looking at anything else.
    """

    id: ClassVar[str]
    task: ClassVar[str] = "classify"
    statement: ClassVar[str]
    hypothesis: ClassVar[str]
    metric: ClassVar[str]
    decision_rule: ClassVar[str]

    def load_data(self, dataset: str, data_dir, download: bool) -> tuple[str, object]:
        """Load the data of this claim's task; return ``(dataset name, data)``.

        Claims of the same ``task`` share the result, so this runs once per task.
        """
        from ..data import load_classification

        return dataset, load_classification(dataset, data_dir, download=download)

    @abstractmethod
    def configs(self, ctx: StudyContext) -> list[TrainConfig]:
        """Return every run the claim needs."""

    @abstractmethod
    def grid(self, ctx: StudyContext) -> str:
        """Describe the grid of runs in one or two sentences."""

    @abstractmethod
    def decide(self, ctx: StudyContext, records: dict[str, RunRecord]) -> Verdict:
        """Turn the stored runs into a verdict."""

    @abstractmethod
    def plot(
        self, ctx: StudyContext, records: dict[str, RunRecord], out_dir: Path
    ) -> list[Path]:
        """Write the claim's figures into ``out_dir`` and return their paths."""

    def verdict(self, ctx: StudyContext, records: dict, **fields) -> Verdict:
        """Build a :class:`Verdict` with the claim's fixed texts filled in."""
        return Verdict(
            claim=self.id,
            statement=self.statement,
            hypothesis=self.hypothesis,
            metric=self.metric,
            decision_rule=self.decision_rule,
            grid=self.grid(ctx),
            dataset=ctx.dataset,
            scale=ctx.scale,
            runs=len(records),
            data_source=getattr(ctx.data, "source", ""),
            **fields,
        )

    def inconclusive(self, ctx: StudyContext, records: dict, **fields) -> Verdict:
        """Build an INCONCLUSIVE verdict with no effect, for grids that lack the runs the
        effect needs (``fields`` as for :meth:`verdict`, without the effect)."""
        return self.verdict(
            ctx, records, verdict=INCONCLUSIVE, effect=None, interval=None, **fields
        )
