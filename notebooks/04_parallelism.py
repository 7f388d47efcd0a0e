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
# # 04 · Parallelism: one model, many meshes, the same numbers
#
# **Open it:** from the repository root run `make lab`, open `04_parallelism.ipynb` and choose
# *Run ▸ Run All Cells*. The notebook is paired with `04_parallelism.py` (jupytext): saving in
# JupyterLab updates both; the `.py` is the source under review, the `.ipynb` is kept without outputs.
#
# Choose a mesh (how many devices along `pipeline`, `data`, `fsdp`, `sequence`, `tensor` and
# `expert`) and a parallelism recipe, and see what they do to the tiny MoE model on 8 simulated
# CPU devices: how every parameter is split, how much memory each device holds, which collectives
# the compiler inserted into the train step and how many bytes they move (beside the textbook
# formulas), and, last, that the loss and gradients on the mesh equal those on one device. A
# section on pipelines draws the schedules (GPipe, 1F1B, interleaved) as timelines with their
# bubbles.
#
# Everything the widget shows comes from a `ParallelismExplorer`, a plain state object
# (`toolkit/widgets/parallelism.py`) that the tests drive without a browser. The same numbers come
# from the command line: `python -m toolkit inspect --preset tiny --mesh data=2,tensor=2,expert=2
# --recipe folded`.
#
# **A tiny CPU run:** every size lives in the `parameters` cell below. Set `EXTRA_OVERRIDES =
# ["model.num_layers=1", "model.d_model=32", "model.head_dim=8", "model.d_ff=64", "model.seq_len=16",
# "train.batch_size=8", "moe.d_expert=32"]` for a run of well under a minute. The tests execute this
# notebook headless with such values injected after that cell: `.venv/bin/python -m pytest -q
# tests/notebooks -k 04`. With the `tiny` defaults each compile takes 10 to 40 seconds on a 2-core
# CPU, so the whole notebook runs in a minute or two.

# %% tags=["parameters"]
PRESET = "tiny"  # a preset from toolkit.config.PRESETS: "tiny" or "small"
MESH = {"data": 2, "fsdp": 1, "tensor": 2, "expert": 2}  # mesh axis sizes; they multiply to DEVICES
# the pipeline section: stages x data x sequence pieces, micro-batches, schedule, layer count
PIPELINE = {"pipeline": 2, "data": 2, "sequence": 2, "microbatches": 2, "schedule": "1f1b",
            "context": "all_gather"}
PIPELINE_OVERRIDES = ["model.num_layers=4"]  # applied after EXTRA_OVERRIDES for that section
RECIPE = "folded"  # one of toolkit.sharding.RECIPES: dp, fsdp, tp, ep, fsdp_ep, fsdp_tp_ep, folded
DISPATCH = "dropless"  # moe.dispatch: "dropless" or "capacity"
CHOICES = {"parallel.overlap_chunks": 1}  # other choices (toolkit.widgets.CHOICES), e.g. moe.bigmac_ratio
DEVICES = 8  # simulated CPU devices; ignored on GPU/TPU, where the accelerators are the devices
EXTRA_OVERRIDES = []  # other dotted config overrides, e.g. ["model.num_layers=2"]
EQUIVALENCE = True  # run the single-device check (two more compiles)
# the planning section: a published model on a real cluster (toolkit.analysis.planner)
PLAN = {"preset_name": "qwen3_30b_a3b", "cluster": "h100x16", "global_batch": "256K", "remat": (True,)}

# %% [markdown]
# JAX fixes its device list when it starts, so the simulated devices are requested before anything
# imports `jax` (the toolkit does). If the kernel already ran JAX, restart it to change `DEVICES`.

# %%
import os  # noqa: E402

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count={DEVICES}".strip()

import jax  # noqa: E402
from IPython.display import HTML, display  # noqa: E402

from toolkit.widgets import ParallelismExplorer, ParallelismExplorerView  # noqa: E402
from toolkit.widgets.parallelism_view import recipes_html  # noqa: E402

