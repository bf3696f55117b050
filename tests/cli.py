"""Run the real omni-train CLI (and omni-convert) in child processes and read what they wrote.

A fresh interpreter spends about 10 s of a tiny run on 2 cores importing torch, megatron-core (which
imports wandb itself), transformers and hydra before it reads its first override; the suite starts ~60 of
them. So the runs here start from a fork server: one interpreter per test session and thread count that
has imported those modules (and done nothing else: no config composed, no process group, no model, no
torch op, no thread of its own) and forks a child per run. The child is a new process as
``python -m MODULE ARGS`` (or ``python -c CODE ARGS``) would be: its own argv, environment, working
directory, stdout and stderr (nothing else of the server's open), exit status (minus the signal that
killed it, as Popen reports it), optionally its own session (process group), the signal handlers of a new
interpreter, freshly seeded random generators (Python's, numpy's, torch's), the thread count
OMP_NUM_THREADS asks for (one server per count: OpenMP and OpenBLAS read it as they load), and
process-wide state (megatron's, torch.distributed's) that starts empty; it runs the module's ``main()`` as
that command does. torchrun() starts the ranks torchrun would start, with the environment torchrun gives
them. torchrun itself, other modules, runs whose environment sets what an import may read, and tests of
how fast a new process fails start real interpreters (``fresh_interpreter=True``); OMNI_TRAIN_TEST_FORK=0
makes every run here one (and torchrun() the real torchrun).
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Union

REPO = Path(__file__).resolve().parents[1]

# The short text run that the parity, launcher, resume and SLURM tests compare against (one run per
# session: tests/conftest.py, text_run_6_steps and text_torchrun_6_steps).
TEXT_6_STEPS = ["trainer.max_steps=6", "checkpoint.save_every=100", "checkpoint.save_at_end=false"]


def _env(extra: Optional[Dict[str, str]] = None, threads: int = 2) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "RANK", "WORLD_SIZE",
                                                                     "LOCAL_RANK", "MASTER_"))}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", WANDB_SILENT="true")
    env.update(extra or {})
    return env


def start(args: List[str], stdout: Path, stderr: Path, env: Optional[Dict[str, str]] = None,
          threads: int = 2, cwd: Path = REPO, new_session: bool = False,
          fresh_interpreter: bool = False) -> Union[subprocess.Popen, "ForkedProcess"]:
    """`python ARGS` (ARGS: ["-m", module, ...] or ["-c", code, ...]) with `_env(env, threads)`, output to
    the two files, in its own session if `new_session`; a Popen, or a ForkedProcess with the same pid,
    args, poll(), wait() and kill(). From the fork server unless `fresh_interpreter` (or the environment asks for one)."""
    full_env = _env(env, threads)
    if fresh_interpreter or not _ForkServer.can_run(args, full_env):
        with open(stdout, "w") as out, open(stderr, "w") as err:
            return subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, env=full_env, stdout=out,
                                    stderr=err, start_new_session=new_session)
    return _ForkServer.get(full_env).start([str(a) for a in args], full_env, cwd, stdout, stderr, new_session)


def run(args: List[str], env: Optional[Dict[str, str]] = None, threads: int = 2, cwd: Path = REPO,
        timeout: float = 600, new_session: bool = False,
        fresh_interpreter: bool = False) -> subprocess.CompletedProcess:
    """`python ARGS` (["-m", module, ...] or ["-c", code, ...]) in `cwd` with `_env(env, threads)`; stdout
    and stderr captured as text, as subprocess.run(capture_output=True, text=True) returns them."""
    with tempfile.TemporaryDirectory(prefix="omni-train-run-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        proc = start(args, out, err, env=env, threads=threads, cwd=cwd, new_session=new_session,
                     fresh_interpreter=fresh_interpreter)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise subprocess.TimeoutExpired(proc.args, timeout, _read(out), _read(err))
        return subprocess.CompletedProcess(proc.args, code, _read(out), _read(err))


def run_module(module: str, args: List[str], env: Optional[Dict[str, str]] = None, cwd: Path = REPO,
               timeout: float = 600, fresh_interpreter: bool = False) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` (omni_train.train, omni_train.export.convert), as run() runs it."""
    return run(["-m", module, *args], env=env, cwd=cwd, timeout=timeout, fresh_interpreter=fresh_interpreter)


