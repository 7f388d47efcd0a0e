"""Number formats, rotation, fake-quant training, FMPQ and the precision analysis."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from toolkit.config import ConfigError, apply_overrides, tiny, validate
from toolkit.precision import (
    CROSSOVER_CREST,
    ELEMENTS,
    FORMATS,
    MX_NV,
    crest_factor,
    dequantize,
    describe_mode,
    fake_quant,
    get_format,
    native_dot,
    native_supported,
    qsnr,
    qsnr_theory,
    quantize,
    quantize_dequantize,
    quantize_grad,
    rotate,
    round_to_element,
    unrotate,
    use_precision,
)
from toolkit.precision.mixed import int8_fraction_needed, outlier_permutation

FP_ELEMENTS = [e for e, spec in ELEMENTS.items() if spec[0] == "fp"]


def _representable(element):
    """Every finite value of an FP element (from ml_dtypes), and the midpoints between them."""
    dtype = ELEMENTS[element][4]
    grid = np.linspace(-ELEMENTS[element][3], ELEMENTS[element][3], 200001, dtype=np.float32)
    vals = np.unique(grid.astype(dtype).astype(np.float32))
    return vals, ((vals[1:].astype(np.float64) + vals[:-1]) / 2).astype(np.float32)


@pytest.mark.parametrize("element", FP_ELEMENTS)
def test_fp_elements_round_trip_and_match_ml_dtypes(element):
    vals, mids = _representable(element)
    np.testing.assert_array_equal(np.asarray(round_to_element(jnp.asarray(vals), element)), vals)
    rng = np.random.default_rng(0)
    x = np.concatenate([mids, rng.uniform(-1, 1, 5000).astype(np.float32) * ELEMENTS[element][3]])
    want = x.astype(ELEMENTS[element][4]).astype(np.float32)       # ml_dtypes: round half to even
    np.testing.assert_array_equal(np.asarray(round_to_element(jnp.asarray(x), element)), want)


def _blocky(fmt, rng, rows=8, k=128):
    """Values on `fmt`'s grid whose groups each hold +-qmax, times a power of two per row."""
    if fmt.is_int:
        codes = rng.integers(-int(fmt.qmax), int(fmt.qmax) + 1, (rows, k)).astype(np.float32)
    else:
        vals, _ = _representable(fmt.element)
        codes = rng.choice(vals, (rows, k)).astype(np.float32)
    g = fmt.block if fmt.scaling in ("block", "block2d") else k
    codes[:, ::g] = fmt.qmax
    shared = fmt.scaling in ("tensor", "block2d")              # one scale across the rows
    return codes * np.exp2(rng.integers(-6, 6, (1 if shared else rows, 1))).astype(np.float32)


@pytest.mark.parametrize("name", [n for n in FORMATS if FORMATS[n].scaling != "none"])
def test_representable_values_round_trip(name):
    fmt = get_format(name)
    x = _blocky(fmt, np.random.default_rng(1))
    q = quantize(x, fmt)
    back = np.asarray(dequantize(q))
    if fmt.element in ("e4m3", "e5m2", "e2m1", "int8", "int4"):      # storage dtypes JAX has
        assert q.codes().dtype.itemsize == 1 and q.codes().dtype != jnp.float32
        np.testing.assert_array_equal(np.asarray(q.codes().astype(jnp.float32)), np.asarray(q.values))
    if fmt.scale == "e4m3":            # s_block * s_tensor is exact only to fp32 rounding
        np.testing.assert_allclose(back, x, rtol=2e-7, atol=0)
    else:
        np.testing.assert_array_equal(back, x)


@pytest.mark.parametrize("name", ["mxfp8", "mxfp6", "mxfp4", "fp8_e5m2_1x128", "nvfp4"])
def test_quantized_values_are_ml_dtypes_casts(name):
    fmt = get_format(name)
    x = np.random.default_rng(2).standard_t(3, (16, 128)).astype(np.float32)
    q = quantize(x, fmt)
    scaled = np.asarray(jnp.asarray(x).reshape(q.values.shape) / q.scales)
    want = np.clip(scaled, -fmt.qmax, fmt.qmax).astype(ELEMENTS[fmt.element][4]).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(q.values), want)


@pytest.mark.parametrize("name", [n for n in MX_NV])
def test_scales_are_powers_of_two_for_mx_and_e4m3_for_nv(name):
    fmt = get_format(name)
    x = np.random.default_rng(3).normal(size=(32, 256)) * np.exp2(np.arange(32))[:, None] / 1e4
    q = quantize(x.astype(np.float32), fmt)
    s = np.asarray(q.scales, np.float32)
    if fmt.scale == "ue8m0":
        np.testing.assert_array_equal(np.exp2(np.round(np.log2(s))), s)
        np.testing.assert_array_equal(s.astype(ml_dtypes.float8_e8m0fnu).astype(np.float32), s)
    else:
        s_tensor = np.max(np.abs(x)).astype(np.float32) / np.float32(448 * fmt.qmax)
        block = s / s_tensor
        np.testing.assert_allclose(block.astype(ml_dtypes.float8_e4m3fn).astype(np.float32), block,
                                   rtol=1e-6)


