"""Which EP rank holds which experts of each MoE layer (docs/parallelism.md, "Expert placement").

A placement gives every EP rank the same number of expert slots per MoE layer. The first N/E slots
of the ranks together hold each of the N experts once (the primary slots); further slots, if any,
hold replicas of hot experts. `contiguous_placement` is the layout a teacher loads in unless told
otherwise (expert e on rank e // (N/E)); `balanced_placement` packs the experts by measured
per-expert loads, DeepSeek EPLB's idea: heaviest expert first onto the lightest rank with a free
slot, then each extra slot to the replica that lowers the heaviest rank's load most, re-chosen
until none improves. A replicated expert's assignments are split evenly between its replicas
(`SlotMap.slots_of`), so the loads below count each replica's share.

`SlotMap` is one layer's placement in the form the dispatch uses (ds_moekd/teacher/dispatch.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

RankSlots = tuple[tuple[int, ...], ...]  # one layer: the experts in each EP rank's slots, in slot order


@dataclass(frozen=True)
class ExpertPlacement:
    """`layers[l][r]`: the experts in EP rank r's slots of MoE layer l (in the teacher's order of MoE
    blocks). Checked on construction: equal slots per rank, every expert once in the primary slots,
    no expert twice on one rank."""

    layers: tuple[RankSlots, ...]
    num_experts: int

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(tuple(tuple(s) for s in ranks) for ranks in self.layers))
        if not self.layers:
            raise ValueError("expert placement: no MoE layers")
        for index, ranks in enumerate(self.layers):
            _check_layer(index, ranks, self.num_experts)
        if len({len(ranks) for ranks in self.layers}) > 1 or len({len(r[0]) for r in self.layers}) > 1:
            raise ValueError("expert placement: every MoE layer needs the same EP size and slots per rank")

    @property
    def ep_size(self) -> int:
        return len(self.layers[0])

    @property
    def slots_per_rank(self) -> int:
        return len(self.layers[0][0])

    @property
    def redundant(self) -> int:
        """Replica slots per rank, after the N/E primary slots."""
        return self.slots_per_rank - self.num_experts // self.ep_size

    def to_json(self) -> dict:
        return {"num_experts": self.num_experts, "layers": [[list(slots) for slots in ranks] for ranks in self.layers]}


def _check_layer(index: int, ranks: RankSlots, num_experts: int) -> None:
    primary = num_experts // len(ranks)
    problem = None
    if num_experts % len(ranks) or len({len(slots) for slots in ranks}) != 1:
        problem = f"{num_experts} experts over {len(ranks)} ranks need N/E primary slots and equal slots per rank"
    elif sorted(e for slots in ranks for e in slots[:primary]) != list(range(num_experts)):
        problem = "the primary slots must hold every expert exactly once"
    elif any(len(set(slots)) != len(slots) or not all(0 <= e < num_experts for e in slots) for slots in ranks):
        problem = "a rank holds an expert at most once, and only experts 0..N-1"
    if problem:
        raise ValueError(f"expert placement, MoE layer {index}: {problem}: {[list(s) for s in ranks]}")


def contiguous_slots(num_experts: int, ep_size: int) -> RankSlots:
    """Expert e on rank e // (N/E)."""
    local = num_experts // ep_size
    return tuple(tuple(range(r * local, (r + 1) * local)) for r in range(ep_size))


def contiguous_placement(num_layers: int, num_experts: int, ep_size: int) -> ExpertPlacement:
    return ExpertPlacement(layers=(contiguous_slots(num_experts, ep_size),) * num_layers, num_experts=num_experts)


