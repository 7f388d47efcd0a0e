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
# # 05 · Sparsity and scale: what more, finer and shared experts cost and buy
#
# **Open it:** from the repository root run `make lab`, open `05_sparsity_and_scale.ipynb` and choose
# *Run ▸ Run All Cells*. The notebook is paired with `05_sparsity_and_scale.py` (jupytext): saving in
# JupyterLab updates both; the `.py` is the source under review, the `.ipynb` is kept without outputs.
#
# An MoE layer's FLOPs per token are set by its *active* width: `top_k` experts of width `d_expert`
# plus the shared experts. Everything else is a design choice at that fixed compute: how many experts
# there are (total parameters, memory, traffic), how fine they are (granularity
# `G = 2 d_model / d_expert`), and whether some of the active slots go to shared experts. This
# notebook holds the active width fixed and turns those knobs, with every number from the cost model
# (`toolkit.analysis.costs`, `toolkit.analysis.step_time`), Ling's efficiency-leverage law as the
# payoff curve (`toolkit.analysis.scaling`) and, for the tiny model, validation losses of short
# trained runs.
#
# Everything comes from a `SparsityExplorer`, a plain state object (`toolkit/widgets/sparsity.py`)
# that the tests drive without a browser.
#
# **A tiny CPU run:** set `STEPS = 3` and `EXTRA_OVERRIDES = ["model.num_layers=1",
# "train.batch_size=8", "model.seq_len=32"]` in the `parameters` cell for a run of under a minute;
# the tests execute this notebook that way: `.venv/bin/python -m pytest -q tests/notebooks -k 05`.
# With the `tiny` defaults each trained design takes a minute or two on a 2-core CPU.

# %% tags=["parameters"]
PRESET = "tiny"  # the base design; its (top_k + shared) x d_expert is the active width kept fixed
DESIGNS = [(8, 2, 0), (16, 4, 0), (32, 8, 0), (32, 7, 1), (64, 2, 0)]  # (experts, top_k, shared)
STEPS = 100  # optimizer steps of each trained design (0: skip training)
TRAIN = [(8, 2, 0), (32, 8, 0)]  # the designs to train, a subset of DESIGNS
CLUSTER = "h100x8"  # the hardware the memory, traffic and step-time columns assume (experts split over it)
COMPUTE = 1e22  # training FLOPs at which the efficiency leverage is read
EXTRA_OVERRIDES = []  # dotted config overrides for the base, e.g. ["model.num_layers=2"]

# %%
from IPython.display import HTML, display  # noqa: E402

from toolkit.analysis.scaling import efficiency_leverage, optimal_granularity, training_compute  # noqa: E402
from toolkit.viz.costs import design_bars, leverage_curve  # noqa: E402
from toolkit.widgets import SparsityExplorer, SparsityExplorerView, figure_png  # noqa: E402
from toolkit.widgets.sparsity_view import design_html  # noqa: E402

explorer = SparsityExplorer(PRESET, overrides=EXTRA_OVERRIDES, cluster=CLUSTER, compute=COMPUTE)
base = explorer.row()
print(f"base {base['design']}: d_expert {base['d_expert']}, {base['flops_per_token'] / 1e6:.3f}M FLOPs "
      f"per token, {base['params_total'] / 1e6:.2f}M parameters ({base['params_active'] / 1e6:.2f}M active)")

# %% [markdown]
# ## Designs at equal active compute
#
# Each row keeps `(top_k + shared) x d_expert` of the base, so the expert FLOPs per token are equal
# (the router's `E x d` matmul grows with the expert count, a rounding error here). More experts
# raise total parameters, memory per device and the gradient traffic; finer experts (more active,
# each narrower: larger `G`) keep the parameters but send each token to more experts, so the
# expert-parallel all-to-all moves more bytes and the step takes longer on the same hardware.

# %%
rows = explorer.sweep(DESIGNS)
display(HTML(design_html(rows)))
display(figure_png(design_bars(rows)))

# %% [markdown]
# Granularity is not a free knob at fixed active width: it follows from `top_k + shared`. To make
# experts finer *at the same activation ratio*, split each one into `m` (DeepSeekMoE's fine-grained
# segmentation): experts, top-k and shared experts x `m`, `d_expert / m`. That is `refine(m)`, the
# widget's *finer x2* button.

# %%
if not explorer.refine(4):
    raise ValueError(explorer.error)
finer = explorer.row()
print(f"refine(4): {base['design']} -> {finer['design']}, d_expert {finer['d_expert']}, "
      f"A {base['activation']:.3f} -> {finer['activation']:.3f}, G {base['granularity']:g} -> "
      f"{finer['granularity']:g}, EL {base['leverage']:.2f} -> {finer['leverage']:.2f}")
explorer.refine(0.25)

# %% [markdown]
# ## What sparsity buys: Ling's efficiency leverage
#
# EL is the compute a dense model needs over the MoE's for the same loss (Tian et al. 2025). It rises
# as the activation ratio `A` falls and peaks at a granularity of about 12; it also grows with the
# compute budget. Ling 2.0's designs (256 experts, 8 active + 1 shared, `A` about 3.5%) sit where the
# law predicts about 7x. The dot marks the base design.

# %%
display(figure_png(leverage_curve(COMPUTE, mark=(base["activation"], base["granularity"]))))
print(f"EL(A=3.1%, G=12, C=1e22) = {efficiency_leverage(0.031, 12, 1e22):.2f}; "
      f"best granularity {optimal_granularity():.1f}")
for r in rows:
    print(f"{r['design']:>10}: A {r['activation']:.3f}  G {r['granularity']:5.1f}  EL {r['leverage']:.2f}")

# %% [markdown]
# ## Trained tiny runs
#
# The law was fitted on models of 1e18 to 3e20 FLOPs; the tiny run below spends many orders of
# magnitude less (printed). What the tiny runs show is the direction: at equal active compute, do
# more or finer experts lower the loss after the same number of steps? (Short runs are noisy:
# compare at `STEPS` of a few hundred.)

# %%
if STEPS:
    cfg = explorer.cfg
    tokens = STEPS * cfg.train.batch_size * cfg.model.seq_len
    print(f"each run: {tokens:,} tokens, C = {training_compute(cfg, tokens):.1e} FLOPs")
    for e, k, s in TRAIN:
        if not explorer.set(num_experts=e, top_k=k, num_shared_experts=s):
            raise ValueError(explorer.error)
        print(f"E{e} k{k} s{s}: validation loss {explorer.train(STEPS):.3f} after {STEPS} steps")
    display(HTML(design_html(explorer.sweep(TRAIN))))

# %% [markdown]
# ## The widget
#
# Move the sliders, press *finer x2* or pick another cluster or budget: the table, the EL curve and
# the bars follow at once (nothing compiles); *Train this design* trains the current design in the
# background and adds its validation loss.

# %%
view = SparsityExplorerView(explorer, designs=DESIGNS[:3], train_steps=max(STEPS, 1))
display(view.widget)

# %% [markdown]
# ## Things to try
#
# * `DESIGNS = [(8, 2, 0), (64, 16, 0), (256, 64, 0)]`: granularity 2, 16, 64; EL peaks near 12.
# * `PRESET = "ling_mini_2"`, `CLUSTER = "h100x64"`, `STEPS = 0`: the published design, its memory,
#   bytes and step time on 64 GPUs.
# * `COMPUTE = 1e24`: the leverage of the same designs at a frontier budget.
# * `python -m toolkit plan --preset ling_mini_2 --cluster h100x64`: the best layout to train it
#   (the planner widget is at the end of notebook 04).
