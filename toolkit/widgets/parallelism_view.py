"""The parallelism explorer's widget: a thin ipywidgets view over a `ParallelismExplorer`.

The view renders the state (mesh and recipe choices, a summary line, the error, and the
recipes, sharding, inspection, communication and equivalence tables as HTML) and forwards
what the user changes to it. The sharding table follows every change at once (nothing
compiles); the other results compile, so they run from buttons in a background thread,
and a config computed before shows its results again at once.

    view = ParallelismExplorerView(ParallelismExplorer("tiny", expert=2, recipe="ep"))
    display(view.widget)
    view.start(("inspect", "communication")); view.wait()    # what "Compile & inspect" does
    display(view.render("sharding"))                           # any table as HTML (computes it)
"""

import base64
import html
import io
import threading
import traceback

import ipywidgets as W
import matplotlib.pyplot as plt
from IPython.display import HTML

from toolkit.sharding.mesh import MESH_AXES
from toolkit.sharding.schedules import theory_bubble_fraction, theory_bubble_ratio
from toolkit.viz.pipeline import schedule_gantt
from toolkit.widgets.parallelism import CHOICES, ParallelismExplorer, recipes_table

VIEWS = ("recipes", "sharding", "schedule", "inspect", "communication", "equivalence")
"""The tables: the recipes' rules, the parameter shardings, the pipeline schedule's
timeline, the compiled step's memory and collectives, the communication check, and the
single-device equivalence check."""

_TITLES = {"recipes": "Recipes", "sharding": "Sharding", "schedule": "Pipeline schedule",
           "inspect": "Memory & collectives", "communication": "Bytes vs formulas",
           "equivalence": "Equivalence"}
_STYLE = ('<style>.ptk td,.ptk th{padding:2px 8px;text-align:left;font-family:monospace;'
          'font-size:12px}.ptk tr:nth-child(even){background:rgba(127,127,127,.08)}'
          '.ptk .hi{font-weight:bold;background:rgba(255,200,0,.18)}</style>')


def _size(b) -> str:
    """Bytes as KiB below 1 MiB, else MiB."""
    return f"{b / 1024:,.1f} KiB" if b < 2**20 else f"{b / 2**20:,.2f} MiB"


def html_table(rows, columns, *, caption: str = "", highlight: str = "") -> str:
    """An HTML table of `rows` (dicts); `columns` is `[(key, header), ...]`; the column whose
    key is `highlight` is drawn bold. Cells are escaped. The `*_html` renderers below prepend
    the table style once."""
    head = "".join(f'<th class="{"hi" if k == highlight else ""}">{html.escape(h)}</th>' for k, h in columns)
    body = "".join("<tr>" + "".join(f'<td class="{"hi" if k == highlight else ""}">'
                                    f'{html.escape(str(r.get(k, "")))}</td>' for k, _ in columns) + "</tr>"
                   for r in rows)
    cap = f"<caption style='text-align:left'><b>{html.escape(caption)}</b></caption>" if caption else ""
    return f'<table class="ptk">{cap}<tr>{head}</tr>{body}</table>'


def recipes_html(recipe: str = "") -> str:
    """Every recipe's rules: the mesh axes each logical axis maps to (blank: replicated)."""
    rows = recipes_table()
    recipes = [k for k in rows[0] if k not in ("logical", "meaning")]
    columns = [("logical", "logical axis"), *((r, r) for r in recipes), ("meaning", "meaning")]
    return _STYLE + html_table(rows, columns, caption="logical axis -> mesh axes, per recipe",
                               highlight=recipe)


def sharding_html(rows) -> str:
    """The sharding table of `ParallelismExplorer.sharding_table`, with per-device totals."""
    shown = [{**r, "shape": "x".join(map(str, r["shape"])) or "scalar",
              "shard": "x".join(map(str, r["shard"])) or "scalar",
              "logical": ", ".join("-" if n is None else n for n in r["logical"]) or "-",
              "split": "replicated" if r["split"] == 1 else f"1/{r['split']}",
              "bytes": _size(r["bytes"])} for r in rows]
    total = sum(r["bytes"] for r in rows)
    full = sum(r["bytes"] * r["split"] for r in rows)
    columns = [("path", "parameter"), ("shape", "global shape"), ("logical", "logical axes"),
               ("spec", "PartitionSpec"), ("shard", "shard per device"), ("split", "share"),
               ("bytes", "per device")]
    caption = (f"parameters: {_size(total)} per device of {_size(full)} "
               f"({full / max(total, 1):.2f}x less than one device holding all)")
    return _STYLE + html_table(shown, columns, caption=caption)


