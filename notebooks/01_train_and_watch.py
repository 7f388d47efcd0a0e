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
# # 01 · Train a Mixture-of-Experts model and watch its routers
#
# **Open it:** from the repository root run `make lab`, open `01_train_and_watch.ipynb` and choose
# *Run ▸ Run All Cells*. The notebook is paired with `01_train_and_watch.py` (jupytext): saving in
# JupyterLab updates both; the `.py` is the source under review, the `.ipynb` is kept without outputs.
#
# This notebook trains the `tiny` MoE transformer on the embedded corpus (Python's documentation prose
# and standard-library code, two domains) on 8 simulated CPU devices. While it trains, a loss plot
# and an expert-load heatmap redraw in place; at the end it shows validation bits per byte per domain
# next to a byte-unigram baseline, and which experts each domain prefers.
#
# **A tiny CPU run:** every size lives in the `parameters` cell below. Set `STEPS = 30` and
# `EXTRA_OVERRIDES = ["model.num_layers=2", "train.batch_size=8", "model.seq_len=32"]` for a run of
# under a minute on a laptop. The tests execute this notebook headless with such values injected after
# that cell: `.venv/bin/python -m pytest -q tests/notebooks`. The defaults (300 steps of `tiny`, 4,096
# tokens a step) take seconds per step on a 2-core CPU, so plan on tens of minutes there.

# %% tags=["parameters"]
PRESET = "tiny"  # a preset from toolkit.config.PRESETS that trains on a CPU: "tiny" or "small"
STEPS = 300  # optimizer steps
EVAL_EVERY = 50  # steps between validation passes (0: only at the end)
PLOT_EVERY = 10  # steps between redraws of the live plots
DEVICES = 8  # simulated CPU devices; ignored on GPU/TPU, where the accelerators are the devices
EXTRA_OVERRIDES = []  # dotted config overrides, e.g. ["moe.num_experts=16", "moe.top_k=1"]

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

from toolkit.analysis import count_params  # noqa: E402
from toolkit.config import apply_overrides, preset  # noqa: E402
from toolkit.training import Trainer, render_report  # noqa: E402
from toolkit.viz import plots  # noqa: E402
from toolkit.widgets import LivePlots, figure_png  # noqa: E402

print(f"{len(jax.devices())} {jax.default_backend()} devices")

# %% [markdown]
# ## The run, as a config
#
# A run is one frozen `Config`: a preset plus dotted overrides, exactly as on the command line
# (`python -m toolkit train --preset tiny --set train.steps=300`). Warmup must stay below the step
# count, so short runs shorten it. The mesh axis `data=-1` (the default) fills every device with data
# parallelism. `Trainer` validates the config before compiling anything: a bad value raises a
# `ConfigError` that names the field, the value and a value that would work.

# %%
cfg = preset(PRESET)
cfg = apply_overrides(cfg, [
    f"train.steps={STEPS}",
    f"train.warmup_steps={min(cfg.train.warmup_steps, STEPS // 10)}",
    f"train.eval_every={EVAL_EVERY}",
    "train.checkpoint_every=0",
    *EXTRA_OVERRIDES,
])
trainer = Trainer(cfg, progress=False)  # no out_dir: nothing is written to disk
total, active = count_params(cfg)
print(f"{cfg.name}: {total:,} parameters, {active:,} active per token; mesh {dict(trainer.mesh.shape)}; "
      f"MoE layers {trainer.moe_layers}; {cfg.moe.num_experts} experts, top-{cfg.moe.top_k}")

# %% [markdown]
# ## Train, step by step
#
# `trainer.advance()` runs one optimizer step and returns its metrics as plain numbers; the
# first call compiles (seconds to a minute). Every `EVAL_EVERY` steps it also runs
# `trainer.evaluate()`, which measures the validation loss per domain. Every `PLOT_EVERY` steps
# the view redraws:
#
# * the **status line**: the last step's training cross-entropy, tokens/s, drop rate and the latest
#   validation bits per byte;
# * the **loss curves**: training cross-entropy per step and validation loss per domain (nats/token);
# * the **expert load**: for each MoE layer, the share of routed token assignments each expert took
#   over the last `PLOT_EVERY` steps. Perfect balance is `1/num_experts` in every cell (0.125 for 8
#   experts). A freshly initialised router already favours some experts by chance, and training
#   pushes it further; the load-balancing loss (`moe.aux_loss_weight`) pulls the map back toward flat.
#
# To stop early, interrupt the kernel (■); the cells below summarise the steps done so far.