def test_symmetric_clipping_never_reaches_minus_two_to_the_b_minus_one():
    floor = get_format("mxint8").replace(scale_rule="floor")       # floor can clip the absmax
    x = np.full((1, 32), 0.5, np.float32)
    x[0, 0] = -127.9
    assert float(jnp.min(quantize(x, floor).values)) == -127.0
    assert float(jnp.min(quantize(x, floor.replace(symmetric=False)).values)) == -128.0
    big = np.random.default_rng(4).normal(size=(64, 128)).astype(np.float32) * 50
    for name in ("int8", "int4", "mxint8", "mxint4", "nvint4", "int4_g128"):
        fmt = get_format(name)
        assert float(jnp.min(quantize(big, fmt.replace(scale_rule="floor")).values)) >= -fmt.qmax


def test_floor_scale_rule_clips_where_round_up_does_not():
    x = np.zeros((1, 32), np.float32)
    x[0, 0] = 1.9
    assert float(quantize_dequantize(x, get_format("mxfp4").replace(scale_rule="floor"))[0, 0]) == 1.5
    assert float(quantize_dequantize(x, get_format("mxfp4"))[0, 0]) == 2.0


def test_bits_per_value_count_block_scales():
    assert get_format("mxfp4").bits_per_value == 4.25 and get_format("nvfp4").bits_per_value == 4.5
    assert get_format("mxint8").bits_per_value == 8.25 and get_format("mxfp6").bits == 6
    assert get_format("fp8_e4m3_128x128").bits_per_value == 8 + 32 / 128 ** 2


def test_unknown_names_and_bad_formats_say_what_works():
    with pytest.raises(ValueError, match="mxint8"):
        get_format("mxint9")
    with pytest.raises(ValueError, match="block >= 1"):
        get_format("mxint8").replace(block=0)


def test_hadamard_rotation_inverts_and_keeps_products():
    x = jax.random.normal(jax.random.key(0), (64, 128))
    w = jax.random.normal(jax.random.key(1), (128, 48))
    for g in (16, 32, 128):
        np.testing.assert_allclose(unrotate(rotate(x, g), g), x, atol=2e-6)
        np.testing.assert_allclose(rotate(x, g) @ rotate(w, g, axis=0), x @ w, rtol=1e-5, atol=1e-4)
    spiky = jnp.zeros((4, 32)).at[:, 3].set(10.0) + 0.01
    assert crest_factor(rotate(spiky, 32), 32) < 0.5 * crest_factor(spiky, 32)
    with pytest.raises(ValueError, match="power of two"):
        rotate(x, 24)


def test_gaussian_qsnr_follows_int_vs_fp_theory():
    x = jax.random.normal(jax.random.key(0), (1024, 256))
    db = {name: qsnr(x, name) for name in MX_NV}
    for (int_fmt, fp_fmt), crossover in CROSSOVER_CREST.items():
        crest = crest_factor(x, get_format(int_fmt).block)
        assert 2.0 < crest < 2.5                              # Gaussian blocks of 16/32
        assert (db[int_fmt] > db[fp_fmt]) == (crest < crossover), (int_fmt, fp_fmt, db)
        assert abs(db[int_fmt] - qsnr_theory(int_fmt, crest)) < 1.5
        assert abs(db[fp_fmt] - qsnr_theory(fp_fmt, crest)) < 1.5
    assert db["mxint8"] - db["mxfp8"] > 8                     # the paper: about 40 vs 31.5 dB


def test_straight_through_and_quantized_gradients():
    x = jax.random.normal(jax.random.key(0), (4, 64))
    fmt = get_format("mxint4")
    np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(fake_quant(x, fmt, -1) * 3.0))(x),
                                  jnp.full_like(x, 3.0))
    c = 2 * x                                         # the cotangent reaching quantize_grad
    g = jax.grad(lambda x: jnp.sum(quantize_grad(x, fmt, -1) * c))(x)
    np.testing.assert_array_equal(g, quantize_dequantize(c, fmt))
    assert not np.array_equal(g, c)


