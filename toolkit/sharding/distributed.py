"""Several processes, one program: `jax.distributed`, and a launcher to try it on one machine.

With `jax.distributed.initialize(...)` called first in every process, `jax.devices()` lists
the devices of all processes and the same mesh, jit and shard_map code runs on them; each
process feeds and reads only its own (addressable) devices. The toolkit adds nothing to
that engine but a way to start N local processes, each with a share of simulated CPU
devices, so multi-process code can be tried on a laptop:

    python -m toolkit launch --processes 2 -- train --preset tiny --mesh data=2,expert=4

The launcher picks a free port on 127.0.0.1 and starts `python -m toolkit <the rest>` N
times, telling each child its part through these environment variables, which
`initialize_from_env()` (called by the CLI before any other JAX use) reads:

    TOOLKIT_COORDINATOR     host:port of process 0's coordinator, e.g. 127.0.0.1:51234
    TOOLKIT_NUM_PROCESSES   how many processes take part, e.g. 2
    TOOLKIT_PROCESS_ID      this process's index, 0 .. TOOLKIT_NUM_PROCESSES - 1

and `XLA_FLAGS=--xla_force_host_platform_device_count=<devices / N>` (with
`JAX_PLATFORMS=cpu` unless a platform is set already). On a cluster nothing needs
launching: SLURM (`srun`), Open MPI and Cloud TPU pods tell each process its part, and
`jax.distributed.initialize()` with no arguments detects it; `train --distributed` calls
exactly that (`initialize_from_env(auto=True)`).

Process 0 inherits the launcher's terminal (progress bar, report); the others' output is
streamed to stderr with a `[process i]` prefix. When one child fails, the launcher stops
the others (a collective waiting for a dead peer would otherwise hang) and returns that
child's exit code.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

COORDINATOR = "TOOLKIT_COORDINATOR"
NUM_PROCESSES = "TOOLKIT_NUM_PROCESSES"
PROCESS_ID = "TOOLKIT_PROCESS_ID"
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def initialize_from_env(environ=None, *, auto: bool = False) -> bool:
    """Join the multi-process program described by the `TOOLKIT_*` variables, if any.

    Call before any other JAX use. With the variables set (the localhost launcher sets
    them) this calls `jax.distributed.initialize(coordinator, num_processes, process_id)`;
    otherwise, with `auto=True`, `jax.distributed.initialize()`, which reads SLURM, Open MPI
    or Cloud TPU settings. Returns whether it initialized.
    """
    env = os.environ if environ is None else environ
    given = [k for k in (COORDINATOR, NUM_PROCESSES, PROCESS_ID) if env.get(k)]
    if not given and not auto:
        return False
    import jax
    if not given:
        jax.distributed.initialize()
        return True
    if len(given) != 3:
        missing = sorted({COORDINATOR, NUM_PROCESSES, PROCESS_ID} - set(given))
        raise ValueError(f"{', '.join(given)} set but {', '.join(missing)} not; set all three "
                         f"(e.g. {COORDINATOR}=127.0.0.1:51234 {NUM_PROCESSES}=2 {PROCESS_ID}=0) "
                         f"or none")
    try:
        count, index = int(env[NUM_PROCESSES]), int(env[PROCESS_ID])
    except ValueError:
        raise ValueError(f"{NUM_PROCESSES}={env[NUM_PROCESSES]!r} and {PROCESS_ID}="
                         f"{env[PROCESS_ID]!r} must be integers, e.g. 2 and 0") from None
    if not 0 <= index < count:
        raise ValueError(f"{PROCESS_ID}={index} is outside 0..{count - 1} for "
                         f"{NUM_PROCESSES}={count}")
    jax.distributed.initialize(env[COORDINATOR], num_processes=count, process_id=index)
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def child_env(base: dict, *, coordinator: str, num_processes: int, process_id: int,
              local_devices: int) -> dict:
    """`base` plus what child `process_id` of `num_processes` needs (see the module doc)."""
    env = dict(base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT_FLAG)]
    env["XLA_FLAGS"] = " ".join([*flags, f"{_DEVICE_COUNT_FLAG}={local_devices}"])
    if not env.get("JAX_PLATFORMS"):
        env["JAX_PLATFORMS"] = "cpu"
    env.update({COORDINATOR: coordinator, NUM_PROCESSES: str(num_processes),
                PROCESS_ID: str(process_id)})
    return env


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode   # killed by signal s -> 128 + s


def _stream(proc, index: int, out) -> None:
    for line in proc.stdout:
        out.write(f"[process {index}] {line}")
        out.flush()


def _stop(procs, grace_s: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(args, *, processes: int, devices: int = 8, environ=None, out=None,
           grace_s: float = 5.0, program=None) -> int:
    """Run `python -m toolkit *args` as `processes` local JAX processes; return the exit code.

    Each child gets `devices // processes` simulated CPU devices and `environ` (default:
    this process's environment) plus the variables above. Returns 0 when all exit with 0;
    otherwise the code of the first child that failed, after stopping the others (SIGTERM,
    then SIGKILL after `grace_s` seconds). Output of processes 1.. goes to `out` (default
    stderr) line by line with a `[process i]` prefix. `program` replaces
    `[sys.executable, "-m", "toolkit"]`, the command that `args` follow.
    """
    if processes < 1:
        raise ValueError(f"--processes {processes}: need at least 1, e.g. --processes 2")
    if devices < processes or devices % processes:
        raise ValueError(f"--devices {devices} does not split evenly over --processes "
                         f"{processes}; use a multiple of {processes}, e.g. "
                         f"--devices {processes * max(devices // processes, 1)}")
    args = list(args)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        raise ValueError("nothing to launch; give a command after --, e.g. "
                         "launch --processes 2 -- train --preset tiny")
    out = sys.stderr if out is None else out
    base = dict(os.environ if environ is None else environ)
    coordinator = f"127.0.0.1:{free_port()}"
    procs, readers = [], []
    try:
        for i in range(processes):
            env = child_env(base, coordinator=coordinator, num_processes=processes,
                            process_id=i, local_devices=devices // processes)
            piped = i > 0
            procs.append(subprocess.Popen(
                [*(program or (sys.executable, "-m", "toolkit")), *args], env=env, text=True,
                stdout=subprocess.PIPE if piped else None,
                stderr=subprocess.STDOUT if piped else None))
            if piped:
                readers.append(threading.Thread(target=_stream, args=(procs[-1], i, out),
                                                daemon=True))
                readers[-1].start()
        code = 0
        while code == 0 and any(p.poll() is None for p in procs):
            time.sleep(0.05)
            failed = [(i, p.returncode) for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed:
                i, code = failed[0][0], _exit_code(failed[0][1])
                out.write(f"launch: process {i} exited with code {code}; stopping the others\n")
        if code == 0:
            failed = [p.returncode for p in procs if p.returncode != 0]
            code = _exit_code(failed[0]) if failed else 0
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    finally:
        _stop(procs, grace_s)
        for r in readers:
            r.join(timeout=grace_s)
    return code