def inspection_html(info: dict) -> str:
    """Memory per device and the collectives of `inspect_train_step`'s result."""
    memory = [{"what": what, "bytes": _size(info[key])} for what, key in (
        ("model parameters", "param_bytes"), ("parameters + optimizer state", "state_bytes"),
        ("step arguments", "argument_bytes"), ("step outputs", "output_bytes"),
        ("temporaries", "temp_bytes"))]
    coll = [{"kind": k, "count": r["count"], "result": _size(r["result_bytes"]),
             "sent": _size(r["sent_bytes"])} for k, r in sorted(info["collectives"].items())]
    title = f"train step on mesh {info['mesh']} ({info['devices']} devices, recipe {info['recipe']})"
    out = _STYLE + html_table(memory, [("what", "per device"), ("bytes", "bytes")],
                              caption=f"{title}: memory")
    if not coll:
        return out + "<p><i>no collectives: every array is local</i></p>"
    columns = [("kind", "collective"), ("count", "ops"), ("result", "result bytes"),
               ("sent", "sent per device (ring)")]
    return out + html_table(coll, columns, caption="collectives in the compiled step")


def communication_html(rows) -> str:
    """`communication_check` rows: HLO bytes beside the analytic formula."""
    if not rows:
        return "<p><i>no expert or tensor parallelism on this mesh: nothing to check</i></p>"
    shown = [{**r, "measured": _size(r["measured_bytes"]), "analytic": _size(r["analytic_bytes"]),
              "ratio": f"{r['measured_bytes'] / r['analytic_bytes']:.2f}" if r["analytic_bytes"] else "-"}
             for r in rows]
    columns = [("what", "collective"), ("kind", "kind"), ("measured", "HLO (sent)"),
               ("analytic", "formula"), ("ratio", "HLO / formula")]
    return _STYLE + html_table(shown, columns, caption="bytes one device sends, compiled block vs formula")


def equivalence_html(result: dict, top: int = 8) -> str:
    """The loss and the `top` largest gradient differences, mesh vs one device."""
    head = [{"what": "loss on the mesh", "value": f"{result['loss_mesh']:.7f}"},
            {"what": "loss on one device", "value": f"{result['loss_single']:.7f}"},
            {"what": "|loss difference|", "value": f"{result['loss_diff']:.3g}"},
            {"what": "max |gradient difference|", "value": f"{result['grad_diff']:.3g}"},
            {"what": "MoE dispatch groups on the mesh", "value": result["dispatch_groups"]},
            {"what": "moe.dispatch_groups on one device", "value": result["single_dispatch_groups"]}]
    worst = sorted(result["grads"], key=lambda g: -g["max_abs_diff"])[:top]
    shown = [{"path": g["path"], "diff": f"{g['max_abs_diff']:.3g}", "scale": f"{g['max_abs']:.3g}"}
             for g in worst]
    columns = [("path", "parameter"), ("diff", "max |grad diff|"), ("scale", "max |grad|")]
    return (_STYLE + html_table(head, [("what", "train batch 0"), ("value", "value")],
                                caption="the mesh vs one device")
            + html_table(shown, columns, caption=f"the {len(shown)} largest gradient differences"))


def schedule_html(tl) -> str:
    """The schedule's Gantt chart (PNG) and its bubble next to the theory, or a hint."""
    if tl is None:
        return "<p><i>set <b>pipeline</b> above 1 to see its schedule</i></p>"
    buf = io.BytesIO()
    fig = schedule_gantt(tl)
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    p, m, v = tl.stages, tl.microbatches, tl.virtual
    rows = [{"what": "bubble fraction (idle share of stages x time)",
             "timeline": f"{tl.bubble_fraction():.4f}",
             "theory": f"{theory_bubble_fraction(p, m * v):.4f}"},
            {"what": "bubble / ideal time (Megatron)", "timeline": f"{tl.bubble_ratio():.4f}",
             "theory": f"{theory_bubble_ratio(p, m, v):.4f}"},
            {"what": "micro-batch chunks stashed per stage", "timeline": str(tl.peak_in_flight()),
             "theory": f"{m} (GPipe) / p-s (1F1B)"}]
    img = base64.b64encode(buf.getvalue()).decode()
    return (f'<img src="data:image/png;base64,{img}"/>' + _STYLE +
            html_table(rows, [("what", ""), ("timeline", "from the timeline"), ("theory", "theory")]))