print(f"{len(jax.devices())} {jax.default_backend()} devices")

# %% [markdown]
# ## A recipe is a table
#
# Every parameter and activation dimension carries a *logical* name: `embed` (the model width),
# `heads`, `mlp` (dense hidden width), `vocab`, `expert` (which routed expert), `expert_embed` and
# `expert_mlp` (the width and hidden width inside an expert), `batch`, and `moe_batch` (the token
# groups an MoE layer dispatches). A recipe maps each name to mesh axes; a blank cell means
# *replicated*: every device holds the whole dimension. The model code never changes between
# recipes; only this table does.
#
# * `dp`: only the batch is split; every device holds every parameter, and the gradients are summed
#   over `data` at the end of the step.
# * `fsdp` (ZeRO-3): the batch is split over `data x fsdp` and every parameter's `embed` dimension
#   over `fsdp`; each weight is gathered just before it is used.
# * `tp` (Megatron): heads, dense hidden and vocab split over `tensor`, experts split on their hidden
#   width (expert tensor parallelism); the batch is split over `data` only.
# * `ep`: whole experts per device over `expert`; the batch is split over `expert` too, so tokens must
#   travel to the device that holds their expert.
# * `fsdp_ep`, `fsdp_tp_ep`: the combinations; `fsdp_tp_ep` (the default) gives every axis its role.
# * `folded` (MoE Parallel Folding): attention and the dense layers are tensor-parallel over `tensor`
#   as in `fsdp_tp_ep`, but the MoE layers *fold* `tensor` into the expert-parallel group: experts are
#   split over `expert x tensor` (each device holds whole experts, no expert tensor parallelism) and
#   the MoE tokens over `data x fsdp x expert x tensor`. Attention and experts use different
#   layouts on the same devices.
#
# The highlighted column is the recipe chosen in the parameters cell.

# %%
display(HTML(recipes_html(RECIPE)))

# %% [markdown]
# ## The state: a mesh and a recipe
#
# The explorer's config is the preset plus `EXTRA_OVERRIDES`, with the mesh, the recipe and the other
# choices on top, the same dotted overrides as `python -m toolkit inspect --set ...`. Not every mesh
# fits every model and recipe: an axis the recipe does not use would hold identical copies, and
# every split dimension must divide by its mesh axes. `validate()` checks all of this before
# anything compiles; a bad choice does not raise here but leaves its message in `explorer.error`.

# %%
explorer = ParallelismExplorer(PRESET, overrides=EXTRA_OVERRIDES, recipe=RECIPE, dispatch=DISPATCH,
                               **MESH, **CHOICES)
print(explorer.error or "the config is valid")
print(explorer.summary())
print("python -m toolkit inspect --preset", PRESET,
      " ".join(f"--set {o}" for o in [*EXTRA_OVERRIDES, *explorer.overrides()]))

# %% [markdown]
# For example, tensor parallelism over 8 devices cannot split 2 key/value heads:

# %%
bad = ParallelismExplorer(PRESET, overrides=EXTRA_OVERRIDES, data=1, tensor=8, recipe="tp")
print(bad.error)

# %% [markdown]
# ## The widget
#
# On the left, the mesh axes, the recipe and the MoE dispatch choices (only those that matter for the
# config are shown); a bad combination shows validate()'s message instead of a result. The sharding
# table follows every change at once (nothing compiles). **Compile & inspect** compiles the train step
# and one transformer block for the memory, collectives and byte counts; **Check equivalence** runs
# one train batch on the mesh and on one device. Both run in the background, and a config computed
# before shows its results again at once. When the notebook runs headless nobody presses anything:
# the cells below compute the same tables and show them as HTML (the widget then shows them too).

# %%
view = ParallelismExplorerView(explorer)
display(view.widget)

