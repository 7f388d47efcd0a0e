"""The run report: a short markdown page built from `summary.json` values.

    print(render_report(summary))
"""


def _fmt(x, nd=3):
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def render_report(s: dict, *, with_plots: bool = False) -> str:
    """Markdown for a summary; `with_plots` adds the line naming the run's PNG files."""
    lines = [f"# Run `{s['name']}`", "",
             f"{s['steps']} steps, {s['tokens_seen']:,} tokens, mesh {s['mesh']} "
             f"(recipe {s.get('recipe', 'fsdp_tp_ep')}), "
             f"{s['num_devices']} {s['platform']} devices. Parameters: {s['params_total']:,} total, "
             f"{s['params_active']:,} active per token.", "",
             "| metric | value |", "|---|---|",
             f"| final train CE (nats/token, mean of last 10 steps) | {_fmt(s['final_train_ce'])} |",
             f"| validation loss (nats/token, all domains) | {_fmt(s['final_val_loss'])} |",
             f"| tokens/s (after compile) | {s['tokens_per_s']:,.0f} |",
             f"| compile seconds | {_fmt(s['compile_seconds'], 1)} |", "",
             "Matmul precision: " + (", ".join(f"{c} {m}" for c, m in s.get("precision_mode", {}).items()
                                               if m != "full precision") or "full precision") + ".", "",
             "## Validation bits per byte", "",
             "| domain | model | unigram baseline |", "|---|---|---|"]
    for dom, bpb in s["val_bits_per_byte"].items():
        lines.append(f"| {dom} | {_fmt(bpb)} | {_fmt(s['unigram_bits_per_byte'][dom])} |")
    if s.get("expert_load"):
        lines += ["", "## Experts per MoE layer", "",
                  "Load is the share of routed assignments per expert over the last 10% of steps "
                  "(at least 10); "
                  "imbalance is max/mean (1.0 is balanced), CV is std/mean; FFN MFLOP/token counts "
                  "the experts actually computed.", "",
                  "| layer | load per expert | imbalance | CV | drop rate | experts/token | "
                  "FFN MFLOP/token | router entropy (nats) |",
                  "|---|---|---|---|---|---|---|---|"]
        for i, layer in enumerate(s["moe_layers"]):
            load = " ".join(f"{x:.2f}" for x in s["expert_load"][i])
            lines.append(f"| {layer} | {load} | {s['load_imbalance'][i]:.2f} | "
                         f"{s['load_cv'][i]:.3f} | {s['drop_rate'][i]:.3f} | "
                         f"{s['experts_per_token'][i]:.2f} | {s['ffn_flops_per_token'][i] / 1e6:.3f} | "
                         f"{s['router_entropy'][i]:.2f} |")
        lines += ["", "## Which experts the domains prefer (validation tokens)", "",
                  "Top experts by lift (domain share / overall share); I(domain; expert) is the "
                  "mutual information between domain and chosen expert, in bits.", "",
                  "| layer | " + " | ".join(s["domains"]) + " | I(domain; expert) bits |",
                  "|---|" + "---|" * (len(s["domains"]) + 1)]
        for i, layer in enumerate(s["moe_layers"]):
            cells = []
            for dom in s["domains"]:
                p = s["domain_preferences"][i][dom]
                cells.append(", ".join(f"e{e} ({p['lift'][e]:.2f}x)" for e in p["top_experts"]))
            lines.append(f"| {layer} | " + " | ".join(cells) +
                         f" | {s['domain_mutual_information'][i]:.3f} |")
    if with_plots:
        names = ["loss.png"] + (["expert_load.png", "domain_preference.png"] if s.get("expert_load") else [])
        lines += ["", "Plots: " + ", ".join(f"`{n}`" for n in names) + "."]
    return "\n".join(lines) + "\n"
