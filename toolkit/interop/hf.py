"""Hugging Face MoE checkpoints in and out: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE.

    cfg, model = load_hf("ckpt/")              # config.json + *.safetensors -> Transformer
    logits_btv, _ = model(tokens_bt)            # the transformers forward pass, in JAX
    save_hf(model, cfg, "out/")                 # back: config.json + model.safetensors

Weights are read with `safetensors`' numpy API (never pickle, never torch), from one
`model.safetensors` or the shards listed in `model.safetensors.index.json`. Two on-disk
expert layouts are read: one tensor per expert and projection (`experts.E.w1.weight` in
Mixtral, `experts.E.gate_proj.weight` in the others; what `save_pretrained` writes) and the
fused tensors transformers 5.x holds in memory (`mlp.experts.gate_up_proj [E, 2I, H]`,
`mlp.experts.down_proj [E, H, I]`). A torch `Linear` stores `[out, in]`, the toolkit
`[in, out]` with heads split out (`w_q [d, N, h]`), so each tensor is transposed and
reshaped on the way; every step is a permutation, so export -> import is bit-exact.

Each toolkit parameter comes from named Hugging Face tensors through a `_Spec`: the
names, their expected shapes, and the maps both ways. A missing tensor, or one of the
wrong shape, raises `HFError` naming it.
"""

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.traverse_util import flatten_dict

from toolkit.config import Config
from toolkit.interop.hf_config import (
    ARCHITECTURES,
    HFError,
    architecture_of,
    config_from_hf,
    infer_architecture,
    read_hf_config,
    to_hf_config,
)
from toolkit.models.transformer import (
    Transformer,
    listed_blocks_state,
    moe_layer_indices,
    pipeline_chunks,
)

