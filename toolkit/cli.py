"""Command line: `python -m toolkit {train, inspect, plan, config, launch, generate}`.

    python -m toolkit train --preset tiny --mesh data=2,fsdp=4 --out runs/tiny
    python -m toolkit train --preset tiny --set moe.num_experts=16 --set train.steps=300
    python -m toolkit inspect --preset tiny --mesh fsdp=8   # memory and collectives per device
    python -m toolkit inspect --mesh data=2,expert=4 --recipe ep --set moe.dispatch=capacity
    python -m toolkit inspect --preset tiny --mesh data=2,expert=4 --costs   # model vs compiled
    python -m toolkit plan --preset mixtral_8x7b --cluster h100x64 --global-batch 4M
    python -m toolkit generate --run runs/tiny --prompt "def " --temperature 0.8 --trace
    python -m toolkit config --preset tiny          # every key, its value and meaning
    python -m toolkit inspect --hf ckpt/            # a Hugging Face MoE checkpoint's config
    python -m toolkit train --init-from-hf ckpt/ --set train.steps=50   # fine-tune it
    python -m toolkit launch --processes 2 -- train --mesh data=2,expert=4   # 2 JAX processes
    srun python -m toolkit train --distributed ...  # every process of a SLURM or TPU job

On CPU the CLI simulates `--devices` devices (8 by default), set before JAX starts.
Multi-process runs join through `jax.distributed` (see `toolkit.sharding.distributed`).
"""

import argparse
import os
import sys


def _parser():
    p = argparse.ArgumentParser(prog="python -m toolkit", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("train", "train a model and write runs/NAME"),
                        ("inspect", "compile the train step; print memory and collectives per "
                                    "device"),
                        ("config", "print every config key with its value and meaning")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--preset", default="tiny", help="preset name (default: tiny)")
        s.add_argument("--config", default=None, metavar="FILE.json",
                       help="a JSON config, whole or in part, shaped like runs/NAME/config.json, "
                            "e.g. {\"moe\": {\"num_experts\": 16}}; applied over --preset, "
                            "before --mesh and --set")
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="dotted override, e.g. moe.num_experts=16 (repeatable)")
        s.add_argument("--mesh", default=None, metavar="AXIS=N,...",
                       help="mesh axis sizes, e.g. data=2,fsdp=4 (axes: pipeline, data, fsdp, "
                            "sequence, tensor, expert)")
        s.add_argument("--recipe", default=None,
                       help="parallelism recipe: dp, fsdp, tp, ep, fsdp_ep, fsdp_tp_ep (default) "
                            "or folded; same as --set parallel.recipe=...")
        if name in ("train", "inspect"):
            s.add_argument("--devices", type=_positive, default=8,
                           help="simulated devices when running on CPU (default: 8)")
        if name == "inspect":
            s.add_argument("--hf", default=None, metavar="PATH",
                           help="a local Hugging Face MoE checkpoint directory (Mixtral, "
                                "Qwen2-MoE, Qwen3-MoE, OLMoE): print its derived config and "
                                "parameter count, checking its tensors, without compiling")
            s.add_argument("--costs", action="store_true",
                           help="also set the cost model's FLOPs, memory and bytes beside the "
                                "compiled program's (toolkit.training.cost_check)")
        if name == "train":
            s.add_argument("--init-from-hf", default=None, metavar="PATH",
                           help="fine-tune a local Hugging Face MoE checkpoint: its derived "
                                "config (instead of --preset; --set applies on top) and its "
                                "weights instead of a random init")
            s.add_argument("--out", default=None, help="run directory (default: runs/<name>)")
            s.add_argument("--resume", action="store_true", help="continue the run in --out")
            s.add_argument("--no-progress", action="store_true", help="no progress bar")
            s.add_argument("--distributed", action="store_true",
                           help="call jax.distributed.initialize() first, which detects a "
                                "SLURM, Open MPI or Cloud TPU job; run the same command in "
                                "every process (launch sets this up on one machine)")
    s = sub.add_parser("plan", help="rank parallel layouts of a preset on a cluster by estimated "
                                    "step time (toolkit.analysis.planner)")
    s.add_argument("--preset", default="mixtral_8x7b", help="preset name (default: mixtral_8x7b)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override of the model, e.g. model.seq_len=8192 (repeatable)")
    s.add_argument("--cluster", default="h100x64",
                   help="DEVICExCOUNT (h100x64, a100x32, b200x16), a TPU slice (v5p-128, v6e-256), "
                        "cpuxN, or groups joined by '+' (h100x32+a100x32)")
    s.add_argument("--global-batch", default=None,
                   help="tokens per step, e.g. 4M or 512K (default: the preset's batch)")
    s.add_argument("--fix", default=None, metavar="AXIS=N,...",
                   help="hold mesh axes at these sizes, e.g. tensor=2,pipeline=4")
    s.add_argument("--remat", choices=("both", "on", "off"), default="both",
                   help="rematerialise each layer in the backward: try both (default), on or off")
    s.add_argument("--top", type=_positive, default=10, help="plans to list (default: 10)")
    s = sub.add_parser("generate", help="continue a prompt with a trained run's model (KV-cached, "
                                        "on one device; toolkit.generation)")
    s.add_argument("--run", required=True, metavar="DIR", help="a run directory, e.g. runs/tiny")
    s.add_argument("--prompt", required=True, help="the text to continue")
    s.add_argument("--max-new-tokens", type=int, default=64,
                   help="tokens (bytes) to generate (default: 64); prompt + these <= model.seq_len")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), e.g. 0.8")
    s.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    s.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus: keep the most likely tokens up to probability p (1 = off)")
    s.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    s.add_argument("--trace", action="store_true",
                   help="also print the experts each generated token went to per MoE layer")
    s = sub.add_parser("launch", help="run a command as several local JAX processes",
                       description="python -m toolkit launch --processes 2 -- train --preset "
                                   "tiny --mesh data=2,expert=4")
    s.add_argument("--processes", type=int, default=2, help="local processes (default: 2)")
    s.add_argument("--devices", type=int, default=8,
                   help="simulated CPU devices in all, split evenly (default: 8)")
    s.add_argument("rest", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                   help="the toolkit command each process runs, e.g. -- train --preset tiny")
    return p