# %% [markdown]
# ## How each parameter is split
#
# One row per parameter: its global shape, the logical name of each dimension, the `PartitionSpec`
# the recipe gives it on this mesh, and the shard one device holds. A `PartitionSpec` entry names the
# mesh axes a dimension is split over (a tuple: over their product); an entry for an axis of size 1
# splits nothing. Under `folded`, the expert weights `[E, d, f]` are split over `expert x tensor`
# while the attention projections are split over `tensor` on their heads. The caption totals the
# parameter bytes per device: the memory saving of the recipe, before the optimizer's two Adam
# moments (which follow their parameter's sharding) triple it.

# %%
display(view.render("sharding"))

# %% [markdown]
# ## Memory and collectives of the compiled train step
#
# The train step is compiled for the mesh (nothing runs) and XLA reports the bytes each device needs:
# the parameters and optimizer state it holds, the step's arguments and outputs, and its temporaries
# (activations kept for the backward pass, gathered weights, communication buffers). The collectives
# are read from the compiled program, with the bytes one device sends on a ring of n devices:
#
# * **all-gather** `(n-1)/n` of the result: FSDP gathers each weight before use (forward, and again
#   in the backward pass); the ring of experts gathers the tokens of the expert-parallel group.
# * **reduce-scatter** `(n-1)` times a shard: FSDP's gradients, summed and left sharded; the ring of
#   experts returns each token's expert outputs to its home device.
# * **all-reduce** `2(n-1)/n` of the array: data-parallel gradient sums at the end of the step, and
#   tensor parallelism's partial sums of activations inside every layer.
# * **all-to-all** `(n-1)/n`: capacity dispatch sends each expert's slots to the device that holds it
#   and brings the results home.
#
# Operations inside loops count once per appearance in the program, not per iteration.

# %%
display(view.render("inspect"))

# %% [markdown]
# ## Bytes against the formulas
#
# One transformer block is compiled alone, and the bytes its collectives move are set beside the
# textbook formulas (T: a device's tokens in an MoE layer, d: the model width, k: experts per token,
# ep: the expert-parallel group, b, s, h: a device's sequences, their length and the model width,
# t: the tensor-parallel group; BigMac dispatches `moe.bigmac_ratio * d` instead of d):
#
# * **expert all-to-all** (capacity dispatch, GShard): two all-to-alls per MoE layer forward, each
#   `E*C*d*(ep-1)/ep`; at capacity factor 1 (`C = T*k/E`) the pair is `2*k*(ep-1)/ep*T*d`.
# * **ring of experts** (dropless dispatch with `dropless_exchange` `all_gather`, what `auto` picks on
#   CPU, where XLA has no ragged all-to-all): an all-gather of the group's tokens and a reduce-scatter
#   of the results, `(ep-1)*T*d` each. Once ep exceeds k that is more than the all-to-alls move, but
#   it needs neither a ragged collective nor a capacity, so no token is dropped.
# * **Megatron tensor parallelism**: two all-reduces of `[b, s, h]` forward (after attention and
#   after the MLP) and two backward, each `2*(t-1)/t`: `8*b*s*h*(t-1)/t` per dense layer.
#
# The last column is 1 where the compiled block moves exactly what the formula says. Two costs lie
# outside the formulas: under `folded` the MoE output, split over `tensor` as well, goes back to
# attention's layout through one more all-gather over `tensor` (the price of folding; it shows in the
# collectives table above), and the ragged all-to-all moves what the routing sends, which its formula
# takes at a uniform load (on CPU, where XLA lacks the op, a padded emulation moves more).

# %%
display(view.render("communication"))

# %% [markdown]
# ## The same numbers as on one device
#
# One train batch, its loss and every gradient, on the mesh and on one device (`jax.devices()[:1]`),
# from the same initial weights. Every recipe computes the same function; only the order of some sums
# changes, so the differences are float rounding (about 1e-7 in float32). With capacity dispatch the
# single-device run splits the batch into the mesh's dispatch groups (`moe.dispatch_groups`): capacity
# is counted per group, as each device fills its own buffers, so one big group would drop other tokens.