def test_native_fp8_dot_equals_fake_quant_matmul():
    x = jax.random.normal(jax.random.key(0), (32, 256))
    w = jax.random.normal(jax.random.key(1), (256, 72))
    for fa, fw in [("fp8_e4m3_1x128", "fp8_e4m3_128x128"), ("fp8_e4m3", "fp8_e4m3_channel"),
                   ("fp8_e5m2_1x128", "fp8_e4m3")]:
        fa, fw = get_format(fa), get_format(fw)
        want = quantize_dequantize(x, fa) @ quantize_dequantize(w, fw, 0)
        np.testing.assert_allclose(native_dot(x, w, fa, fw), want, rtol=1e-5, atol=1e-4)
    dx, dw = jax.grad(lambda x, w: jnp.sum(native_dot(x, w, fa, fw)), argnums=(0, 1))(x, w)
    assert dx.shape == x.shape and dw.shape == w.shape and bool(jnp.all(jnp.isfinite(dw)))
    hlo = jax.jit(native_dot, static_argnums=(2, 3)).lower(x, w, fa, fw).as_text()
    assert re.search(r"dot_general[^\n]*xf8E4M3FN>[^\n]*xf8E5M2>", hlo), "the dot takes fp8 operands"


@pytest.mark.gpu
def test_native_fp8_dot_runs_on_gpu_fp8_units():
    """On an FP8-capable GPU (H100/H200), mode="auto" picks the real fp8 dot, and the model's
    logits match fake-quant to float32 accumulation order."""
    assert native_supported(), f"{jax.devices()[0].device_kind} reports no FP8 matmul units"
    fp8 = apply_overrides(tiny(), ["precision=fp8"]).precision
    assert describe_mode(fp8)["attention"] == "native fp8 dot"
    x = jax.random.normal(jax.random.key(0), (512, 1024))
    w = jax.random.normal(jax.random.key(1), (1024, 768))
    fa, fw = get_format("fp8_e4m3_1x128"), get_format("fp8_e4m3_128x128")
    want = quantize_dequantize(x, fa) @ quantize_dequantize(w, fw, 0)
    np.testing.assert_allclose(jax.jit(native_dot, static_argnums=(2, 3))(x, w, fa, fw), want,
                               rtol=1e-3, atol=1e-2)
    cfg, model = _small()
    tokens = jax.random.randint(jax.random.key(0), (2, 32), 0, 256)
    out = {}
    for mode in ("auto", "fake"):
        model.cfg = dataclasses.replace(cfg, precision=dataclasses.replace(fp8, mode=mode))
        graphdef, state = nnx.split(model)
        out[mode] = jax.jit(lambda s, g=graphdef: nnx.merge(g, s)(tokens)[0])(state)
    np.testing.assert_allclose(out["auto"], out["fake"], rtol=1e-3, atol=1e-3)


def test_precision_config_recipes_and_errors():
    cfg = validate(apply_overrides(tiny(), ["precision=fp8"]))
    assert cfg.precision.experts_weights == "fp8_e4m3_128x128" and cfg.precision.router_weights == ""
    mode = describe_mode(cfg.precision)
    assert mode["experts"] == "fake-quant" and mode["router"] == "full precision"
    assert describe_mode(dataclasses.replace(cfg.precision, mode="native"))["mlp"] == "native fp8 dot"
    for override, match in [("precision=fp9", "not a recipe"),
                            ("precision.head_acts=mxint9", "head_acts='mxint9'.*mxint8"),
                            ("precision.mlp_acts=fp8_e4m3_128x128", "only weights"),
                            ("precision.rotation=24", "rotation=24.*8, 16, 32")]:
        with pytest.raises(ConfigError, match=match):
            validate(apply_overrides(tiny(), [override]))


def _small(overrides=()):
    from toolkit.models.transformer import Transformer
    cfg = apply_overrides(tiny(), ["model.num_layers=1", "model.seq_len=32", *overrides])
    return cfg, Transformer(cfg, rngs=nnx.Rngs(0))


def test_policies_change_the_model_a_little_and_native_matches_fake():
    cfg, model = _small()
    tokens = jax.random.randint(jax.random.key(0), (2, 32), 0, 256)

    def under(pc):
        model.cfg = dataclasses.replace(cfg, precision=pc)
        graphdef, state = nnx.split(model)
        return jax.jit(lambda s: nnx.merge(graphdef, s)(tokens)[0])(state)

    base = under(cfg.precision)

    mx = under(apply_overrides(cfg, ["precision=mxint8"]).precision)
    rel = float(jnp.linalg.norm(mx - base) / jnp.linalg.norm(base))
    assert 1e-5 < rel < 0.05
    fp8 = apply_overrides(cfg, ["precision=fp8", "precision.head_weights=fp8_e4m3_channel",
                                "precision.head_acts=fp8_e4m3"]).precision
    fake = under(dataclasses.replace(fp8, mode="fake"))
    native = under(dataclasses.replace(fp8, mode="native"))
    np.testing.assert_allclose(native, fake, rtol=1e-4, atol=1e-4)
    with use_precision(None):                      # the model enters its own policy
        np.testing.assert_array_equal(under(fp8.__class__()), base)