def _positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give e.g. 8") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1, e.g. 8")
    return value


def _mesh_overrides(text):
    if not text:
        return []
    out = []
    for part in text.split(","):
        if "=" not in part:
            from toolkit.config import ConfigError
            raise ConfigError(f"--mesh {text!r}: write axis=size pairs, e.g. --mesh data=2,fsdp=4")
        axis, size = part.split("=", 1)
        out.append(f"parallel.{axis.strip()}={size.strip()}")
    return out


def _config(args):
    from toolkit.config import apply_overrides, config_file_overrides, preset
    hf = getattr(args, "hf", None) or getattr(args, "init_from_hf", None)
    if hf:
        from toolkit.interop import hf_config
    cfg = hf_config(hf) if hf else preset(args.preset)
    if args.config:
        cfg = apply_overrides(cfg, config_file_overrides(args.config, cfg))
    if args.mesh:
        import dataclasses

        from toolkit.config import ParallelConfig
        cfg = dataclasses.replace(cfg, parallel=ParallelConfig(data=1))
    recipe = [f"parallel.recipe={args.recipe}"] if args.recipe else []
    return apply_overrides(cfg, _mesh_overrides(args.mesh) + recipe + list(args.set))


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "launch":
        from toolkit.sharding.distributed import launch
        try:
            return launch(args.rest, processes=args.processes, devices=args.devices)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.command == "plan":
        return _plan(args)
    if args.command == "generate":
        return _generate(args)
    flags = os.environ.get("XLA_FLAGS", "")
    if args.command != "config" and "xla_force_host_platform_device_count" not in flags:
        # Only the CPU backend reads this; on GPU/TPU the accelerators are the devices.
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}"
    if args.command != "config":
        from toolkit.sharding.distributed import initialize_from_env
        try:
            initialize_from_env(auto=getattr(args, "distributed", False))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    from toolkit.config import ConfigError, describe
    try:
        cfg = _config(args)
        if args.command == "config":
            rows = describe(cfg)
            width = max(len(k) for k, _, _ in rows)
            for key, value, meaning in rows:
                print(f"{key:<{width}}  {value!r:<14}  {meaning}")
            return 0
        if args.command == "inspect" and args.hf:
            return _inspect_hf(args.hf, cfg)
        if args.command == "inspect":
            from toolkit.training.inspect import (
                communication_check,
                inspect_train_step,
                render_communication,
                render_inspection,
            )
            print(render_inspection(inspect_train_step(cfg)))
            print("\none block alone, bytes one device sends, compiled HLO vs formula:")
            print(render_communication(communication_check(cfg)))
            if args.costs:
                from toolkit.training.cost_check import cost_check, render_cost_check
                print("\nthe train step per device, compiled program vs cost model "
                      "(toolkit.analysis.costs):")
                print(render_cost_check(cost_check(cfg)))
            return 0
        from toolkit.training import NonFiniteError, Trainer
        out = args.out or os.path.join("runs", cfg.name)
        if os.path.exists(out) and not os.path.isdir(out):
            raise ConfigError(f"--out {out!r} is a file; the run directory must be a folder, e.g. "
                              f"--out runs/{cfg.name}")
        init = None
        if args.init_from_hf:
            from toolkit.interop import load_hf_params
            init = load_hf_params(args.init_from_hf, cfg)
        trainer = Trainer(cfg, out_dir=out, resume=args.resume, progress=not args.no_progress,
                          init_params=init)
        try:
            trainer.run()
        except KeyboardInterrupt:
            step = trainer.checkpointer.latest_step()
            print(f"\ninterrupted; the latest checkpoint is step {step} in {trainer.out_dir}/; "
                  f"continue with the same command plus --resume", file=sys.stderr)
            return 130
        except NonFiniteError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        if trainer.writes_files:
            print((trainer.out_dir / "report.md").read_text())
            print(f"run written to {trainer.out_dir}/")
        return 0
    except ConfigError as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2


