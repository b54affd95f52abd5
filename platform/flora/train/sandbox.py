"""Run one untrusted program (a model's completion plus its tests) in a throw-away sandbox.

pass@k runs code nobody has read, so each program gets: a fresh temp directory as cwd, HOME and
TMPDIR (deleted afterwards), a minimal environment, resource limits (CPU seconds, address space,
file size, processes), its own session so a timeout kills the whole process group, and, where the
kernel allows unprivileged user namespaces, new network and PID namespaces
(``unshare --net --pid --fork --kill-child --map-root-user``): no network beyond a loopback that is
down, and every process the program forks dies with it even if it calls ``setsid``. Where unshare
does not work the program runs without network isolation (and a child that calls ``setsid``
escapes the group kill); :func:`network_isolation` and every :class:`SandboxResult` say so.
Not a security boundary against a determined attacker (same uid, same filesystem, ``/tmp`` is
shared); it is the isolation MultiPL-E's evaluation containers give model samples.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

Status = Literal["ok", "failed", "timeout", "error"]

OUTPUT_TAIL = 2048  # bytes of stdout / stderr kept in a result
ADDRESS_SPACE = 1 << 30  # RLIMIT_AS: 1 GiB of virtual memory
FILE_SIZE = 16 << 20  # RLIMIT_FSIZE: largest file (stdout included) a program may write
PROCESSES = 4096  # RLIMIT_NPROC (per user; the kernel does not apply it to root)
UNSHARE = ("--net", "--pid", "--fork", "--kill-child", "--map-root-user")
PID1 = ("/bin/sh", "-c", '"$@"; exit $?', "sh")
ENV_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class Toolchain:
    """How to run a source file of one language: interpreter, its flags, the file extension."""

    interpreter: str
    extension: str
    flags: tuple[str, ...] = ()

    def resolve(self) -> str | None:
        """The interpreter's path, or None when it is not installed here."""
        return shutil.which(self.interpreter)


TOOLCHAINS: dict[str, Toolchain] = {
    "python": Toolchain(sys.executable, "py", ("-I", "-S")),  # isolated, stdlib only
    "perl": Toolchain("perl", "pl"),
    "tcl": Toolchain("tclsh", "tcl"),
    "javascript": Toolchain("node", "js"),
    "php": Toolchain("php", "php"),
    "bash": Toolchain("bash", "sh"),
}


@dataclass(frozen=True)
class SandboxResult:
    """How one program ended. ``ok`` = exit 0; ``failed`` = nonzero exit or killed by a signal;
    ``timeout`` = wall-clock or CPU limit; ``error`` = it could not be started."""

    status: Status
    returncode: int | None
    stdout: str  # last OUTPUT_TAIL bytes
    stderr: str
    seconds: float
    isolation: str  # network_isolation() at the time of the run

    @property
    def passed(self) -> bool:
        return self.status == "ok"


def available_languages() -> list[str]:
    """The languages in :data:`TOOLCHAINS` whose interpreter is installed here."""
    return [lang for lang, tool in TOOLCHAINS.items() if tool.resolve() is not None]