_INDEX, _SINGLE = "model.safetensors.index.json", "model.safetensors"
_EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2")}          # gate, up, down; others *_proj


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Toolkit parameters `paths` <-> Hugging Face tensors `names` of `shapes`."""
    paths: tuple
    names: tuple
    shapes: tuple
    to_toolkit: Callable        # [hf arrays] -> [toolkit arrays]
    to_hf: Callable             # [toolkit arrays] -> [hf arrays]


def _linear(path, name, tk_shape, n_in: int = 1) -> _Spec:
    """A torch Linear weight `[out, in]` <-> toolkit `[in..., out...]` (first n_in axes in)."""
    k = int(np.prod(tk_shape[:n_in]))
    return _Spec((path,), (name,), ((int(np.prod(tk_shape)) // k, k),),
                 lambda a: [a[0].T.reshape(tk_shape)], lambda w: [w[0].reshape(k, -1).T])


def _vector(path, name, tk_shape) -> _Spec:
    return _Spec((path,), (name,), ((int(np.prod(tk_shape)),),),
                 lambda a: [a[0].reshape(tk_shape)], lambda w: [w[0].reshape(-1)])


def _experts(base, prefix, kind, e: int, d: int, width: int, fused: bool) -> _Spec:
    paths = tuple(base + ("experts", w) for w in ("w_gate", "w_up", "w_down"))
    if fused:
        def to_toolkit(a):
            gate_up, down = a
            return [gate_up[:, :width].transpose(0, 2, 1), gate_up[:, width:].transpose(0, 2, 1),
                    down.transpose(0, 2, 1)]
        return _Spec(paths, (f"{prefix}.experts.gate_up_proj", f"{prefix}.experts.down_proj"),
                     ((e, 2 * width, d), (e, d, width)), to_toolkit,
                     lambda w: [np.concatenate([w[0], w[1]], axis=2).transpose(0, 2, 1),
                                w[2].transpose(0, 2, 1)])
    gate, up, down = _EXPERT_NAMES.get(kind, ("gate_proj", "up_proj", "down_proj"))
    names = tuple(f"{prefix}.experts.{i}.{p}.weight" for p in (gate, up, down) for i in range(e))
    shapes = ((width, d),) * 2 * e + ((d, width),) * e
    return _Spec(paths, names, shapes,
                 lambda a: [np.stack([x.T for x in a[j * e:(j + 1) * e]]) for j in range(3)],
                 lambda w: [x.T for j in range(3) for x in w[j]])


def _mlp(base, prefix, d: int, width: int) -> list:
    return [_linear(base + (w,), f"{prefix}.{p}.weight", (d, width) if w != "w_down" else (width, d))
            for w, p in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj"))]


def _specs(cfg: Config, kind: str, moe_prefix, fused) -> list:
    """Every parameter's `_Spec`; `moe_prefix(i)` and `fused(i)` say how layer i's MoE
    tensors are named on disk."""
    m, moe = cfg.model, cfg.moe
    d, n, k, h = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim
    same = lambda a: [a[0]]                                     # noqa: E731
    specs = [_Spec((("embed", "table"),), ("model.embed_tokens.weight",), ((m.vocab_size, d),),
                   same, same),
             _vector(("final_norm", "scale"), "model.norm.weight", (d,))]
    if not m.tie_embeddings:
        specs.append(_linear(("unembed",), "lm_head.weight", (d, m.vocab_size)))
    moe_layers = set(moe_layer_indices(cfg))
    for i in range(m.num_layers):
        b, pre = ("blocks", i), f"model.layers.{i}"
        specs += [_vector(b + ("attn_norm", "scale"), f"{pre}.input_layernorm.weight", (d,)),
                  _vector(b + ("ffn_norm", "scale"), f"{pre}.post_attention_layernorm.weight", (d,))]
        for w, p, heads in (("w_q", "q", n), ("w_k", "k", k), ("w_v", "v", k)):
            specs.append(_linear(b + ("attn", w), f"{pre}.self_attn.{p}_proj.weight", (d, heads, h)))
            if m.attention_bias:
                specs.append(_vector(b + ("attn", f"b_{p}"), f"{pre}.self_attn.{p}_proj.bias",
                                     (heads, h)))
        specs.append(_linear(b + ("attn", "w_o"), f"{pre}.self_attn.o_proj.weight", (n, h, d), 2))
        for p, heads in (("q", n), ("k", k)):
            if m.qk_norm:
                specs.append(_vector(b + ("attn", f"{p}_norm"), f"{pre}.self_attn.{p}_norm.weight",
                                     (heads, h) if m.qk_norm == "full" else (h,)))
        f = b + ("ffn",)
        if i not in moe_layers:
            specs += _mlp(f, f"{pre}.mlp", d, m.d_ff)
            continue
        prefix = f"{pre}.{moe_prefix(i)}"
        specs.append(_linear(f + ("router", "w_de"), f"{prefix}.gate.weight", (d, moe.num_experts)))
        specs.append(_experts(f, prefix, kind, moe.num_experts, d, moe.expert_width(m.d_ff), fused(i)))
        if moe.num_shared_experts:
            specs += _mlp(f + ("shared",), f"{prefix}.shared_expert", d, moe.shared_width(m.d_ff))
        if moe.shared_expert_gate:
            specs.append(_linear(f + ("w_shared_gate",), f"{prefix}.shared_expert_gate.weight", (d, 1)))
    return specs


class _Tensors:
    """Read-only view of a checkpoint's safetensors files (one, or sharded with an index)."""

    def __init__(self, path: Path):
        from safetensors import safe_open
        self._open, self._shapes = safe_open, {}
        if (path / _INDEX).is_file():
            try:
                weight_map = json.loads((path / _INDEX).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise HFError(f"{path / _INDEX} is not a safetensors index (no weight_map: {e})") from None
            absent = sorted({f for f in weight_map.values() if not (path / f).is_file()})
            if absent:
                raise HFError(f"{path / _INDEX} lists shards that are not in {str(path)!r}: {absent[:3]}")
            self.files = {name: path / f for name, f in weight_map.items()}
        elif (path / _SINGLE).is_file():
            with safe_open(path / _SINGLE, "np") as f:
                self.files = dict.fromkeys(f.keys(), path / _SINGLE)
        else:
            found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth",
                                                                          ".safetensors"))
            raise HFError(f"{str(path)!r} has no {_SINGLE} or {_INDEX}" + (
                f" (found {found[:3]}: only safetensors are read, never pickled torch files; "
                f"convert with save_pretrained(..., safe_serialization=True))" if found else ""))

    def __contains__(self, name) -> bool:
        return name in self.files

    def shape(self, name) -> tuple:
        if name not in self._shapes:             # one header read per file
            with self._open(self.files[name], "np") as f:
                self._shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        return self._shapes[name]

    def read(self, names) -> list:
        by_file = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, group in by_file.items():
            with self._open(file, "np") as f:
                out.update({name: np.asarray(f.get_tensor(name), np.float32) for name in group})
        return [out[name] for name in names]


def _disk_layout(tensors: _Tensors, cfg: Config, kind: str):
    """`(moe_prefix(i), fused(i))` from the names present: Mixtral's MoE block is
    `block_sparse_moe` on disk and `mlp` in transformers 5.x's memory layout."""
    def moe_prefix(i):
        if kind == "mixtral" and f"model.layers.{i}.mlp.gate.weight" in tensors:
            return "mlp"
        return "block_sparse_moe" if kind == "mixtral" else "mlp"

    def fused(i):
        return f"model.layers.{i}.{moe_prefix(i)}.experts.gate_up_proj" in tensors
    return moe_prefix, fused