# %%
if EQUIVALENCE and explorer.cfg is not None:
    display(view.render("equivalence"))
    eq = explorer.equivalence()
    print(f"loss difference {eq['loss_diff']:.3g}, max gradient difference {eq['grad_diff']:.3g}")
view.refresh()  # the widget above now shows every table computed here

# %% [markdown]
# ## Pipelines: a schedule is a timeline
#
# With `pipeline = p` the layers are split into p stages, one per device along the `pipeline` axis,
# and each batch into m micro-batches (`train.microbatches`) that flow through them. A schedule says
# which stage runs which micro-batch, forward (F) or backward (B), at each tick
# (`toolkit.sharding.schedules`); the executor (`toolkit.sharding.pipeline`) runs exactly that
# timeline in `shard_map`, passing activations on with `ppermute`. The white space is the *bubble*:
#
# * **GPipe** runs all forwards, then all backwards: idle `(p-1)/(m+p-1)` of the time, and every
#   stage keeps all m micro-batches' activations until their backward.
# * **1F1B** (PipeDream-Flush) starts backwards as soon as it can: the same bubble, but stage s
#   keeps at most p-s micro-batches in flight, so activation memory no longer grows with m.
# * **Interleaved 1F1B** gives each device v smaller chunks (device s holds chunks s, s+p, ...):
#   the bubble shrinks to `(1/v)(p-1)/m` of the ideal time, for v times the messages.
#
# The embedding and output layer are split over the vocabulary across the pipeline devices
# (vocabulary parallelism), so the first and last stages carry no extra weight.

# %%
from toolkit.sharding.schedules import theory_bubble_fraction, theory_bubble_ratio, timeline  # noqa: E402
from toolkit.viz import schedule_gantt  # noqa: E402

for name, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)):
    display(schedule_gantt(timeline(name, 4, 8, v)))

print(f"{'schedule':<12}{'m':>4}{'bubble':>9}{'(p-1)/(vm+p-1)':>15}{'ratio':>8}{'(p-1)/(v m)':>13}"
      f"{'stashed per stage':>22}")
for name, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)):
    for m in (4, 8, 16):
        tl = timeline(name, 4, m, v)
        print(f"{name:<12}{m:>4}{tl.bubble_fraction():>9.3f}{theory_bubble_fraction(4, m * v):>15.3f}"
              f"{tl.bubble_ratio():>8.3f}{theory_bubble_ratio(4, m, v):>13.3f}"
              f"{str(tl.peak_in_flight()):>22}")

# %% [markdown]
# The explorer takes the `pipeline` and `sequence` axes like any other. Here the model runs on
# `PIPELINE` (by default 2 stages x 2 data replicas x 2 sequence pieces): attention gathers the
# keys and values of the `sequence` axis, every other layer works on its own tokens. (Ring
# attention is the other choice without a pipeline: its `ppermute` inside a pipeline stage would
# deadlock on XLA:CPU, so `validate()` rejects that pairing.)
# The widget's *Pipeline schedule* tab draws the current schedule; the equivalence check compares
# the whole pipelined, sequence-split step with one device running the same micro-batches.

# %%
pipe = ParallelismExplorer(PRESET, overrides=EXTRA_OVERRIDES + PIPELINE_OVERRIDES, **PIPELINE)
print(pipe.error or pipe.summary())
pipe_view = ParallelismExplorerView(pipe)
display(pipe_view.render("schedule"))
if EQUIVALENCE and pipe.cfg is not None:
    eq = pipe.equivalence()
    print(f"pipeline: loss difference {eq['loss_diff']:.3g}, max gradient difference "
          f"{eq['grad_diff']:.3g}")

