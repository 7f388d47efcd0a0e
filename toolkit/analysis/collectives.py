"""The collectives a compiled program runs, read from its HLO: what a mesh choice costs.

XLA's SPMD partitioner turns shardings into collectives; the compiled module says exactly
which, with their shapes and device groups. Each op is one `Collective`; `summarize_collectives`
totals them per kind with the bytes a device sends on a ring of `group_size` devices:

    all-gather       (n - 1) / n * result        (result = the gathered array)
    reduce-scatter   (n - 1) * result            (result = one device's shard)
    all-reduce       2 (n - 1) / n * result      (reduce-scatter, then all-gather)
    all-to-all       (n - 1) / n * result
    collective-permute   result

    compiled = jax.jit(f).lower(*args).compile()
    ops = parse_collectives(compiled.as_text())
    summarize_collectives(ops)["all-gather"]["sent_bytes"]      # per device, per call of the program

Operations inside loops are counted once per appearance in the text, not per iteration.
"""

import dataclasses
import math
import re

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5}
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+(" + "|".join(KINDS) +
                 r")(-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective op of a compiled HLO module.

    Attributes:
      name: the HLO instruction name.
      kind: one of `KINDS`.
      result_bytes: bytes of its result on one device (for async `-start` ops, the result
        part of the returned tuple).
      group_size: devices in each of its replica groups.
      dtype: element type of its (last) result array, e.g. "f32".
      shape: dimensions of that array on one device.
      scope: the JAX op name XLA kept as metadata, with the `jax.named_scope`s it ran
        under (e.g. ".../shard_map/expert_exchange/all_to_all"), "" if none.
    """

    name: str
    kind: str
    result_bytes: float
    group_size: int
    dtype: str = ""
    shape: tuple = ()
    scope: str = ""

    @property
    def sent_bytes(self) -> float:
        """Bytes one device sends for this op on a ring (see the module docstring)."""
        n = self.group_size
        factor = {"all-gather": (n - 1) / n, "reduce-scatter": n - 1,
                  "all-reduce": 2 * (n - 1) / n, "all-to-all": (n - 1) / n,
                  "collective-permute": 1.0}[self.kind]
        return factor * self.result_bytes if n > 1 else 0.0


def _array_bytes(text: str) -> list:
    return [math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES[dtype]
            for dtype, dims in _ARRAY.findall(text) if dtype in _DTYPE_BYTES]


def _group_size(line: str) -> int:
    """Devices per replica group, from any of XLA's three spellings of `replica_groups`."""
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\].*?\{([^}]*)\}", line)
    if mesh:                                   # mesh['a'=4,'b'=2] ... {'a'}: groups span 'a'
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", mesh.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", mesh.group(2)))
    iota = re.search(r"replica_groups=\[([\d,]+)\]<=", line)
    if iota:                                   # [groups, size]<=[n]
        return int(iota.group(1).split(",")[-1])
    listed = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if listed:                                 # {{0,1},{2,3}}
        return len([d for d in listed.group(1).split(",") if d])
    pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", line)
    if pairs:
        return 2
    raise ValueError(f"cannot read the replica groups of: {line.strip()[:200]}")


def parse_collectives(hlo_text: str) -> list:
    """Every collective in `hlo_text` (e.g. `compiled.as_text()`), in order of appearance."""
    ops = []
    for line in hlo_text.splitlines():
        m = _OP.match(line)
        if not m:
            continue
        name, result, kind, is_async = m.groups()
        sizes = _array_bytes(result)
        size = sizes[-1] if is_async and len(sizes) > 1 else sum(sizes)
        group = 2 if kind == "collective-permute" else _group_size(line)
        arrays = [(t, d) for t, d in _ARRAY.findall(result) if t in _DTYPE_BYTES]
        dtype, dims = arrays[-1] if arrays else ("", "")
        scope = re.search(r'op_name="([^"]*)"', line)
        ops.append(Collective(name=name, kind=kind, result_bytes=size, group_size=group,
                              dtype=dtype, shape=tuple(int(d) for d in dims.split(",") if d),
                              scope=scope.group(1) if scope else ""))
    return ops


def summarize_collectives(ops) -> dict:
    """{kind: {"count", "result_bytes", "sent_bytes"}} over `ops`, for the kinds present."""
    out = {}
    for op in ops:
        row = out.setdefault(op.kind, {"count": 0, "result_bytes": 0.0, "sent_bytes": 0.0})
        row["count"] += 1
        row["result_bytes"] += op.result_bytes
        row["sent_bytes"] += op.sent_bytes
    return out
