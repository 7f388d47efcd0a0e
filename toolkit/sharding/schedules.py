"""Pipeline schedules as data: who runs which micro-batch, forward or backward, at each tick.

A schedule is each stage's ordered list of operations: `F(i, r)` (the forward of
micro-batch i through the stage's r-th model chunk) and `B(i, r)` (its backward). Running
the lists with their data dependencies gives the timeline:

    F(i, c) needs F(i, c-1) done (c = r*p + s is the chunk's place in the model: with v
            virtual stages, device s holds chunks s, s+p, ..., s+(v-1)p, Megatron's circular
            interleaving);
    B(i, c) needs F(i, c) done, and B(i, c+1) done (or, for the last chunk, the loss).

    tl = timeline("1f1b", stages=4, microbatches=8)
    tl.bubble_fraction()      # 3/11 = (p-1)/(m+p-1): idle share of the p x ticks grid
    tl.bubble_ratio()         # 3/8  = (p-1)/m: Megatron's t_bubble / t_ideal
    tl.peak_in_flight()       # [4, 3, 2, 1]: stashed micro-batches per stage (GPipe: 8 each)

Schedules (Huang et al. 2019; Narayanan et al. 2021):
  gpipe: all forwards, then all backwards. Every stage keeps m micro-batches in flight.
  1f1b: (PipeDream-Flush) stage s runs p-s-1 warm-up forwards, then alternates one forward
      and one backward. The bubble is GPipe's; at most p-s micro-batches are in flight.
  interleaved: 1F1B over v chunks per device, micro-batches taken in groups of p (so m must
      be a multiple of p). Each op is 1/v of a stage; the bubble ratio falls to (p-1)/(v m).

With unit durations (every op one tick) the timeline is what `toolkit.sharding.pipeline`
executes. `timeline(..., forward_time=tf, backward_time=tb)` replays the same lists with
measured op times, for the wall-clock bubble.
"""

import dataclasses

SCHEDULES = ("gpipe", "1f1b", "interleaved")


@dataclasses.dataclass(frozen=True)
class Op:
    """One operation: `kind` "F" or "B" of `microbatch` through local chunk `chunk` on `stage`,
    from `start` to `end` (ticks, or seconds for a timed replay)."""
    stage: int
    kind: str
    microbatch: int
    chunk: int
    start: float
    end: float


def stage_orders(schedule: str, stages: int, microbatches: int, virtual: int = 1) -> list:
    """Per stage, the ordered `(kind, microbatch, chunk)` list the schedule prescribes."""
    p, m, v = stages, microbatches, virtual
    if schedule not in SCHEDULES:
        raise ValueError(f"pipeline schedule {schedule!r} is unknown; use one of {SCHEDULES}")
    if schedule != "interleaved" and v != 1:
        raise ValueError(f"virtual_stages={v} needs schedule 'interleaved' (got {schedule!r})")
    if schedule == "interleaved" and m % p:
        raise ValueError(f"interleaved schedule: microbatches={m} must be a multiple of "
                         f"stages={p}")
    orders = []
    for s in range(p):
        if schedule == "gpipe":
            orders.append([("F", i, 0) for i in range(m)] + [("B", i, 0) for i in range(m)])
            continue
        fwd = [("F", (k // (p * v)) * p + k % p, (k // p) % v) for k in range(m * v)]
        bwd = [("B", (k // (p * v)) * p + k % p, v - 1 - (k // p) % v) for k in range(m * v)]
        warmup = p - s - 1 if v == 1 else (p - s - 1) * 2 + (v - 1) * p
        warmup = min(warmup, m * v)
        order = fwd[:warmup]
        for j in range(m * v - warmup):
            order += [fwd[warmup + j], bwd[j]]
        orders.append(order + bwd[m * v - warmup:])
    return orders


@dataclasses.dataclass(frozen=True)
class Timeline:
    """The ops of one schedule run, and the numbers derived from them."""
    schedule: str
    stages: int
    microbatches: int
    virtual: int
    ops: tuple

    @property
    def length(self) -> float:
        """Makespan: ticks (or seconds) from the first op's start to the last op's end."""
        return max(op.end for op in self.ops)

    def busy(self) -> float:
        """Work time per stage (the same on every stage)."""
        return sum(op.end - op.start for op in self.ops) / self.stages

    def bubble_fraction(self) -> float:
        """Idle share of the stages x makespan grid: (p-1)/(m+p-1) for GPipe and 1F1B."""
        return 1.0 - self.busy() / self.length

    def bubble_ratio(self) -> float:
        """Idle time over work time, Megatron's t_pb / t_id: (p-1)/m, or (p-1)/(v m) interleaved."""
        return (self.length - self.busy()) / self.busy()

    def peak_in_flight(self) -> list:
        """Per stage, the most micro-batch chunks forwarded and not yet backwarded: what a
        stage must keep stashed for its backward passes (activation memory)."""
        peaks = []
        for s in range(self.stages):
            live = peak = 0
            for op in sorted((o for o in self.ops if o.stage == s), key=lambda o: o.start):
                live += 1 if op.kind == "F" else -1
                peak = max(peak, live)
            peaks.append(peak)
        return peaks

    def grid(self) -> list:
        """`grid[tick][stage]` = "F3.0" / "B1.1" / "" (unit-time timelines only)."""
        rows = [["" for _ in range(self.stages)] for _ in range(int(self.length))]
        for op in self.ops:
            rows[int(op.start)][op.stage] = f"{op.kind}{op.microbatch}.{op.chunk}"
        return rows


def timeline(schedule: str, stages: int, microbatches: int, virtual: int = 1, *,
             forward_time: float = 1.0, backward_time: float = 1.0) -> Timeline:
    """Run each stage's `stage_orders` list in order, every op as soon as its inputs exist
    (a send arrives when the producing op ends). Times are per op, i.e. per model chunk;
    unit times give the integer-tick timeline the executor runs."""
    p, v = stages, virtual
    orders = stage_orders(schedule, stages, microbatches, virtual)
    done, ops = {}, []                 # (kind, microbatch, global chunk) -> end time
    pos, free = [0] * p, [0.0] * p
    last = p * v - 1
    while any(pos[s] < len(orders[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            if pos[s] == len(orders[s]):
                continue
            kind, i, r = orders[s][pos[s]]
            c = r * p + s
            if kind == "F":
                deps = [("F", i, c - 1)] if c else []
            else:
                deps = [("F", i, c)] + ([("B", i, c + 1)] if c < last else [])
            if any(d not in done for d in deps):
                continue
            start = max([free[s]] + [done[d] for d in deps])
            end = start + (forward_time if kind == "F" else backward_time)
            done[(kind, i, c)] = end
            ops.append(Op(s, kind, i, r, start, end))
            free[s], pos[s], progressed = end, pos[s] + 1, True
        if not progressed:
            raise RuntimeError(f"schedule {schedule!r} deadlocked at {pos}")
    return Timeline(schedule, stages, microbatches, virtual, tuple(ops))


def theory_bubble_fraction(stages: int, microbatches: int) -> float:
    """GPipe / 1F1B: (p-1)/(m+p-1) of the makespan is idle."""
    return (stages - 1) / (microbatches + stages - 1)


def theory_bubble_ratio(stages: int, microbatches: int, virtual: int = 1) -> float:
    """Megatron's bubble over ideal time: (1/v)(p-1)/m."""
    return (stages - 1) / (virtual * microbatches)
