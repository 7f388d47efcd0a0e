"""Block sizes as data: table lookup by device-kind prefix, and the timing search."""

import jax.numpy as jnp
import pytest

from pallas_kernels import GmmBlockSizes, gmm, tuning


def test_lookup_prefers_the_most_specific_device_prefix():
    h100 = tuning.block_sizes("gmm", "pallas_gpu", "NVIDIA H100 80GB HBM3")
    assert h100 == tuning.TABLE[("gmm", "pallas_gpu", "NVIDIA H100")]
    assert tuning.block_sizes("gmm", "pallas_gpu", "NVIDIA A10G") == tuning.TABLE[("gmm", "pallas_gpu", "")]
    assert isinstance(tuning.block_sizes("attention", "pallas_tpu", "TPU v5 lite"),
                      tuning.AttentionBlockSizes)
    with pytest.raises(KeyError, match="no block sizes for kernel='gmm' impl='xla'"):
        tuning.block_sizes("gmm", "xla")


def test_search_times_candidates_skips_failures_and_prints_an_entry(capsys):
    x, w = jnp.ones((256, 32)), jnp.ones((4, 32, 16))
    sizes = jnp.array([100, 0, 56, 100])

    def run(bs):
        if bs.tm == 64:
            raise ValueError("pretend this tile does not fit")
        return gmm(x, w, sizes, impl="xla", block_sizes=bs)

    candidates = [GmmBlockSizes(tm=t) for t in (32, 64, 128)]
    best, times = tuning.search(run, candidates, kernel="gmm", impl="xla", repeats=2)
    assert set(times) == {candidates[0], candidates[2]} and best in times
    out = capsys.readouterr().out
    assert "skip GmmBlockSizes(tm=64" in out and "('gmm', 'xla', 'cpu'):" in out
    with pytest.raises(RuntimeError, match="no candidate for gmm/xla ran"):
        tuning.search(lambda bs: run(GmmBlockSizes(tm=64)), candidates[:1], kernel="gmm",
                      impl="xla", verbose=False)


def test_candidate_grids_are_valid_tiles():
    for impl in ("pallas_gpu", "pallas_tpu", "xla"):
        grid = tuning.gmm_candidates(impl)
        assert grid and len(set(grid)) == len(grid)
    assert all(c.tm & (c.tm - 1) == 0 for c in tuning.gmm_candidates("pallas_gpu"))
    assert all(c.block_q % 128 == 0 for c in tuning.attention_candidates("pallas_tpu"))