def _inspect_hf(path, cfg) -> int:
    """`inspect --hf PATH`: the derived model and MoE config, the parameter count, and a
    check of every tensor's name and shape (no weights read, nothing compiled)."""
    from toolkit.analysis import count_params
    from toolkit.config import describe
    from toolkit.interop import check_hf
    check_hf(path, cfg)
    rows = [r for r in describe(cfg) if r[0].split(".")[0] in ("name", "model", "moe")]
    width = max(len(k) for k, _, _ in rows)
    print(f"{path}: the toolkit config derived from its config.json")
    for key, value, meaning in rows:
        print(f"{key:<{width}}  {value!r:<14}  {meaning}")
    total, active = count_params(cfg)
    print(f"parameters: {total:,} total, {active:,} active per token; every tensor present with "
          f"the expected shape")
    return 0


def _plan(args) -> int:
    """`python -m toolkit plan`: no JAX devices are used, only the config's shapes."""
    from toolkit.analysis.hardware import get_cluster
    from toolkit.analysis.planner import explain, parse_tokens, plan
    from toolkit.config import ConfigError, apply_overrides, preset
    try:
        cluster = get_cluster(args.cluster)
        cfg = apply_overrides(preset(args.preset), list(args.set))
        tokens = parse_tokens(args.global_batch) if args.global_batch else None
        fixed = {}
        for part in (args.fix or "").split(","):
            if part:
                if "=" not in part or not part.split("=", 1)[1].strip().isdigit():
                    raise ValueError(f"--fix {args.fix!r}: write axis=size pairs, e.g. --fix tensor=2")
                axis, size = part.split("=", 1)
                fixed[axis.strip()] = int(size)
        remat = {"both": (False, True), "on": (True,), "off": (False,)}[args.remat]
        plans = plan(cfg, cluster, tokens, fixed=fixed, remat=remat, top=args.top)
    except (ValueError, ConfigError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    batch = plans[0].cfg.train.batch_size
    print(f"{cfg.name} on {cluster.name} ({cluster.num_devices} x {cluster.device.name}), "
          f"{batch} sequences of {cfg.model.seq_len} tokens per step; plans that fit, fastest first:")
    print(explain(plans, cluster))
    return 0


def _generate(args) -> int:
    """`python -m toolkit generate`: the run's latest checkpoint on one device, the prompt as
    bytes after BOS, the continuation printed up to the first EOS."""
    import numpy as np

    from toolkit.config import ConfigError
    from toolkit.data import ByteTokenizer
    from toolkit.generation import check_sampling, generate, load_run, render_trace
    tok = ByteTokenizer()
    try:
        if not args.prompt:
            raise ConfigError("--prompt is empty; give text to continue, e.g. --prompt 'def '")
        check_sampling(args.temperature, args.top_k, args.top_p)
        model = load_run(args.run)
        out = generate(model, tok.encode(args.prompt, bos=True)[None], args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       seed=args.seed)
    except (ConfigError, ValueError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    new = out.new_tokens_bn[0]
    ends = np.flatnonzero(new == tok.eos_id)
    n = int(ends[0]) if ends.size else len(new)
    print(tok.decode(new[:n]))
    if args.trace:
        print(render_trace(out, model.cfg, [_token_label(int(i)) for i in new[:n]]))
    return 0


def _token_label(token: int) -> str:
    """A byte token as a short printable label: 'a', '\\n', 0xc3, <bos>."""
    if token >= 256:
        return {256: "<bos>", 257: "<eos>", 258: "<pad>"}.get(token, f"<{token}>")
    return repr(chr(token)) if token < 128 else f"0x{token:02x}"