# %% [markdown]
# ## Planning for a real cluster
#
# The same mesh vocabulary, priced for hardware this machine does not have. The planner
# (`toolkit.analysis.planner`) tries every split of a cluster's devices into the six axes that the
# model's shapes allow, with micro-batch counts, pipeline schedules and rematerialisation, drops the
# layouts its memory model says do not fit, and ranks the rest by estimated step time: FLOPs at the
# device's matmul rate, weights read from HBM, each collective on the link its axis lands on (NVLink
# inside a node, InfiniBand across), FSDP and gradient traffic overlapped with compute, tensor-,
# expert- and context-parallel traffic on the critical path, pipeline bubbles. The same from the
# command line: `python -m toolkit plan --preset qwen3_30b_a3b --cluster h100x16 --global-batch 256K`.
#
# In the widget pick a model, a device and a count (or type a cluster such as `h100x32+a100x32` or
# `v5p-128`), the tokens per step, axes to hold fixed (`tensor=2, expert=8`) and the
# rematerialisation to try; the plan number picks whose memory, bytes sent and step time are drawn
# as bars. A cluster too small for the model shows the planner's message, with the device count that
# would fit, instead of a table. Its state is a `PlanningExplorer` (`toolkit/widgets/planning.py`).

# %%
from toolkit.widgets import PlanningExplorer, PlanningExplorerView  # noqa: E402

planner = PlanningExplorer(**PLAN)
print(planner.error or planner.explanation())
display(PlanningExplorerView(planner).widget)

# %% [markdown]
# ## Overhead, not speedup
#
# The 8 devices here are simulated on the CPU cores of one machine: every "device" shares the same
# two cores and the same memory, and a collective is a memory copy. A recipe that splits the work 8
# ways does not run 8 times faster here; it runs slower, by the cost of the extra collectives and the
# smaller matmuls. What these devices measure faithfully is what a mesh *costs*: memory per device,
# which collectives appear, and how many bytes they move. `python benchmarks/parallel.py` times every
# recipe against one device; on GPUs and TPUs the same code splits real work.
#
# ## Things to try
#
# Change the parameters cell, restart the kernel and run all, or turn the choices in the widget:
#
# * `MESH = {"data": 8, "fsdp": 1, "tensor": 1, "expert": 1}`, `RECIPE = "dp"`: no collective but the
#   gradient all-reduce; every device holds the whole model.
# * `MESH = {"data": 1, "fsdp": 8, "tensor": 1, "expert": 1}`, `RECIPE = "fsdp"`: parameters per
#   device drop 8 times; all-gathers and reduce-scatters appear.
# * `MESH = {"data": 2, "fsdp": 1, "tensor": 1, "expert": 4}`, `RECIPE = "ep"`, `DISPATCH = "capacity"`:
#   all-to-alls instead of the ring; compare their bytes with `2*k*(ep-1)/ep*T*d`.
# * `CHOICES = {"moe.bigmac_ratio": 0.25}`: the exchange moves a quarter of the width.
# * `CHOICES = {"parallel.overlap_chunks": 2}`: the same bytes in twice as many pieces, so that one
#   piece's communication can overlap another's compute on real hardware; the results stay equal.
# * `RECIPE = "fsdp_tp_ep"` on the default mesh: expert tensor parallelism instead of folding.
# * `PIPELINE = {"pipeline": 4, "data": 2, "microbatches": 8, "schedule": "gpipe"}`, then `"1f1b"`:
#   the same bubble, and in the *Memory & collectives* tab of `pipe_view` fewer temporaries for 1F1B.
# * `PIPELINE = {..., "schedule": "interleaved", "virtual_stages": 2}` with
#   `PIPELINE_OVERRIDES = ["model.num_layers=8"]`: half the bubble.
# * `MESH = {..., "sequence": 2}` with `CHOICES = {"parallel.context": "all_gather"}`: context
#   parallelism by gathering keys and values instead of the ring.
# * `PLAN = {"preset_name": "mixtral_8x7b", "cluster": "h100x64", "global_batch": "4M",
#   "remat": (False, True)}`: half a minute of planning; then `"cluster": "h100x8"` for the error that
#   says how many devices the model needs.