class ParallelismExplorerView:
    """Widgets over a `ParallelismExplorer`: the choices, two buttons, the tables in tabs.

    Attributes:
      explorer: the state it renders.
      widget: the box to display.
      choices: choice key -> its dropdown.
      panes: view name (`VIEWS`) -> an HTML widget.
      failure: the traceback of a background computation that raised, or None.
    """

    def __init__(self, explorer: ParallelismExplorer):
        self.explorer = explorer
        self.failure, self._syncing, self._thread = None, False, None
        self._busy = ""        # what the background thread computes, "" when idle
        self.choices = {c.key: W.Dropdown(description=c.name, style={"description_width": "130px"},
                                          layout=W.Layout(width="330px"), tooltip=c.help)
                        for c in CHOICES}
        self.inspect_button = W.Button(description="Compile & inspect", button_style="primary",
                                       icon="cogs", layout=W.Layout(width="180px"))
        self.equivalence_button = W.Button(description="Check equivalence", icon="check",
                                           layout=W.Layout(width="180px"))
        self.summary, self.status, self.error = W.HTML(), W.HTML(), W.HTML()
        self.panes = {name: W.HTML() for name in VIEWS}
        self.tabs = W.Tab(children=[self.panes[n] for n in VIEWS])
        self.tabs.titles = [_TITLES[n] for n in VIEWS]
        self.tabs.selected_index = 1

        for key, w in self.choices.items():
            w.observe(lambda change, key=key: self._on_choice(key, change["new"]), names="value")
        self.inspect_button.on_click(lambda _: self.start(("inspect", "communication")))
        self.equivalence_button.on_click(lambda _: self.start(("equivalence",)))
        grid = W.GridBox(list(self.choices.values()),
                         layout=W.Layout(grid_template_columns="repeat(2, 340px)"))
        self.widget = W.VBox([
            W.HBox([grid, W.VBox([self.inspect_button, self.equivalence_button])]),
            self.summary, self.status, self.error, self.tabs,
        ])
        self.refresh()

    # -- rendering -------------------------------------------------------------------------
    def html(self, name: str, *, compute: bool = True) -> str:
        """One table as HTML; with `compute=False`, only a result already cached, or a line
        saying which button computes it."""
        ex = self.explorer
        if name == "recipes":
            return recipes_html(ex.cfg.parallel.recipe if ex.cfg else "")
        if name == "schedule" and not ex.error:
            return schedule_html(ex.schedule())
        if name not in VIEWS:
            raise ValueError(f"view {name!r} is unknown; use one of {VIEWS}")
        if ex.error:
            return f"<p><i>fix the config to see {_TITLES[name].lower()}</i></p>"
        method = {"sharding": ex.sharding_table, "inspect": ex.inspect,
                  "communication": ex.communication, "equivalence": ex.equivalence}[name]
        data = method() if compute or name == "sharding" else ex.cached(name)
        if data is None:
            button = "Check equivalence" if name == "equivalence" else "Compile & inspect"
            return f"<p><i>press <b>{html.escape(button)}</b> to compute this for the current config</i></p>"
        render = {"sharding": sharding_html, "inspect": inspection_html,
                  "communication": communication_html, "equivalence": equivalence_html}[name]
        return render(data)

    def render(self, name: str) -> HTML:
        """One table (`VIEWS`) as a display object, computing it if needed (compiles)."""
        return HTML(self.html(name))

    def sync_controls(self) -> None:
        """Choices, summary, status and error from the state (without echoing back)."""
        ex = self.explorer
        relevant = {c.key for c in ex.choices()}
        self._syncing = True
        try:
            for key, w in self.choices.items():
                mesh_axis = key.split(".")[1] in MESH_AXES
                w.options = [(("-1 (the rest)" if v == -1 and mesh_axis else str(v)), v)
                             for v in ex.options(key)]
                w.value = ex.values[key]
                w.layout.display = None if key in relevant else "none"
                w.disabled = bool(self._busy)
        finally:
            self._syncing = False
        self.inspect_button.disabled = self.equivalence_button.disabled = bool(self._busy or ex.error)
        self.summary.value = f"<b>{html.escape(ex.summary())}</b>"
        overrides = " ".join(f"--set {o}" for o in ex.overrides())
        self.status.value = (f"computing ({html.escape(self._busy)})..." if self._busy
                             else f"<code>{html.escape(overrides)}</code>" if overrides else "")
        problem = self.failure or ex.error
        self.error.value = (f'<pre style="color:#b00020;white-space:pre-wrap">{html.escape(problem)}</pre>'
                            if problem else "")

    def refresh_panes(self) -> None:
        for name in VIEWS:
            self.panes[name].value = self.html(name, compute=False)

    def refresh(self) -> None:
        self.sync_controls()
        self.refresh_panes()

    # -- forwarding --------------------------------------------------------------------------
    def _on_choice(self, key: str, value) -> None:
        if not self._syncing:
            self.failure = None
            self.explorer.set({key: value})
            self.refresh()

    # -- compiling in the background ------------------------------------------------------------
    def start(self, names=("inspect", "communication")) -> bool:
        """Compute the views `names` in a background thread; False if busy or invalid."""
        if self._busy or self.explorer.error:
            return False
        self._busy, self.failure = ", ".join(names), None
        self.sync_controls()
        self._thread = threading.Thread(target=self._compute, args=(tuple(names),), daemon=True)
        self._thread.start()
        return True

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _compute(self, names) -> None:
        try:
            for name in names:
                self.panes[name].value = self.html(name)
                self.tabs.selected_index = VIEWS.index(name)
        except Exception:  # a thread has no cell to raise into: show the traceback in the view
            self.failure = traceback.format_exc()
        finally:
            self._busy = ""
            self.refresh()