def test_fp8_recipe_trains_with_quantized_gradients():
    from toolkit.training import Trainer
    cfg = apply_overrides(tiny(), ["model.num_layers=1", "model.seq_len=32", "train.batch_size=8",
                                   "train.steps=3", "train.warmup_steps=1", "train.eval_batches=1",
                                   "precision=fp8", "precision.rotation=32"])
    trainer = Trainer(cfg, devices=jax.devices()[:2], progress=False)
    summary = trainer.run()
    assert np.isfinite(summary["final_val_loss"]) and trainer.history[-1]["ce"] < trainer.history[0]["ce"]
    assert summary["precision_mode"]["experts"] == "fake-quant"


def test_fmpq_permutation_lowers_the_int8_share():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 1024)).astype(np.float32)
    x[:, rng.choice(1024, 12, replace=False)] *= 30
    perm = outlier_permutation(x[:128])
    before, _ = int8_fraction_needed(x[128:], 25.0)
    after, db = int8_fraction_needed(x[128:, perm], 25.0)
    assert after < before and db >= 25.0


def test_analysis_reports_every_class_and_policy():
    from toolkit.analysis.precision import inference_policy, model_tensors, policy_losses, qsnr_table
    cfg, model = _small()
    tokens = jax.random.randint(jax.random.key(0), (2, 32), 0, 256)
    tensors = model_tensors(model, tokens)
    assert set(tensors["weights"]) == {"attention", "experts", "router", "head"}
    assert set(tensors["acts"]) == {"attention", "experts", "router", "head", "kv"}
    assert all(a.shape[-1] in (32, 128) for arrays in tensors["acts"].values() for a in arrays)
    rows = qsnr_table(tensors, ["mxint8", "nvfp4"], rotations=(0, 32))
    assert len(rows) == (4 + 5) * 2 * 2
    assert all(r["qsnr_db"] > 15 for r in rows)
    batches = [{"tokens": tokens, "targets": jnp.roll(tokens, -1, axis=1)}]
    losses = policy_losses(model, batches, {"mxint4, kv int4": inference_policy("mxint4", kv_cache="int4")})
    assert set(losses) == {"full precision", "mxint4, kv int4"}
    assert abs(losses["mxint4, kv int4"] - losses["full precision"]) > 1e-5


@pytest.fixture(scope="module")
def mxint8_single():
    """The micro model under MXINT8 (LM head included) on one device: (cfg, loss, grads)."""
    from conftest import micro

    from toolkit.training.inspect import loss_and_grads
    pc = dataclasses.replace(apply_overrides(tiny(), ["precision=mxint8"]).precision,
                             head_weights="mxint8", head_acts="mxint8", head_grads="mxint8")
    base = micro(moe={"num_experts": 8}, model={"num_layers": 2})
    cfg = dataclasses.replace(base, precision=pc)
    loss, grads, _ = loss_and_grads(cfg, jax.devices()[:1])
    grads = jax.tree.map(np.asarray, grads)
    loss_fp, _, _ = loss_and_grads(base, jax.devices()[:1])
    assert abs(float(loss) - float(loss_fp)) > 1e-5          # the policy is in force
    return cfg, loss, grads


@pytest.mark.parametrize("parallel", [{"fsdp": 2, "expert": 4, "recipe": "fsdp_ep"},
                                      {"pipeline": 2, "data": 2, "fsdp": 2, "recipe": "fsdp"}])
def test_fake_quant_training_is_mesh_independent(mxint8_single, parallel):
    """Weights are quantized whole and activations along K, which no device splits here: the
    mesh gives the one-device loss and gradients. The pipeline's head quantizes its output
    gradient in tiles of each device's vocabulary slice, so there the gradients are close."""
    from toolkit.training.inspect import loss_and_grads
    cfg, loss_1, grads_1 = mxint8_single
    loss_n, grads_n, _ = loss_and_grads(dataclasses.replace(cfg, parallel=dataclasses.replace(
        cfg.parallel, **parallel)), jax.devices())
    assert float(loss_n) == pytest.approx(float(loss_1), rel=1e-6, abs=1e-6)
    piped = parallel.get("pipeline", 1) > 1
    if piped:
        from toolkit.models.transformer import stacked_blocks_state
        grads_1 = stacked_blocks_state(grads_1, 1, 2)
    grads_n = jax.tree.map(np.asarray, grads_n)
    diffs = [float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))
             for a, b in zip(jax.tree.leaves(grads_n), jax.tree.leaves(grads_1), strict=True)]
    assert max(diffs) < (0.02 if piped else 1e-5), diffs
