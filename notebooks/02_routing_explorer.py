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
# # 02 · Routing explorer: what the routers decide, byte by byte
#
# **Open it:** from the repository root run `make lab`, open `02_routing_explorer.ipynb` and choose
# *Run ▸ Run All Cells*. The notebook is paired with `02_routing_explorer.py` (jupytext): saving in
# JupyterLab updates both; the `.py` is the source under review, the `.ipynb` is kept without outputs.
#
# Pick a router and its knobs, train the tiny MoE model (or load a run that `python -m toolkit train
# --out DIR` wrote), and look at what the routers do: the expert load at every step, the drop rate,
# how many experts each token uses, how the choice at one layer predicts the next, and the corpus
# text with every byte coloured by the expert that took it, layer by layer. The last view is the best
# way to see what the experts learned: spaces, indentation, identifiers, punctuation and prose words
# tend to go to different experts.
#
# Everything the widget shows comes from a `RoutingExplorer`, a plain state object
# (`toolkit/widgets/routing_explorer.py`) that the tests drive without a browser.
#
# **A tiny CPU run:** every size lives in the `parameters` cell below. Set `STEPS = 30` and
# `EXTRA_OVERRIDES = ["model.num_layers=2", "train.batch_size=8", "model.seq_len=32"]` for a run of
# under a minute on a laptop. The tests execute this notebook headless with such values injected after
# that cell: `.venv/bin/python -m pytest -q tests/notebooks -k 02`. The defaults (200 steps of `tiny`)
# take seconds per step on a 2-core CPU, so plan on ten minutes or more there.

# %% tags=["parameters"]
PRESET = "tiny"  # a preset from toolkit.config.PRESETS that trains on a CPU: "tiny" or "small"
ROUTER = "top_p"  # one of toolkit.moe.ROUTERS: topk_softmax, sigmoid_bias, top_p, expert_choice, ...
KNOBS = {"moe.top_p": 0.5, "moe.entropy_loss_weight": 1e-4}  # knob values (toolkit.widgets.KNOBS)
STEPS = 200  # optimizer steps of the run
DEVICES = 8  # simulated CPU devices; ignored on GPU/TPU, where the accelerators are the devices
EXTRA_OVERRIDES = []  # other dotted config overrides, e.g. ["model.num_layers=2"]
RUN_DIR = ""  # a run directory to explore instead of a new run, e.g. "../runs/demo"
TEXT_ROWS = 1  # validation windows per domain shown as coloured text

# %% [markdown]
# JAX fixes its device list when it starts, so the simulated devices are requested before anything
# imports `jax` (the toolkit does). If the kernel already ran JAX, restart it to change `DEVICES`.

# %%
import os  # noqa: E402

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count={DEVICES}".strip()

import jax  # noqa: E402
from IPython.display import Markdown, display  # noqa: E402

from toolkit.config import preset  # noqa: E402
from toolkit.widgets import RoutingExplorer, RoutingExplorerView  # noqa: E402

print(f"{len(jax.devices())} {jax.default_backend()} devices")

# %% [markdown]
# ## The state: a router and its knobs
#
# The explorer's config is the preset plus `EXTRA_OVERRIDES`, with the router and its knobs on top,
# the same dotted overrides as `python -m toolkit train --set ...`. Only the knobs that matter for the
# chosen router are shown (the top-p mass for `top_p` and `tsallis`, the bias step for `sigmoid_bias`,
# no balancing loss for `expert_choice`, which is balanced by construction; `zc_tau` once there are
# MoE++ zero-computation experts, the capacity factor with capacity dispatch). A bad value does not
# raise: the explorer keeps a message naming the field, the value and one that works, and trains
# nothing until it is fixed. With `RUN_DIR` set, the explorer takes that run's config, weights and
# metrics instead, and training continues it.

# %%
base = preset(PRESET)
explorer = RoutingExplorer(base, router=ROUTER, knobs=KNOBS, overrides=[
    f"train.steps={STEPS}",
    f"train.warmup_steps={min(base.train.warmup_steps, STEPS // 10)}",
    "train.eval_every=0",
    "train.checkpoint_every=0",
    *EXTRA_OVERRIDES,
])
if RUN_DIR:
    explorer.load_run(RUN_DIR)
print("overrides:", " ".join(explorer.overrides()))
print(explorer.error or "the config is valid")
for knob in explorer.knobs():
    print(f"  {knob.key} = {explorer.values[knob.key]}: {knob.help}")