def balanced_placement(loads_LN: Sequence[Sequence[float]], ep_size: int, redundant: int = 0) -> ExpertPlacement:
    """The placement packing each layer's experts by their measured loads (assignments per expert),
    with `redundant` replica slots per rank. A layer whose packing would not lower the heaviest rank's
    load below the contiguous placement's keeps contiguous primaries."""
    num_experts = len(loads_LN[0])
    if num_experts % ep_size:
        raise ValueError(f"expert placement: {num_experts} experts cannot be split over {ep_size} EP ranks")
    if not 0 <= redundant <= num_experts - num_experts // ep_size:
        raise ValueError(
            f"expert placement: {redundant} redundant slots per rank; a rank holds each of the {num_experts} "
            f"experts at most once, so at most {num_experts - num_experts // ep_size}"
        )
    layers = tuple(_balanced_layer([float(x) for x in loads_N], ep_size, redundant) for loads_N in loads_LN)
    return ExpertPlacement(layers=layers, num_experts=num_experts)


def _balanced_layer(loads: list[float], ep_size: int, redundant: int) -> RankSlots:
    contiguous = [list(slots) for slots in contiguous_slots(len(loads), ep_size)]
    packed = _packed(loads, ep_size)
    ranks = packed if max(_rank_loads(packed, loads)) < max(_rank_loads(contiguous, loads)) else contiguous
    primary = len(loads) // ep_size
    for _ in range(ep_size * redundant):  # each extra slot on the lightest rank with one free
        rank_load = _rank_loads(ranks, loads)
        target = min((r for r in range(ep_size) if len(ranks[r]) < primary + redundant),
                     key=lambda r: (rank_load[r], r))
        ranks[target].append(_best_replica(ranks, loads, target))
    # Filling slot by slot cannot see pairs (at EP 2 each rank must take a replica: the best second
    # one depends on the first), so re-choose each replica given the others until none improves.
    for _ in range(_MAX_PASSES):
        changed = False
        for rank, slots in enumerate(ranks):
            for s in range(primary, len(slots)):
                old = slots.pop(s)
                slots.insert(s, _best_replica(ranks, loads, rank, keep=old))
                changed |= slots[s] != old
        if not changed:
            break
    return tuple(tuple(slots) for slots in ranks)


# Bound on the re-choosing passes: each pass that changes a replica strictly improves the score, so
# they end by themselves; the bound only guards against floating-point ties going round in circles.
_MAX_PASSES = 16


def _packed(loads: list[float], ep_size: int) -> list[list[int]]:
    """Heaviest expert first onto the lightest rank with a free primary slot; each rank's experts ascending."""
    primary = len(loads) // ep_size
    ranks, rank_load = [[] for _ in range(ep_size)], [0.0] * ep_size
    for e in sorted(range(len(loads)), key=lambda e: (-loads[e], e)):
        rank = min((r for r in range(ep_size) if len(ranks[r]) < primary), key=lambda r: (rank_load[r], r))
        ranks[rank].append(e)
        rank_load[rank] += loads[e]
    return [sorted(slots) for slots in ranks]


def _best_replica(ranks: list[list[int]], loads: list[float], target: int, keep: int | None = None) -> int:
    """The expert whose (extra) replica on `target` gives the lowest heaviest-rank load, then the lowest
    sum of squared rank loads; ties keep `keep`, then take the lowest id. A replica of expert e only
    changes the load of e's holders (share L/n -> L/(n+1)) and of `target` (+ L/(n+1)), so each
    candidate costs its replica count, not a pass over every rank."""
    rank_load = _rank_loads(ranks, loads)
    heaviest_first = sorted(range(len(ranks)), key=lambda r: -rank_load[r])
    squares = sum(x * x for x in rank_load)
    holders = [[] for _ in loads]
    for r, slots in enumerate(ranks):
        for e in slots:
            holders[e].append(r)

    def outcome(e: int) -> tuple[float, float, bool, int]:
        share, new_share = loads[e] / len(holders[e]), loads[e] / (len(holders[e]) + 1)
        changed = {r: rank_load[r] - share + new_share for r in holders[e]}
        changed[target] = rank_load[target] + new_share
        others = next((rank_load[r] for r in heaviest_first if r not in changed), 0.0)
        new_squares = squares + sum(x * x - rank_load[r] ** 2 for r, x in changed.items())
        return max(others, *changed.values()), new_squares, e != keep, e

    return min((e for e in range(len(loads)) if target not in holders[e]), key=outcome)