def hf_config(path) -> Config:
    """The toolkit `Config` derived from checkpoint directory `path`'s config.json."""
    return config_from_hf(read_hf_config(path))


def _checked(path, cfg: Config) -> tuple:
    """`(tensors, specs)` once every tensor `cfg` needs is present with its shape."""
    path = Path(path)
    kind = ARCHITECTURES[architecture_of(read_hf_config(path))]
    tensors = _Tensors(path)
    specs = _specs(cfg, kind, *_disk_layout(tensors, cfg, kind))
    missing = [name for s in specs for name in s.names if name not in tensors]
    if missing:
        raise HFError(f"{str(path)!r} lacks {len(missing)} tensor{'s' * (len(missing) > 1)} the "
                      f"config needs: {missing[:3]}{' ...' * (len(missing) > 3)}")
    for s in specs:
        for name, want in zip(s.names, s.shapes, strict=True):
            seen = tensors.shape(name)
            if seen != want:
                raise HFError(f"tensor {name} has shape {list(seen)}, expected {list(want)} by "
                              f"the config (hidden_size={cfg.model.d_model}, num_key_value_heads="
                              f"{cfg.model.num_kv_heads}, head_dim={cfg.model.head_dim}, ...)")
    return tensors, specs


def check_hf(path, cfg: Config | None = None) -> Config:
    """The derived `Config` of checkpoint `path` once its tensors' names and shapes fit it
    (or fit `cfg`); reads no weights."""
    cfg = cfg or hf_config(path)
    _checked(path, cfg)
    return cfg


def load_hf_params(path, cfg: Config) -> dict:
    """The checkpoint's weights as a nested dict shaped like
    `nnx.to_pure_dict(nnx.state(Transformer(cfg, ...), nnx.Param))`, float32 numpy."""
    tensors, specs = _checked(path, cfg)
    params = {}
    for s in specs:
        for p, value in zip(s.paths, s.to_toolkit(tensors.read(s.names)), strict=True):
            node = params
            for key in p[:-1]:
                node = node.setdefault(key, {})
            node[p[-1]] = np.ascontiguousarray(value)
    return params


def load_hf(path) -> tuple:
    """`(cfg, model)`: the derived `Config` and a `Transformer` holding the checkpoint's weights."""
    cfg = hf_config(path)
    params = load_hf_params(path, cfg)
    return cfg, model_from_params(cfg, params)


def model_from_params(cfg: Config, params: dict) -> Transformer:
    """A `Transformer` of `cfg` holding `params` (a nested dict as `load_hf_params` returns);
    no random parameters are drawn (variables that are not parameters, such as router
    state, are made as a fresh model makes them)."""
    def build():
        return Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, weights, _ = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
    rest = jax.jit(lambda: nnx.split(build(), nnx.Param, ...)[2])()
    nnx.replace_by_pure_dict(weights, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, weights, rest)


def save_hf(model_or_state, cfg: Config, path, *, architecture: str | None = None,
            fused: bool = False) -> Path:
    """Write `config.json` and `model.safetensors` of a toolkit model (or its parameter
    dict, as `load_hf_params` returns) to directory `path` as `architecture` (default:
    `infer_architecture(cfg)`); one tensor per expert, or with `fused` the transformers 5.x
    in-memory layout (`mlp.experts.gate_up_proj`). Returns the directory."""
    from safetensors.numpy import save_file
    architecture = architecture or infer_architecture(cfg)
    hf = to_hf_config(cfg, architecture)
    kind = ARCHITECTURES[architecture]
    if isinstance(model_or_state, nnx.Module):
        model_or_state = nnx.to_pure_dict(nnx.state(model_or_state, nnx.Param))
    tree = dict(model_or_state)
    if "stages" in tree and tree["stages"] is not None:      # a pipelined model's stacked blocks
        v, p, _ = pipeline_chunks(cfg)
        tree = listed_blocks_state(tree, v, p)
    flat = {p: np.asarray(v, np.float32) for p, v in flatten_dict(tree).items()}
    prefix = "mlp" if fused or kind != "mixtral" else "block_sparse_moe"
    out = {}
    for s in _specs(cfg, kind, lambda i: prefix, lambda i: fused):
        absent = [p for p in s.paths if p not in flat]
        if absent:
            raise HFError(f"the parameters lack {['/'.join(map(str, p)) for p in absent]} "
                          f"that this config has")
        for name, value in zip(s.names, s.to_hf([flat[p] for p in s.paths]), strict=True):
            out[name] = np.ascontiguousarray(value)
    path = Path(path)
    if (path / _INDEX).exists():
        raise HFError(f"{str(path)!r} already holds a sharded checkpoint ({_INDEX}), which would "
                      f"shadow the model.safetensors written now; export to an empty directory")
    path.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path / _SINGLE), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return path
