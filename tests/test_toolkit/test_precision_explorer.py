"""The precision explorer's state object and its widget, driven without a browser."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from toolkit.config import apply_overrides, tiny
from toolkit.models.transformer import Transformer
from toolkit.precision import get_format
from toolkit.widgets import PrecisionExplorer, PrecisionExplorerView, element_grid


def _explorer():
    cfg = apply_overrides(tiny(), ["model.num_layers=1", "model.seq_len=32"])
    ex = PrecisionExplorer(cfg=cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 32), 0, 256)
    ex.use_model(Transformer(cfg, rngs=nnx.Rngs(0)),
                 [{"tokens": tokens, "targets": jnp.roll(tokens, -1, axis=1)}])
    return ex


def test_knobs_build_format_specs_and_bad_values_keep_the_last_good_ones():
    ex = _explorer()
    assert ex.set(format="mxfp4", block=16, scale_rule="floor")
    assert ex.spec() == "mxfp4,block=16,scale_rule=floor"
    fmt = get_format(ex.spec())
    assert (fmt.block, fmt.scale_rule, fmt.element) == (16, "floor", "e2m1")
    assert not ex.set(format="mxfp5") and "mxfp5" in ex.error and "mxfp4" in ex.error
    assert ex.format == "mxfp4"
    assert not ex.set(block=16, format="int8") and "block formats only" in ex.error
    assert not ex.set(rotation=48) and "rotation=48" in ex.error
    assert ex.set(format="int4", block=0, symmetric=False) and ex.spec() == "int4,symmetric=false"


def test_histogram_is_in_element_units_and_tables_cover_every_class():
    ex = _explorer()
    ex.set(format="nvint4", rotation=16)
    h = ex.histogram("acts", "experts")
    np.testing.assert_array_equal(h["grid"], np.arange(8))
    # an E4M3 block scale rounds to within 1/16, so a block's absmax lands within 7 * (1 +- 1/16)
    assert 7.0 * 15 / 16 <= np.abs(h["scaled"]).max() <= 7.0 * 17 / 16 and "rotated 16" in h["title"]
    assert list(element_grid("e2m1")) == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    rows = ex.qsnr_rows()
    want = {(k, g) for k in ("weights", "acts") for g in (0, 16)}
    assert {(r["kind"], r["rotation"]) for r in rows} == want
    view = PrecisionExplorerView(ex)
    assert view.plot.value[:4] == b"\x89PNG" and "QSNR per tensor class" in view.table.value
    view.knobs["format"].value = "mxfp8"
    assert ex.format == "mxfp8" and "mxfp8" in view.message.value and "8.25 bits" in view.message.value
