"""The registry of methods: the one list :class:`~spinflow.graph.Graph` declares the pipeline from,
the report takes its sections from, in the order their stages appear in dvc.yaml (see
:mod:`spinflow.methods` for what a method folder holds)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from spinflow.methods.autoif import graph as autoif_graph
from spinflow.methods.lobass import graph as lobass_graph
from spinflow.methods.sft import graph as sft_graph
from spinflow.methods.spin import graph as spin_graph

if TYPE_CHECKING:
    from spinflow.config import Params
    from spinflow.nodes import GraphBuilder


@dataclass(frozen=True)
class Method:
    """One registered method."""

    name: str  # its params section
    declare: Callable[[GraphBuilder], None]  # adds its part of the pipeline graph
    enabled: Callable[[Params], bool]  # whether these params run it
    # params keys whose values add or remove its rows in the report
    report_params: tuple[str, ...] = ()
    # module with section(graph) -> list[str], loaded by the report stage alone (so that editing
    # it re-runs the report and nothing else); None: the method adds rows only
    report: str | None = None


METHODS: tuple[Method, ...] = (
    Method("sft", sft_graph.declare, lambda p: True, ("sft.enabled",)),
    Method(
        "lobass",
        lobass_graph.declare,
        lambda p: p.lobass.enabled,
        ("lobass",),
        "spinflow.methods.lobass.report",
    ),
    Method(
        "spin",
        spin_graph.declare,
        lambda p: True,
        ("spin.iterations", "spin.start", "sft_extra"),
        "spinflow.methods.spin.report",
    ),
    Method(
        "autoif",
        autoif_graph.declare,
        lambda p: p.autoif.enabled,
        ("autoif.enabled", "autoif.iterations"),
        "spinflow.methods.autoif.report",
    ),
)