def omni_train(overrides: List[str], env: Optional[Dict[str, str]] = None, timeout: float = 600,
               check: bool = True, fresh_interpreter: bool = False) -> subprocess.CompletedProcess:
    """`python -m omni_train.train OVERRIDES` in one process."""
    proc = run_module("omni_train.train", overrides, env=env, timeout=timeout,
                      fresh_interpreter=fresh_interpreter)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(proc.args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def torchrun(nproc: int, overrides: List[str], timeout: float = 600,
             fresh_interpreter: bool = False) -> subprocess.CompletedProcess:
    """The processes `torchrun --nproc_per_node N -m omni_train.train OVERRIDES` starts: one CPU thread each,
    RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT set as torchrun sets them,
    from the fork server; when one fails the others are ended, as torchrun ends them. The output: each
    rank's, in rank order. torchrun itself (its agent holding the rendezvous store, fresh interpreters) with
    `fresh_interpreter` or OMNI_TRAIN_TEST_FORK=0. AssertionError naming the failed ranks."""
    port = _free_port()
    if fresh_interpreter or not _ForkServer.enabled():
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(port), "-m", "omni_train.train", *overrides]
        proc = subprocess.run(cmd, cwd=REPO, env=_env(threads=1), capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return proc
    world = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(nproc),
                 LOCAL_WORLD_SIZE=str(nproc))
    with tempfile.TemporaryDirectory(prefix="omni-train-ranks-") as tmp:
        logs = [(Path(tmp) / f"{rank}.out", Path(tmp) / f"{rank}.err") for rank in range(nproc)]
        procs = [start(["-m", "omni_train.train", *overrides], *logs[rank], threads=1,
                       env=dict(world, RANK=str(rank), LOCAL_RANK=str(rank))) for rank in range(nproc)]
        _join(procs, timeout, logs)
        out, err = ("".join(_read(log[i]) for log in logs) for i in (0, 1))
    args = ["torchrun", "--nproc_per_node", str(nproc), "-m", "omni_train.train", *overrides]
    return subprocess.CompletedProcess(args, 0, out, err)


def _join(procs, timeout: float, logs) -> None:
    """Wait for every process; once one fails (or `timeout` passes) end the others. AssertionError with
    each failed process's stderr (logs: its (stdout, stderr) files)."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    late = time.monotonic() > deadline
    for proc in procs:
        proc.kill()
    codes = [proc.wait() for proc in procs]
    failed = [f"rank {rank} exited with {code}:\n{_read(logs[rank][1])[-3000:]}"
              for rank, code in enumerate(codes) if code != 0]
    assert not failed, f"not finished within {timeout} s\n" * late + "\n".join(failed)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A test module's function in a child: the module imported as pytest imports it (its folder and tests/ on
# sys.path), then fn(rank, *args).
_SPAWNED = """
import importlib, json, sys
from pathlib import Path
path, name, tests, rank, args = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])
sys.path[:0] = [str(Path(path).parent), tests]
getattr(importlib.import_module(Path(path).stem), name)(rank, *args)
"""


def spawn(fn, args: List, nprocs: int = 2, timeout: float = 600) -> None:
    """torch.multiprocessing.spawn(fn, args, nprocs) for a function of a test module, with JSON arguments:
    fn(rank, *args) in one process per rank (as start() starts them), joined; as soon as a rank fails the
    others are killed, and AssertionError shows each failed rank's stderr."""
    with tempfile.TemporaryDirectory(prefix="omni-train-spawn-") as tmp:
        common = [fn.__code__.co_filename, fn.__name__, str(Path(__file__).parent)]
        logs = [(Path(tmp) / f"{rank}.out", Path(tmp) / f"{rank}.err") for rank in range(nprocs)]
        procs = [start(["-c", _SPAWNED, *common, str(rank), json.dumps(args)], *logs[rank])
                 for rank in range(nprocs)]
        _join(procs, timeout, logs)