def _rank_loads(ranks: Sequence[Sequence[int]], loads: Sequence[float]) -> list[float]:
    """Each rank's expected assignments: a replicated expert's load split evenly over its replicas."""
    replicas = [0] * len(loads)
    for slots in ranks:
        for e in slots:
            replicas[e] += 1
    return [sum(loads[e] / replicas[e] for e in slots) for slots in ranks]


def rank_loads(placement: ExpertPlacement, loads_LN: Sequence[Sequence[float]]) -> list[list[float]]:
    """Per layer, each EP rank's expected assignments under `placement` for per-expert loads `loads_LN`."""
    return [_rank_loads(ranks, [float(x) for x in loads_N]) for ranks, loads_N in zip(placement.layers, loads_LN)]


def imbalance(rank_loads_LE: Sequence[Sequence[float]]) -> float:
    """Sum over layers of the heaviest rank's load over the sum of the mean rank's: how much longer the
    layers' expert work takes, every layer waiting for its slowest rank, than a perfect balance (>= 1)."""
    mean = sum(sum(loads) / len(loads) for loads in rank_loads_LE)
    return sum(max(loads) for loads in rank_loads_LE) / mean if mean else 1.0


def save_loads(path: str | Path, loads_LN: torch.Tensor) -> None:
    """Per-expert loads `[MoE layers, N]` as JSON, for `teacher.expert_placement: <file>.json`."""
    Path(path).write_text(json.dumps({"loads": loads_LN.tolist()}) + "\n")


def read_loads(path: str | Path) -> list[list[float]]:
    loads = json.loads(Path(path).read_text()).get("loads")
    if not loads or not all(isinstance(row, list) and len(row) == len(loads[0]) for row in loads):
        raise ValueError(f"{path}: expected {{\"loads\": [[assignments per expert] per MoE layer]}}")
    return loads


@dataclass(frozen=True)
class SlotMap:
    """One layer's placement as the dispatch uses it. Global slot g = rank * slots_per_rank + local slot."""

    replica_slots_NR: torch.Tensor  # each expert's global slots, ascending; fewer replicas repeat the last
    replicas_N: torch.Tensor  # replicas per expert
    slots_per_rank: int
    # One slot per expert, ascending with the expert id (the contiguous placement): assignments sorted
    # by expert are already sorted by slot, and the dispatch skips reordering them.
    in_expert_order: bool

    @classmethod
    def of(cls, ranks: Sequence[Sequence[int]], num_experts: int, device: torch.device | str = "cpu") -> SlotMap:
        per_rank = len(ranks[0])
        slots = [[] for _ in range(num_experts)]
        for r, experts in enumerate(ranks):
            for s, e in enumerate(experts):
                slots[e].append(r * per_rank + s)
        width = max(len(s) for s in slots)
        table = [s + s[-1:] * (width - len(s)) for s in slots]
        return cls(
            replica_slots_NR=torch.tensor(table, dtype=torch.long, device=device),
            replicas_N=torch.tensor([len(s) for s in slots], dtype=torch.long, device=device),
            slots_per_rank=per_rank,
            in_expert_order=width == 1 and table == sorted(table),
        )

    def slots_of(self, sorted_ids_A: torch.Tensor) -> torch.Tensor:
        """The slot of each assignment, given the assignments sorted by expert id: each expert's run is
        cut into equal consecutive pieces (sizes differing by at most one), one per replica in slot
        order. Depends only on the run, so every rank that sees the same assignments agrees."""
        if self.replica_slots_NR.shape[1] == 1:
            return self.replica_slots_NR[sorted_ids_A, 0]
        counts_N = torch.bincount(sorted_ids_A, minlength=self.replicas_N.numel())
        start_N = torch.cumsum(counts_N, 0) - counts_N
        position_A = torch.arange(sorted_ids_A.numel(), device=sorted_ids_A.device) - start_N[sorted_ids_A]
        replica_A = position_A * self.replicas_N[sorted_ids_A] // counts_N[sorted_ids_A]
        return self.replica_slots_NR[sorted_ids_A, replica_A]
