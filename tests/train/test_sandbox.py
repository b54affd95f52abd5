"""The sandbox that runs model samples: exit codes, timeouts that leave nothing running, no
network, a memory ceiling, nothing left on disk, and only a minimal environment."""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

import pytest

from flora.train.sandbox import (
    OUTPUT_TAIL,
    available_languages,
    network_isolation,
    run_program,
)

NETNS = network_isolation().startswith("netns")
needs_netns = pytest.mark.skipif(not NETNS, reason=f"no network namespace: {network_isolation()}")

# Host-side process group, read from /proc/self/stat (fields after the ")": state ppid pgrp);
# /proc is the host's mount, so the number is the host's even inside a PID namespace.
PGRP = "print(open('/proc/self/stat').read().rsplit(')', 1)[1].split()[2], flush=True)\n"


def test_without_unshare_it_falls_back_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # no unshare to be found
    network_isolation.cache_clear()
    try:
        assert network_isolation() == "none: util-linux unshare is not installed"
        result = run_program("import sys\nsys.exit(0)\n", "python")  # sys.executable: absolute
        assert result.status == "ok" and result.isolation.startswith("none")
    finally:
        monkeypatch.undo()
        network_isolation.cache_clear()
    assert network_isolation().startswith("netns") == NETNS


def test_exit_status_decides_ok_and_failed() -> None:
    ok = run_program("import sys\nassert 1 + 1 == 2\nprint('hi')\nsys.exit(0)\n", "python")
    assert (ok.status, ok.returncode, ok.stdout, ok.passed) == ("ok", 0, "hi\n", True)
    failed = run_program("assert 1 + 1 == 3, 'wrong'\n", "python")
    assert failed.status == "failed" and failed.returncode != 0 and not failed.passed
    assert "AssertionError: wrong" in failed.stderr
    assert failed.isolation == network_isolation()


def test_a_program_killing_itself_fails() -> None:
    # Under a PID namespace the program must not be PID 1, which ignores its own signals.
    assert (
        run_program("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n", "python").status
        == "failed"
    )


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    # A grandchild that leaves the group (setsid); only the PID namespace can catch it.
    escapee = (
        "if os.fork() == 0:\n    os.setsid()\n"
        f"    os.execv('/bin/sh', ['/bin/sh', '-c', 'while :; do :; done; : {marker}'])\n"
        if NETNS
        else ""
    )
    program = (
        "import os, subprocess\n"
        + PGRP
        + f"subprocess.Popen(['/bin/sh', '-c', 'sleep 300; : {marker}'])\n"
        + escapee
        + "while True: pass\n"
    )
    started = time.perf_counter()
    result = run_program(program, "python", timeout_s=1.0)
    assert result.status == "timeout"
    assert time.perf_counter() - started < 1.0 + 3.0
    pgid = int(result.stdout.split()[0])
    deadline = time.monotonic() + 3.0  # killed processes linger as zombies until reaped
    while (_survivors(marker, pgid) or _group_exists(pgid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _survivors(marker, pgid)
    assert not _group_exists(pgid)


def test_children_left_running_after_a_normal_exit_are_killed() -> None:
    marker = uuid.uuid4().hex
    program = (
        f"import subprocess\n{PGRP}subprocess.Popen(['/bin/sh', '-c', 'sleep 300; : {marker}'])\n"
    )
    result = run_program(program, "python")
    assert result.status == "ok"
    assert not _survivors(marker, int(result.stdout.split()[0]))


@needs_netns
def test_the_network_is_unreachable() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        program = (
            "import socket, sys\n"
            f"socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "sys.exit(0)\n"
        )
        result = run_program(program, "python", timeout_s=5.0)
    assert result.status == "failed"
    assert "OSError" in result.stderr or "Error" in result.stderr


def test_allocating_4_gb_fails() -> None:
    result = run_program("x = bytearray(4 << 30)\nprint(len(x))\n", "python")
    assert result.status == "failed"
    assert "MemoryError" in result.stderr


def test_the_program_leaves_no_files_behind() -> None:
    program = (
        "import os, tempfile\n"
        "print(os.getcwd())\n"
        "open('here.txt', 'w').write('x')\n"
        "open(os.path.join(os.environ['HOME'], 'home.txt'), 'w').write('x')\n"
        "tempfile.mkstemp()\n"
        "os.makedirs('a/b')\n"
        "os.chmod('a', 0)\n"
    )
    result = run_program(program, "python")
    assert result.status == "ok", result.stderr
    workdir = Path(result.stdout.strip())
    assert workdir.name == "work" and not workdir.exists() and not workdir.parent.exists()


def test_only_a_minimal_environment_reaches_the_program(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLORA_TEST_SECRET", "hunter2")
    program = "import os\nfor k, v in sorted(os.environ.items()): print(f'{k}={v}')\n"
    env = dict(line.split("=", 1) for line in run_program(program, "python").stdout.splitlines())
    assert "FLORA_TEST_SECRET" not in env
    assert {"PATH", "HOME", "LANG"} <= set(env)
    assert env["HOME"] == env["TMPDIR"] and env["HOME"].endswith("/work")


def test_output_is_capped_to_a_tail() -> None:
    result = run_program("print('x' * 100_000)\nprint('end')\n", "python")
    assert result.status == "ok" and len(result.stdout) <= OUTPUT_TAIL
    assert result.stdout.endswith("end\n")


def test_unknown_language_and_bad_timeout_are_errors() -> None:
    with pytest.raises(ValueError, match="unknown language 'cobol'"):
        run_program("", "cobol")
    with pytest.raises(ValueError, match="timeout_s"):
        run_program("", "python", timeout_s=0)


@pytest.mark.parametrize(
    ("language", "good", "bad"),
    [
        ("perl", "print 'hi';\nexit 0;\n", "die 'no';\n"),
        ("tcl", "puts hi\n", "error no\n"),
        ("javascript", "console.log('hi');\n", "throw new Error('no');\n"),
        ("bash", "echo hi\n", "exit 3\n"),
        ("php", "<?php echo 'hi';\n", "<?php exit(1);\n"),
    ],
)
def test_each_installed_language_runs(language: str, good: str, bad: str) -> None:
    if language not in available_languages():
        pytest.skip(f"{language}: interpreter not installed on this machine")
    assert run_program(good, language).status == "ok"
    assert run_program(bad, language).status == "failed"


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _survivors(marker: str, pgid: int) -> list[int]:
    """Processes still alive in ``pgid`` or whose command line carries ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":  # a zombie is dead; its parent reaps it
            continue
        if marker.encode() in cmdline or int(fields[2]) == pgid:
            found.append(int(entry.name))
    return found