def metrics(run_dir: Path) -> Dict[int, dict]:
    """metrics.jsonl by step (a resumed run appends to the same file)."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records}


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


# ---------------------------------------------------------------------------------------------------------
# The fork server: the client side (this process) and the server loop (serve, run in its own interpreter).

# What the server imports, in this order: omni_train.train first, as `python -m omni_train.train`, since it
# quiets library warnings before megatron is imported; then what a run imports before its first step
# (transformers' attention registry: compat's patches, applied by every run).
_PRELOAD = ("omni_train.train", "omni_train.loops.supervised", "omni_train.parallel.setup",
            "omni_train.export.convert", "transformers.modeling_utils")

# The entry points a child can run as `-m`: each ends in `if __name__ == "__main__": main()`.
_MODULES = ("omni_train.train", "omni_train.export.convert")

# Environment variables a run may set differently from the server: read when a run uses them (the ranks'
# when they join a process group, Transformer Engine's attention choice that megatron sets when it builds a
# model, in the tests' process too), never while the server imports (pytest sets PYTEST_CURRENT_TEST per
# test). A change to any other variable in the session starts the server again.
_PER_RUN_PREFIXES = ("WANDB_", "OMNI_TRAIN_", "PYTEST_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                     "MASTER_", "NVTE_")


def _import_env(env: Dict[str, str]) -> Dict[str, str]:
    """What of `env` the imports may read: all but the per-run variables (and PYTHONPATH naming the repo,
    which the server has on sys.path)."""
    return {k: v for k, v in env.items()
            if not k.startswith(_PER_RUN_PREFIXES) and not (k == "PYTHONPATH" and v == str(REPO))}


class ForkedProcess:
    """A child of the fork server, as much of subprocess.Popen as the tests use."""

    def __init__(self, server: "_ForkServer", pid: int, args: List[str]):
        self.server, self.pid, self.args, self.returncode = server, pid, args, None

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            self.returncode = self.server.exit_code(self.pid, timeout=0)
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        if self.returncode is None:
            self.returncode = self.server.exit_code(self.pid, timeout=timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class _ForkServer:
    """One per thread count (OMP_NUM_THREADS: torch's OpenMP and numpy's OpenBLAS read it when they load),
    started on first use with this session's environment; started again when that environment has changed
    (an in-process library set a variable) and it has no child running."""

    _servers: Dict[str, "_ForkServer"] = {}

    @staticmethod
    def enabled() -> bool:
        """False when the environment asks for fresh interpreters only (OMNI_TRAIN_TEST_FORK=0)."""
        return os.environ.get("OMNI_TRAIN_TEST_FORK", "1") != "0"

    @classmethod
    def can_run(cls, args: List[str], env: Dict[str, str]) -> bool:
        """Whether a server's child is the process `python ARGS` with `env` would be."""
        if not cls.enabled():
            return False
        if not (args[0] == "-c" or (args[0] == "-m" and args[1] in _MODULES)):
            return False
        threads = env["OMP_NUM_THREADS"]
        if _import_env(env) != _import_env(_env(threads=int(threads))):
            return False  # the run sets something the imports may read
        server = cls._servers.get(threads)
        return server is None or server.env == _import_env(env) or not server.running

    @classmethod
    def get(cls, env: Dict[str, str]) -> "_ForkServer":
        threads = env["OMP_NUM_THREADS"]
        server = cls._servers.get(threads)
        if server is None or server.proc.poll() is not None or server.env != _import_env(env):
            if server is not None:
                server.close()
            server = cls._servers[threads] = cls(_import_env(env))
        return server

    def __init__(self, env: Dict[str, str]):
        self.env = env
        self.log = tempfile.NamedTemporaryFile(prefix="omni-train-fork-server-", suffix=".log", delete=False)
        tests = str(Path(__file__).parent)
        code = f"import sys; sys.path.insert(0, {tests!r}); import cli; cli.serve({str(REPO)!r}, {tests!r})"
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        self.buffer, self.exits, self.running = b"", {}, set()
        self.lock = threading.Lock()
        atexit.register(self.close)
        if self._reply(600) != ["ready"]:
            raise RuntimeError(f"the test fork server did not start:\n{self._log_tail()}")

    def start(self, args: List[str], env: Dict[str, str], cwd: Path, stdout: Path, stderr: Path,
              new_session: bool) -> ForkedProcess:
        request = dict(args=args, env=env, cwd=str(cwd), stdout=str(stdout), stderr=str(stderr),
                       new_session=new_session)
        with self.lock:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
            while True:
                reply = self._reply(60)
                if reply[0] == "started":
                    self.running.add(int(reply[1]))
                    return ForkedProcess(self, int(reply[1]), [sys.executable, *args])
                self._exited(*reply[1:])

    def exit_code(self, pid: int, timeout: Optional[float]) -> Optional[int]:
        """The child's exit status (negative: the signal that ended it), or None if it is still running
        after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            try:
                while pid not in self.exits:
                    left = None if deadline is None else max(deadline - time.monotonic(), 0)
                    self._exited(*self._reply(left)[1:])
            except subprocess.TimeoutExpired:
                return None
            return self.exits.pop(pid)

    def _exited(self, pid: str, code: str) -> None:
        self.exits[int(pid)] = int(code)
        self.running.discard(int(pid))

    def _reply(self, timeout: Optional[float]) -> List[str]:
        """One reply line, split (its own buffer: a read may return two lines, and select sees only the
        pipe)."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            if not select.select([fd], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired("fork server", timeout)
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"the test fork server exited:\n{self._log_tail()}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode().split()

    def _log_tail(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    def close(self) -> None:
        if self.proc.stdin.closed:
            return
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        Path(self.log.name).unlink(missing_ok=True)


def serve(repo: str, tests: str) -> None:
    """The fork server's loop, in its own interpreter (`python -c`, so that a child's spawned helpers have
    no main module to run again). Per request line: fork a child and, once the child has its session and
    files (as Popen returns once its child has them), reply `started PID`; whenever a child exits:
    `exited PID STATUS` (STATUS: the exit code, or minus the signal that ended it). Ends when its stdin
    closes.

    The server stays as the imports leave it: it runs no torch op (torch's OpenMP pool, which a fork does
    not carry over, is never started here), starts no thread and installs no signal or atexit handler. The
    only threads the imports start are OpenBLAS's (numpy's and scipy's), which stop before a fork and
    restart on first use (OpenBLAS's pthread_atfork handlers)."""
    import importlib

    # what a new interpreter has, restored in each child
    handlers = {sig: signal.getsignal(sig) for sig in signal.valid_signals()
                if sig not in (signal.SIGKILL, signal.SIGSTOP) and signal.getsignal(sig) is not None}
    sys.path[:] = [repo] + [p for p in sys.path if p not in (tests, "")]  # as `python -m` in the repo has it
    for module in _PRELOAD:
        importlib.import_module(module)
    if threading.active_count() != 1:
        raise RuntimeError(f"importing {_PRELOAD} started threads: {threading.enumerate()}")
    reply, requests, buffer, running = sys.stdout.buffer, sys.stdin.fileno(), b"", 0
    reply.write(b"ready\n")
    reply.flush()
    while True:
        if select.select([requests], [], [], 0.05 if running else None)[0]:
            chunk = os.read(requests, 1 << 16)
            if not chunk:
                return
            buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            ready_read, ready_write = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(ready_read)
                # raises SystemExit: the child ends as that interpreter would
                _become(json.loads(line), handlers, ready_write)
            os.close(ready_write)
            os.read(ready_read, 1)  # end of file: the child closed its end (or exited)
            os.close(ready_read)
            running += 1
            reply.write(f"started {pid}\n".encode())
            reply.flush()
        while running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            running -= 1
            reply.write(f"exited {pid} {os.waitstatus_to_exitcode(status)}\n".encode())
            reply.flush()


def _become(request: dict, handlers: Dict[int, object], ready: int) -> None:
    """In the forked child: `python ARGS` with the request's files, directory, environment and session, the
    signal handlers of a new interpreter (`handlers`), and fresh seeds for Python's, numpy's and torch's
    global generators (a new interpreter seeds each from the OS; the server's are shared by every child).
    Closes `ready` once set up. An exception propagates out of the interpreter as it would there (traceback,
    status 1). The one thing shared with the server: the hash seed of str and bytes (PYTHONHASHSEED).
    atexit handlers: those the imports registered, as in a new interpreter that imported the same."""
    import builtins
    import importlib
    import random

    import numpy
    import torch

    if request["new_session"]:
        os.setsid()
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                            (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)  # the server's pipes and log are no longer open here
        os.close(opened)
    for sig, handler in handlers.items():
        if signal.getsignal(sig) != handler:
            signal.signal(sig, handler)
    random.seed()
    numpy.random.seed()
    torch.seed()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.close(ready)
    flag, target, *args = request["args"]
    sys.path.insert(0, os.getcwd() if flag == "-m" else "")  # what `python -m` / `python -c` put first
    if flag == "-m":
        module = importlib.import_module(target)
        sys.argv = [module.__file__, *args]
        module.main()
    else:  # -c: the code runs as __main__, as `python -c` runs it
        sys.argv = ["-c", *args]
        main = sys.modules["__main__"].__dict__
        main.clear()
        main.update(__name__="__main__", __builtins__=builtins, __doc__=None, __spec__=None, __loader__=None)
        exec(compile(target, "<string>", "exec"), main)
    raise SystemExit(0)
