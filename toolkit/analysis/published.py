"""Published training runs of MoE models, as configs the cost model can price.

Each `Setup` is a run whose MFU its authors reported, written in the toolkit's terms (a
preset, a cluster, mesh overrides). `compare_published()` estimates each with
`toolkit.analysis.step_time` and sets the estimate beside the published figure: the test
of the whole cost model against reality, not against our own compiled programs.

    for row in compare_published():
        print(row["name"], row["published_mfu"], row["estimated_mfu"], row["fits"])

Where a paper leaves a setting out, the setup says what we assumed; where the toolkit's
vocabulary differs (Megatron's distributed optimizer shards AdamW over data-parallel ranks;
the toolkit's `data` axis replicates it, its `fsdp` axis shards everything), the memory
estimate is the toolkit's and `fits` says whether the toolkit could run that layout.
"""

import dataclasses

from toolkit.analysis.hardware import get_cluster
from toolkit.analysis.step_time import estimate_step_time
from toolkit.config import apply_overrides, preset, validate


@dataclasses.dataclass(frozen=True)
class Setup:
    """A published run: `overrides` on `preset`, on `cluster`, with or without `remat`."""

    name: str
    preset: str
    cluster: str
    overrides: tuple
    remat: bool
    published_mfu: float
    source: str
    assumptions: str


_MAXTEXT = Setup(
    name="MaxText Mixtral 8x7B, v5p-128", preset="mixtral_8x7b", cluster="v5p-128",
    overrides=("parallel.data=1", "parallel.fsdp=64", "train.batch_size=768"),
    remat=True, published_mfu=0.5489,
    source="AI-Hypercomputer/maxtext end_to_end/tpu/mixtral/Run_Mixtral.md (PR #751): "
           "251.94 TFLOP/s per chip of 459",
    assumptions="the run's config is unpublished; as every published MaxText Mixtral config: "
                "pure FSDP over the 64 chips, full remat, dropless (megablox), bf16, "
                "sequence 4096; 12 sequences per chip (the v6e-256 config's)")
_MEGATRON = Setup(
    name="Megatron-Core Mixtral 8x22B, 128 H100 (folded)", preset="mixtral_8x22b", cluster="h100x128",
    overrides=("parallel.pipeline=8", "parallel.data=2", "parallel.tensor=2", "parallel.expert=4",
               "parallel.recipe=folded", "train.batch_size=256", "train.microbatches=16",
               "moe.dispatch=capacity", "moe.capacity_factor=1.0"),
    remat=False, published_mfu=0.493,
    source="MoE Parallel Folding (arXiv 2504.14960) Table 3: TP2 EP8 ETP1 PP8 CP1, global batch "
           "256 x 4096, bf16, token dropping at capacity 1.0",
    assumptions="no recompute and 1F1B without virtual stages (the paper states neither); "
                "EP8 folded over the TP pair as expert=4 x tensor=2; 2 sequences per "
                "micro-batch and data rank (16 micro-batches), since the toolkit's folded MoE "
                "splits whole sequences over data x expert x tensor = 16")
PUBLISHED = (
    _MAXTEXT,
    _MEGATRON,
    dataclasses.replace(
        _MEGATRON, name="Megatron-Core Mixtral 8x22B, 128 H100 (folded, VPP 7)",
        overrides=_MEGATRON.overrides + ("parallel.schedule=interleaved", "parallel.virtual_stages=7"),
        assumptions=_MEGATRON.assumptions.replace("1F1B without virtual stages", "7 virtual stages "
                                                  "(one layer per chunk)")),
)


def compare_published(setups=PUBLISHED) -> list:
    """Rows {"name", "published_mfu", "estimated_mfu", "step_s", "memory_gb", "device_gb",
    "fits", "breakdown", "source", "assumptions"}, one per setup."""
    rows = []
    for s in setups:
        cluster = get_cluster(s.cluster)
        cfg = validate(apply_overrides(preset(s.preset), list(s.overrides)), num_devices=cluster.num_devices)
        t = estimate_step_time(cfg, cluster, remat=s.remat)
        mem = t.costs.memory["total"]
        rows.append({"name": s.name, "published_mfu": s.published_mfu, "estimated_mfu": t.mfu,
                     "step_s": t.step_s, "memory_gb": mem / 1e9, "device_gb": cluster.hbm_bytes / 1e9,
                     "fits": mem <= cluster.hbm_bytes * 0.9, "breakdown": t.breakdown,
                     "source": s.source, "assumptions": s.assumptions})
    return rows