@functools.cache
def network_isolation() -> str:
    """``"netns: unshare …"`` when programs run in fresh network + PID namespaces, else
    ``"none: <why>"``; probed once per process (one short ``unshare … true``)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return "none: util-linux unshare is not installed"
    try:
        probe = subprocess.run(
            [unshare, *UNSHARE, "true"], capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"none: unshare probe failed ({e})"
    if probe.returncode != 0:
        why = probe.stderr.decode(errors="replace").strip().splitlines()
        return f"none: unshare {' '.join(UNSHARE)} failed ({why[-1] if why else probe.returncode})"
    return f"netns: unshare {' '.join(UNSHARE)}"


def run_program(source: str, language: str, *, timeout_s: float = 10.0) -> SandboxResult:
    """Write ``source`` to a fresh directory, run it with ``language``'s interpreter under the
    sandbox's limits, and remove the directory; never raises for a misbehaving program."""
    if language not in TOOLCHAINS:
        raise ValueError(f"unknown language {language!r}; choose from {sorted(TOOLCHAINS)}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    isolation = network_isolation()
    tool = TOOLCHAINS[language]
    interpreter = tool.resolve()
    if interpreter is None:
        return SandboxResult("error", None, "", f"{tool.interpreter} not found", 0.0, isolation)
    root = Path(tempfile.mkdtemp(prefix="flora-sandbox-"))
    try:
        work = root / "work"
        work.mkdir()
        program = work / f"program.{tool.extension}"
        program.write_text(source, encoding="utf-8")
        argv = [interpreter, *tool.flags, program.name]
        if isolation.startswith("netns"):
            # sh stays PID 1 of the namespace (it does not exec: "; exit $?"), because PID 1
            # ignores signals it sends itself and the program's own kill/abort must still count.
            argv = [shutil.which("unshare") or "unshare", *UNSHARE, *PID1, *argv]
        return _run(argv, work, root, timeout_s, isolation)
    finally:
        _remove(root)


def _run(
    argv: list[str], work: Path, root: Path, timeout_s: float, isolation: str
) -> SandboxResult:
    env = {"PATH": ENV_PATH, "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8"}
    started = time.perf_counter()
    # Output goes to files, not pipes: RLIMIT_FSIZE bounds them and nobody must drain them.
    with open(root / "stdout", "w+b") as out, open(root / "stderr", "w+b") as err:
        try:
            proc = subprocess.Popen(
                argv,
                cwd=work,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                preexec_fn=_limits(timeout_s),
            )
        except (OSError, subprocess.SubprocessError) as e:  # the latter: preexec_fn failed
            return SandboxResult("error", None, "", str(e), 0.0, isolation)
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(proc.pid)  # also reaps children left running after a normal exit
            proc.wait()
        seconds = time.perf_counter() - started
        code = proc.returncode
        if timed_out or code in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
            status: Status = "timeout"
        else:
            status = "ok" if code == 0 else "failed"
        return SandboxResult(status, code, _tail(out), _tail(err), seconds, isolation)


def _limits(timeout_s: float) -> Callable[[], None]:
    """The child-side hook: only ``setrlimit`` calls on values computed before the fork, so it
    takes no locks and imports nothing (``preexec_fn`` runs between fork and exec)."""
    cpu = int(timeout_s) + 1
    wanted = [
        (resource.RLIMIT_CPU, cpu, cpu + 1),  # soft: SIGXCPU (a timeout), hard: SIGKILL
        (resource.RLIMIT_AS, ADDRESS_SPACE, ADDRESS_SPACE),
        (resource.RLIMIT_FSIZE, FILE_SIZE, FILE_SIZE),
        (resource.RLIMIT_CORE, 0, 0),
    ]
    if os.geteuid() != 0:  # root is exempt from RLIMIT_NPROC; elsewhere it caps fork bombs
        wanted.append((resource.RLIMIT_NPROC, PROCESSES, PROCESSES))
    limits = []
    for which, soft, hard in wanted:  # never above a hard limit we already run under
        _, current = resource.getrlimit(which)
        if current != resource.RLIM_INFINITY:
            soft, hard = min(soft, current), min(hard, current)
        limits.append((which, (soft, hard)))

    def apply() -> None:
        for which, value in limits:
            resource.setrlimit(which, value)

    return apply


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _tail(f: BinaryIO) -> str:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - OUTPUT_TAIL))
    return f.read().decode("utf-8", errors="replace")


def _remove(root: Path) -> None:
    """Delete the sandbox dir even if the program made parts of it unreadable."""

    def retry(func: Callable[..., object], path: str, _exc: object) -> None:
        os.chmod(os.path.dirname(path), 0o700)
        if os.path.isdir(path):
            os.chmod(path, 0o700)
        func(path)

    shutil.rmtree(root, onerror=retry)
