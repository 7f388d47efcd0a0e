"""Speculative token shuffling (Speculative MoE's s-TS), scored offline from routing traces.

Before each MoE layer, move every token to the device a table predicts its expert will be
on, inside a collective that runs anyway (the reduce-scatter after attention); a right
guess saves the token's expert all-to-all hop, a wrong one falls back to it, so nothing is
lost but the guess. Two predictors, fitted on one trace and scored on another:

    fit, held_out = routing_trace(model, train_tokens), routing_trace(model, val_tokens)
    best = place_experts(fit, 4)                                 # toolkit.analysis.placement
    out = speculative_shuffle(fit, held_out, best.device_le, d_model=128)
    out["accuracy"], out["bytes_saved_fraction"]                 # per layer, overall

Where a token is and what a hop costs follow `toolkit.analysis.placement`.
"""

import numpy as np

from toolkit.analysis.placement import Trace, check_placement


def _token_devices(trace: Trace, device_le) -> np.ndarray:
    """int [L, N] the device each token is on after each MoE layer, -1 without an expert."""
    top_ln = trace.top1_ln()
    return np.where(top_ln >= 0, np.take_along_axis(device_le, np.maximum(top_ln, 0), 1), -1)


def _table(keys_fit, dev_fit, keys_eval, prior_c):
    """(prediction, confidence) per held-out token from counts of (key, device) on the fit
    trace, smoothed toward `prior_c` with the weight of one token; a key of -1 is unknown."""
    d = len(prior_c)
    ok = (keys_fit >= 0) & (dev_fit >= 0)
    n_keys = max(int(keys_fit.max(initial=0)), int(keys_eval.max(initial=0))) + 1
    counts_kc = np.bincount(keys_fit[ok] * d + dev_fit[ok], minlength=n_keys * d).reshape(n_keys, d)
    p_kc = (counts_kc + prior_c) / (counts_kc.sum(1, keepdims=True) + 1)
    p_nc = np.where(keys_eval[:, None] >= 0, p_kc[np.maximum(keys_eval, 0)], prior_c)
    return p_nc.argmax(1), p_nc.max(1)


def speculative_shuffle(fit: Trace, held_out: Trace, device_le, *, d_model: int,
                        bytes_per_element: int = 2) -> dict:
    """Speculative token shuffling (s-TS) under placement `device_le` [L, E], fitted on `fit`
    and scored on `held_out`.

    Two tables predict the device a token's top-1 expert will be on at MoE layer l: token id
    -> device, and the token's devices at layers l-2, l-1 -> device (only l-1 at layer 1,
    none at layer 0). Each predicts its most frequent device (counts smoothed toward the
    layer's device shares with the weight of one token); per token the more confident wins.

    Bytes, one hop = d_model * bytes_per_element: without speculation a token hops when its
    device changes from layer l-1 (at layer 0, from its data-parallel device, which is
    independent of routing: (D-1)/D of the tokens hop); with it, when the guess was wrong.
    Returns [L] arrays `accuracy`, `token_accuracy`, `context_accuracy` (nan at layer 0),
    `context_share`, `tokens`, `baseline_bytes`, `speculative_bytes`, and overall floats
    `total_accuracy`, `bytes_saved`, `bytes_saved_fraction`.
    """
    if fit.num_layers != held_out.num_layers or fit.num_experts != held_out.num_experts:
        raise ValueError(f"speculative_shuffle: fit has {fit.num_layers} layers x {fit.num_experts} "
                         f"experts, held_out {held_out.num_layers} x {held_out.num_experts}; trace one model")
    device_le = check_placement(fit, device_le)
    d = int(device_le.max()) + 1
    dev_fit, dev_ev = _token_devices(fit, device_le), _token_devices(held_out, device_le)
    hop = d_model * bytes_per_element
    out = {k: np.zeros(fit.num_layers) for k in ("accuracy", "token_accuracy", "context_accuracy",
                                                 "context_share", "tokens", "baseline_bytes",
                                                 "speculative_bytes")}
    for layer in range(fit.num_layers):
        ok_fit = dev_fit[layer] >= 0
        prior_c = np.bincount(dev_fit[layer][ok_fit], minlength=d) / max(ok_fit.sum(), 1)
        tok_pred, tok_conf = _table(fit.token_ids_n, dev_fit[layer], held_out.token_ids_n, prior_c)
        truth, counted = dev_ev[layer], dev_ev[layer] >= 0
        if layer == 0:
            pred, use_ctx = tok_pred, np.zeros(len(truth), bool)
            out["context_accuracy"][0] = np.nan
            base_hops = (d - 1) / d * counted.sum()
        else:
            ctx_pred, ctx_conf = _table(_context_key(dev_fit, layer, d), dev_fit[layer],
                                        _context_key(dev_ev, layer, d), prior_c)
            counted &= dev_ev[layer - 1] >= 0
            use_ctx = ctx_conf >= tok_conf
            pred = np.where(use_ctx, ctx_pred, tok_pred)
            out["context_accuracy"][layer] = np.mean(ctx_pred[counted] == truth[counted])
            base_hops = np.sum(counted & (dev_ev[layer - 1] != truth))
        n = max(counted.sum(), 1)
        out["accuracy"][layer] = np.sum(counted & (pred == truth)) / n
        out["token_accuracy"][layer] = np.sum(counted & (tok_pred == truth)) / n
        out["context_share"][layer] = np.sum(counted & use_ctx) / n
        out["tokens"][layer] = counted.sum()
        out["baseline_bytes"][layer] = base_hops * hop
        out["speculative_bytes"][layer] = np.sum(counted & (pred != truth)) * hop
    saved = float(out["baseline_bytes"].sum() - out["speculative_bytes"].sum())
    out.update(total_accuracy=float((out["accuracy"] * out["tokens"]).sum() / max(out["tokens"].sum(), 1)),
               bytes_saved=saved, bytes_saved_fraction=saved / max(out["baseline_bytes"].sum(), 1e-12))
    return out


def _context_key(dev_ln, layer: int, d: int) -> np.ndarray:
    """int [N] the devices at layers l-2 and l-1 (only l-1 at layer 1) as one key, -1 if unknown."""
    prev_mn = dev_ln[max(layer - 2, 0):layer]
    key = np.zeros(dev_ln.shape[1], np.int64)
    for dev_n in prev_mn:
        key = key * d + dev_n
    return np.where((prev_mn >= 0).all(0), key, -1)