# %% [markdown]
# ## The widget
#
# On the left, the router and its knobs; changing one only changes the state (the next training step
# then starts a new run). **Train** runs the number of steps in the box in a background thread, so the
# notebook stays usable; the load and drop-rate plots redraw every 10 steps, the other views when it
# ends. **Stop** ends training after the step in flight. **Load run** explores a run directory.
# Error messages appear under the buttons. When the notebook runs headless nobody presses anything:
# the cells below train and draw the same views as pictures.

# %%
view = RoutingExplorerView(explorer, every=10, steps=STEPS, text_rows=TEXT_ROWS)
display(view.widget)

# %% [markdown]
# ## Train
#
# `explorer.train(n)` runs up to `n` steps, never past `train.steps` (with a loaded run, it continues
# that run). The line below follows it; the first step compiles (seconds to a minute).

# %%
line = display(Markdown(explorer.status), display_id=True)
explorer.train(STEPS, on_step=lambda rec: line.update(Markdown(explorer.status)))
line.update(Markdown(explorer.status))
view.refresh()  # the widget above now shows this run too

# %% [markdown]
# ## Expert load over steps
#
# One panel per MoE layer: each row an expert, each column a step, the colour the expert's share of
# the layer's routed assignments at that step. Balanced routing is an even colour at `1/E`; a bright
# row is an expert the router favours, a dark one an expert going unused. Watch the first steps: a
# fresh router already prefers some experts by chance, then the balancing (loss or bias) evens it out.

# %%
display(view.render("load"))

# %% [markdown]
# ## Drop rate and experts per token
#
# The drop rate is the share of assignments that found no slot: 0 with dropless dispatch, positive
# with `moe.dispatch=capacity` when an expert overflows. Experts per token is `top_k` for top-k routers;
# for `top_p` it falls as the router grows confident (and the entropy loss pushes it there), for
# `tsallis` it rises to all experts where the router is unsure, and for `expert_choice` it averages
# `top_k` with some tokens getting more and some none.

# %%
display(view.render("series"))

# %% [markdown]
# ## How many experts a token uses
#
# The same, as a histogram over the validation text of both domains with the final weights: the share
# of tokens that used 0, 1, ..., k experts, per layer. Fixed top-k routers put everything in bar `k`;
# variable routers spread out, and `expert_choice` can leave tokens with no expert at all (bar 0).

# %%
display(view.render("experts_per_token"))

# %% [markdown]
# ## Layer-to-layer affinity
#
# For consecutive MoE layers l and l+1, row i is P(expert j at layer l+1 | expert i at layer l) on
# validation tokens. A uniform matrix means layer l+1 routes independently of layer l; bright cells
# mean tokens travel in fixed paths through the experts (ExFlow uses this to place experts; the
# `recurrent` router is built to carry routing state from one layer to the next).

# %%
display(view.render("affinity"))

# %% [markdown]
# ## The text, coloured by each byte's top expert
#
# The first validation window of each domain (prose, then code), once per MoE layer, each byte on the
# colour of its top expert (hover for the byte and the expert). The top expert is the router's most
# probable choice; for `expert_choice`, where experts pick tokens, it is the lowest-numbered expert
# that picked the byte, and grey bytes were picked by none. `↵` is a newline, `→` a tab, `␂`/`␃`
# the start and end of a document. After a few hundred steps, look for experts that own spaces and
# indentation, punctuation, digits, or the first letters of words, and for how that differs between
# the first and the last layer.

# %%
display(view.render("text"))

# %% [markdown]
# ## Things to try
#
# Change the parameters cell, restart the kernel and run all, or turn the knobs in the widget and
# press Train:
#
# * `ROUTER = "topk_softmax"`, `KNOBS = {"moe.aux_loss_weight": 0}`: no balancing; watch rows of the
#   load map go dark and the coloured text collapse onto a few experts;
# * `ROUTER = "expert_choice"`: perfect load by construction; how many bytes get no expert?
# * `ROUTER = "tsallis"`, `KNOBS = {"moe.tsallis_threshold": 0.8}`: unsure tokens take every expert;
# * `KNOBS = {"moe.zero_experts": 1, "moe.copy_experts": 1, "moe.zc_tau": 0.5}`: MoE++ experts that
#   cost nothing; which bytes skip the FFN (the Z and C colours)?
# * `KNOBS = {"moe.dispatch": "capacity", "moe.capacity_factor": 1.0}`: the drop rate appears.
