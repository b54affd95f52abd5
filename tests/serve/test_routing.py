"""Adapter affinity: the router's ranking, as a pure function of the replicas' routing stats."""

from __future__ import annotations

from dataclasses import dataclass, field

from flora.serve.routing import rank_replicas


@dataclass(frozen=True)
class Replica:
    """What the router reads from Ray's RunningReplica: its id and routing stats."""

    name: str
    running: int = 0
    resident: tuple[str, ...] = ()
    routing_stats: dict = field(init=False, compare=False)

    def __post_init__(self) -> None:
        stats = {"running": self.running, "waiting": 0, "resident": list(self.resident)}
        object.__setattr__(self, "routing_stats", stats)


def names(ranks) -> list[list[str]]:
    return [[r.name for r in rank] for rank in ranks]


def test_a_replica_holding_the_adapter_comes_first():
    a, b, c = Replica("a", 3), Replica("b", 5, ("acme/py@2",)), Replica("c", 1)
    assert names(rank_replicas([a, b, c], "acme/py@2")) == [["b"], ["c", "a"]]


def test_affinity_yields_to_a_much_less_loaded_replica():
    busy, idle = Replica("busy", 40, ("acme/py@2",)), Replica("idle", 0)
    assert names(rank_replicas([busy, idle], "acme/py@2", slack=8)) == [["idle", "busy"]]


def test_other_versions_and_tenants_do_not_count_as_resident():
    a = Replica("a", 0, ("acme/py@1", "globex/py@2"))
    b = Replica("b", 1)
    assert names(rank_replicas([a, b], "acme/py@2")) == [["a", "b"]]


def test_no_adapter_means_least_loaded_first_and_missing_stats_are_zero():
    a, b = Replica("a", 2), Replica("b", 1)
    blank = Replica("blank")
    object.__setattr__(blank, "routing_stats", None)
    assert names(rank_replicas([a, b, blank], None)) == [["blank", "b", "a"]]
