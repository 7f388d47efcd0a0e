# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---


# %% [markdown]
# # 03 · Precision explorer: how low can the bits go?
#
# **Open it:** from the repository root run `make lab`, open `03_precision_explorer.ipynb` and choose
# *Run ▸ Run All Cells*. The notebook is paired with `03_precision_explorer.py` (jupytext).
#
# Train the tiny MoE model in full precision, capture its real weights and the inputs of every matmul
# on the corpus, and look at them through a low-bit number format: where the values fall on the
# format's grid, the quantization signal-to-noise ratio (QSNR) per tensor class, and what the
# validation loss does when weights and activations are cast to the format. Knobs: the format
# (FP8, MXFP8/6/4, MXINT8/6/4, NVFP4, NVINT4, INT8/INT4 per channel or group), its block size, the
# UE8M0 scale rule (round up, or the OCP floor rule that can clip), symmetric integer clipping, and a
# random Hadamard rotation before quantizing.
#
# Everything the widget shows comes from a `PrecisionExplorer`, a plain state object
# (`toolkit/widgets/precision.py`) that the tests drive without a browser.
#
# **A tiny CPU run:** set `STEPS = 20` and `EXTRA_OVERRIDES = ["model.num_layers=2",
# "train.batch_size=8", "model.seq_len=32"]` for a run of under a minute. The tests execute this
# notebook headless with such values: `.venv/bin/python -m pytest -q tests/notebooks -k 03`.

# %% tags=["parameters"]
PRESET = "tiny"  # a preset that trains on a CPU
STEPS = 150  # optimizer steps of the full-precision run whose tensors we look at
EXTRA_OVERRIDES = []  # dotted config overrides, e.g. ["model.num_layers=2"]
FORMAT = "nvint4"  # a name from toolkit.precision.FORMATS
BLOCK = 0  # values per scale; 0 keeps the format's block (32 for MX, 16 for NV)
SCALE_RULE = "ceil"  # UE8M0 scales: "ceil" (round up, no clipping) or "floor" (OCP)
ROTATION = 16  # Hadamard block before quantizing (0: none)
TENSORS = ("acts", "experts")  # which tensors the histogram shows: ("weights" | "acts", class)

# %%
import jax  # noqa: E402
from IPython.display import display  # noqa: E402

from toolkit.precision import CROSSOVER_CREST, crest_factor, qsnr  # noqa: E402
from toolkit.precision.mixed import int8_fraction_needed, outlier_permutation  # noqa: E402
from toolkit.widgets import PrecisionExplorer, PrecisionExplorerView  # noqa: E402

# %% [markdown]
# ## Theory first: INT vs FP on Gaussian data
#
# With fine-grained block scales, an integer format beats its floating-point twin when the block's
# crest factor (absmax / RMS) is below a crossover (INT v.s. FP, Theorem 1): 7.55 at 8 bits, about 2
# at 4 and 6 bits. Gaussian blocks of 32 have a crest factor near 2.37, so MXINT8 wins by about 10
# dB, the 6- and 4-bit MX formats go to FP, and with NV's blocks of 16 (crest about 2.11) NVINT4 wins.

# %%
x = jax.random.normal(jax.random.key(0), (2048, 256))
for (int_fmt, fp_fmt), cross in CROSSOVER_CREST.items():
    block = 16 if int_fmt.startswith("nv") else 32
    a, b = qsnr(x, int_fmt), qsnr(x, fp_fmt)
    print(f"{int_fmt:7s} {a:6.2f} dB vs {fp_fmt:6s} {b:6.2f} dB; crest {crest_factor(x, block):.2f} vs "
          f"crossover {cross}: {'INT' if a > b else 'FP'} wins")

# %% [markdown]
# ## A trained model's tensors
#
# The explorer trains the preset in full precision on one device, then runs a validation batch
# through it with every matmul input captured: the attention projections, the experts (their input
# and their hidden activation), the router, the LM head, and the keys and values ("kv").

# %%
explorer = PrecisionExplorer.from_preset(
    PRESET, overrides=[f"train.steps={STEPS}", f"train.warmup_steps={max(1, STEPS // 10)}",
                       "train.eval_every=0", "train.checkpoint_every=0", *EXTRA_OVERRIDES],
    format=FORMAT, block=BLOCK, scale_rule=SCALE_RULE, rotation=ROTATION)
summary = explorer.train()
print(f"trained {summary['steps']} steps: validation loss {summary['final_val_loss']:.3f}")
print("captured:", {k: explorer.classes(k) for k in ("weights", "acts")})
print(explorer.error or f"format {explorer.spec()}")

# %% [markdown]
# ## The widget
#
# Change the format, block, scale rule, clipping or rotation, and pick the tensors: the histogram and
# the QSNR table redraw at once. **Loss impact** evaluates the validation loss with the attention,
# MLP and expert matmuls in the chosen format (a few seconds: it compiles the model). When the
# notebook runs headless, the cells below draw the same panels.

# %%
view = PrecisionExplorerView(explorer)
display(view.widget)

# %% [markdown]
# ## Values on the grid
#
# Each value divided by its block's scale, against the values the element can store (red lines).
# FP elements crowd their grid near zero; INT elements space it evenly. A Hadamard rotation makes
# the blocks more Gaussian (fewer lone outliers), which helps INT.

# %%
view.tensor.value = TENSORS
display(view.render("histogram"))

# %% [markdown]
# ## QSNR per tensor class, and the loss
#
# QSNR over all tensors of a class, without and with the rotation, and the block crest factor.
# Then the validation loss in full precision and with weights and activations cast to the format.

# %%
display(view.render("qsnr"))
display(view.render("loss"))

# %% [markdown]
# ## Mixed precision activations (COMET)
#
# COMET keeps activations in INT4 except the channel blocks that hold outliers, which go to INT8,
# and permutes the channels so the outliers share a few blocks. Here: the share of INT8 blocks (16
# channels each) needed for a target QSNR on the experts' inputs, in channel order and permuted by
# a calibration half of the tokens.

# %%
acts = explorer.tensors["acts"]["experts"][0]
perm = outlier_permutation(acts[: len(acts) // 2])
for target in (18.0, 22.0):
    before = int8_fraction_needed(acts[len(acts) // 2:], target, block=16)
    after = int8_fraction_needed(acts[len(acts) // 2:, perm], target, block=16)
    print(f"target {target} dB: INT8 blocks {before[0]:.2f} in order, {after[0]:.2f} permuted")

# %% [markdown]
# ## Things to try
#
# * `FORMAT = "mxint4"` then `"mxfp4"`, with `ROTATION = 0` and `32`: rotation moves 4 bits toward INT;
# * `SCALE_RULE = "floor"` on `mxfp4`: the OCP rule clips each block's largest values;
# * train with a recipe (`python -m toolkit train --set precision=fp8`) and compare the loss to the
#   full-precision run (`benchmarks/precision.py` does this for FP8, MXINT8 and MXFP8).