# %%
live = LivePlots(every=PLOT_EVERY, layer_names=[f"L{i}" for i in trainer.moe_layers])
live.show()
while trainer.step_num < cfg.train.steps:
    trainer.advance()  # one step, plus validation when the schedule says so
    live.update(trainer.history, trainer.val_history)

# %% [markdown]
# ## The end of the run
#
# `trainer.finish()` evaluates once more (unless the last step was just evaluated) and returns the
# run's summary as a plain dict, the same values `make demo` writes to `runs/<name>/summary.json`. The
# live plots above take a last frame with the final validation point.

# %%
summary = trainer.finish()
live.update(trainer.history, trainer.val_history, force=True)
print(f"{summary['steps']} steps, {summary['tokens_seen']:,} tokens, "
      f"{summary['tokens_per_s']:,.0f} tokens/s after {summary['compile_seconds']:.1f} s of compiling")

# %% [markdown]
# ## Reading the report
#
# The report below is the one the command line prints (`toolkit.training.render_report`).
#
# **Validation bits per byte.** The tokenizer is bytes, so the loss in bits per byte is the number of
# bits the model needs to encode each byte of held-out text. The *unigram baseline* knows only how
# often each byte occurs in the training text; the gap between the two columns is what the model
# learned from context. After a few hundred steps the model should be well below the baseline on both
# domains; after a handful of steps (the tests' run) it is still above it.
#
# **Experts per MoE layer.** *Load* is each expert's share of the routed assignments over the last
# 10% of steps. *Imbalance* is the busiest expert's load over the mean: 1.0 is perfectly balanced,
# and `num_experts / top_k` means every token goes to the same `top_k` experts (collapse). *Drop rate*
# is the share of assignments that found no slot: always 0 with `moe.dispatch=dropless`, positive
# with `capacity` when an expert overflows. *Router entropy* (nats) is the entropy of the router's
# probabilities, `ln(num_experts)` for a router that has not decided anything yet.
#
# **Which experts the domains prefer.** Counted on validation tokens. The *lift* of an expert for a
# domain is the share of that domain's assignments the expert receives divided by its share of all
# assignments: above 1 the domain prefers the expert, below 1 it avoids it. *I(domain; expert)* is the
# mutual information between a token's domain and the expert it chose, in bits (equal to the
# Jensen-Shannon divergence between the two domains' distributions over experts): 0 when prose and
# code are routed alike, up to 1 bit (log2 of the number of domains) when they use disjoint experts.

# %%
display(Markdown(render_report(summary)))

# %% [markdown]
# ## Expert load and domain preference, as pictures
#
# First the final expert load per layer (the report's *load* column), then, for each domain, the
# log2 lift of every expert in every MoE layer. Red cells are experts the domain prefers (+1 is twice
# its fair share), blue cells experts it avoids. Specialized routing shows up as red/blue patterns
# that mirror each other between prose and code; a pale map means the routers ignore the domain.

# %%
layer_names = [f"L{i}" for i in summary["moe_layers"]]
display(figure_png(plots.expert_load_heatmap(summary["expert_counts"], layer_names=layer_names,
                                             title="expert load, last 10% of steps")))
display(figure_png(plots.domain_preference_heatmap(summary["domain_counts"], summary["domains"],
                                                   layer_names=layer_names)))

# %% [markdown]
# ## Things to try
#
# Change `EXTRA_OVERRIDES` in the parameters cell, restart the kernel and run all:
#
# * `["moe.aux_loss_weight=0"]`: no load-balancing loss; watch the load heatmap for experts that go
#   dark and the imbalance grow;
# * `["moe.dispatch=capacity", "moe.capacity_factor=1.0"]`: fixed expert capacity; the drop rate
#   becomes positive whenever the load is uneven;
# * `["moe.num_experts=16", "moe.top_k=1"]`: more, narrower choices; does I(domain; expert) rise?
