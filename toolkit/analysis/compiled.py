"""What a compiled program computes and moves, counted from its HLO text, loops included.

XLA's own `compiled.cost_analysis()["flops"]` walks each computation once: the body of a
`fori_loop` or `scan` (micro-batch accumulation, the pipeline's ticks) counts one trip. The
optimized HLO records the trip count of most loops (`known_trip_count`), so we walk the
call graph from the entry computation and weight every computation by how often it runs:

    hlo = jax.jit(f).lower(x).compile().as_text()
    matmul_flops(hlo)        # {"flops": 2 * M * N * K summed over dots, "unknown_loops": 0}
    step_collectives(hlo)    # [(Collective, times it runs per call)]

Only dots are counted (2 FLOPs per multiply-add), the MFU convention; elementwise work is
left to the memory side of the cost model. Loops whose trip count depends on data (the
CPU grouped matmul walks its groups that way) count once and are reported in
`unknown_loops`. Of a `conditional`'s branches, the most expensive is counted.
"""

import math
import re

from toolkit.analysis.collectives import parse_collectives

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(.*?\)|\S+?)(?:\{[\d,]*\})?\s+([\w\-]+)\((.*)$")
_SHAPE = re.compile(r"^[a-z]+\d*[a-z0-9]*\[([\d,]*)\]")
_PARAM = re.compile(r"([\w.\-]+):\s*([a-z]+\d*[a-z0-9]*\[[\d,]*\])")


def _dims(shape_text: str):
    m = _SHAPE.match(shape_text)
    return tuple(int(d) for d in m.group(1).split(",") if d) if m else None


def _computations(hlo_text: str) -> tuple:
    """({name: [instruction lines]}, {name: {value name: dims}}, entry name)."""
    bodies, shapes, entry, current = {}, {}, None, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(1)
            bodies[current], shapes[current] = [], {}
            if line.startswith("ENTRY"):
                entry = current
            for name, shape in _PARAM.findall(header.group(2)):
                shapes[current][name] = _dims(shape)
            continue
        if current is None or line.strip() == "}":
            continue
        instr = _INSTR.match(line)
        if instr:
            bodies[current].append(line)
            shapes[current][instr.group(1)] = _dims(instr.group(2))
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text; pass compiled.as_text()")
    return bodies, shapes, entry


def _callees(line: str) -> list:
    """[(computation, multiplier)] that an instruction runs."""
    out = []
    body = re.search(r"body=%?([\w.\-]+)", line)
    if body:
        trip = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
        out.append((body.group(1), int(trip.group(1)) if trip else None))
        cond = re.search(r"condition=%?([\w.\-]+)", line)
        out.append((cond.group(1), int(trip.group(1)) + 1 if trip else None))
        return out
    for key in ("calls", "to_apply"):
        for name in re.findall(key + r"=%?([\w.\-]+)", line):
            out.append((name, 1))
    branches = re.search(r"branch_computations=\{([^}]*)\}", line)
    if branches:
        out.extend((b.strip().lstrip("%"), "branch") for b in branches.group(1).split(","))
    for pair in ("true_computation", "false_computation"):
        m = re.search(pair + r"=%?([\w.\-]+)", line)
        if m:
            out.append((m.group(1), "branch"))
    return out


def _dot_flops(line: str, shapes: dict) -> float:
    instr = _INSTR.match(line)
    result = _dims(instr.group(2))
    operands = re.findall(r"%([\w.\-]+)", instr.group(4).split(")")[0])
    lhs = shapes.get(operands[0]) if operands else None
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
    if result is None or lhs is None or contracting is None:
        raise ValueError(f"cannot read the shapes of: {line.strip()[:200]}")
    k = math.prod(lhs[int(i)] for i in contracting.group(1).split(",") if i)
    return 2.0 * math.prod(result) * k


def _op_name(line: str) -> str:
    m = re.search(r'op_name="([^"]*)"', line)
    return m.group(1) if m else ""


def _walk(hlo_text: str, scope: str = "") -> tuple:
    """({computation: times it runs}, FLOPs of one call, unknown loop count); only dots whose
    op_name contains `scope` count."""
    bodies, shapes, entry = _computations(hlo_text)
    own = {name: sum(_dot_flops(ln, shapes[name]) for ln in lines
                     if _INSTR.match(ln).group(3) == "dot" and scope in _op_name(ln))
           for name, lines in bodies.items()}
    total_cache, times, unknown = {}, {}, [0]

    def total(name):        # FLOPs of one run of `name`, callees included
        if name not in total_cache:
            flops = own.get(name, 0.0)
            for line in bodies.get(name, ()):
                branches = []
                for callee, mult in _callees(line):
                    if mult == "branch":
                        branches.append(total(callee))
                    else:
                        flops += total(callee) * (mult or 1)
                flops += max(branches, default=0.0)
            total_cache[name] = flops
        return total_cache[name]

    def visit(name, mult):
        times[name] = times.get(name, 0) + mult
        for line in bodies.get(name, ()):
            if "body=" in line and "known_trip_count" not in line:
                unknown[0] += 1
            for callee, m in _callees(line):
                visit(callee, mult * (1 if m in (None, "branch") else m))
    visit(entry, 1)
    return times, total(entry), unknown[0]


def matmul_flops(hlo_text: str, scope: str = "") -> dict:
    """`{"flops": dot FLOPs of one call, loops multiplied out, "unknown_loops": count}`;
    with `scope`, only the dots under that `jax.named_scope` (e.g. "routed_experts")."""
    _, flops, unknown = _walk(hlo_text, scope)
    return {"flops": flops, "unknown_loops": unknown}


def step_collectives(hlo_text: str) -> list:
    """[(Collective, times per call)] for every collective in the program, weighting each by
    the trips of the loops around it (once for loops of unknown length)."""
    times, _, _ = _walk(hlo_text)
    bodies, _, _ = _computations(hlo_text)
    owner = {}
    for name, lines in bodies.items():
        for line in lines:
            owner[_INSTR.match(line).group(1)] = name
    return [(op, times.get(owner.get(op.name), 1)) for op in parse_collectives(hlo_text)]
