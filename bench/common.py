"""Shared record format, device naming, output folders and result writing for every script under bench/.

Output folders: a run writes to ``bench/out/<device-name>/`` by default (untracked: .gitignore),
so trying a benchmark never touches the committed results. ``bench/results/<device-name>/`` holds
the results the README quotes; they are regenerated only on purpose, by passing that folder as
the output (``--out bench/results/<device-name>``), and each such folder has a ``PROVENANCE.md``
saying which machine and which command produced each of its files (:func:`write_provenance`).

One record = one measured point, a flat dict with the keys of :data:`RECORD_KEYS` (extra keys are
allowed and are written after them). ``status`` is ``"ok"``, ``"oom"``, ``"skipped: <why>"`` or
``"error: <type>: <message>"``; figures of a point that is not ok are None.
"""
from __future__ import annotations

import csv
import json
import math
import platform
import re
from pathlib import Path

import numpy as np

__all__ = [
    "RECORD_KEYS",
    "RESULTS_ROOT",
    "OUT_ROOT",
    "slugify",
    "device_name",
    "default_out_dir",
    "results_dir",
    "machine_info",
    "describe_machine",
    "write_provenance",
    "make_record",
    "summarize_times",
    "write_results",
    "read_results",
]

RECORD_KEYS = (
    "op", "impl", "device", "dtype", "pass", "B", "H", "D", "T", "chunk_size", "S",
    "median_ms", "p20_ms", "p80_ms", "tokens_per_s", "tflops", "peak_mem_mb", "status",
)
FIGURE_KEYS = ("median_ms", "p20_ms", "p80_ms", "tokens_per_s", "tflops", "peak_mem_mb")
RESULTS_ROOT = Path(__file__).resolve().parent / "results"  # committed: what the README quotes
OUT_ROOT = Path(__file__).resolve().parent / "out"  # untracked: where runs write by default


def slugify(text: str) -> str:
    """Lower-case, runs of anything but [a-z0-9] become one '-': 'NVIDIA H100 80GB' -> 'nvidia-h100-80gb'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: str = "cpu") -> str:
    """Slugified name of the machine a point ran on.

    ``device`` "cuda"/"cuda:N" -> ``torch.cuda.get_device_name()``; anything else -> "cpu-" + the
    processor model from /proc/cpuinfo. E.g. "nvidia-h100-80gb-hbm3", "cpu-amd-epyc".
    """
    if str(device).startswith("cuda"):
        import torch

        return slugify(torch.cuda.get_device_name(torch.device(device)))
    return slugify("cpu-" + _cpu_model())


def default_out_dir(name: str) -> Path:
    """bench/out/<name>/ (created): the untracked folder a run writes to unless told otherwise."""
    path = OUT_ROOT / name
    path.mkdir(parents=True, exist_ok=True)
    return path


results_dir = default_out_dir  # older name, kept for scripts that import it


def _meminfo_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info(device: str = "cpu") -> dict:
    """What the figures depend on: processor, cores, memory, GPU, OS and library versions."""
    import os

    import torch

    info = {"cpu": _cpu_model(), "logical_cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "memory_gib": _meminfo_gib(), "os": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if str(device).startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def describe_machine(info: dict) -> str:
    """One line: 'AMD EPYC ..., 2 usable of 2 logical CPUs, 24.0 GiB; Linux-...; torch ..., ...'."""
    parts = [f"{info.get('cpu')}, {info.get('usable_cpus')} usable of {info.get('logical_cpus')} "
             f"logical CPUs, {info.get('memory_gib')} GiB"]
    if info.get("gpu"):
        parts.append(f"GPU {info['gpu']} ({info.get('gpu_memory_gib')} GiB, CUDA {info.get('cuda')})")
    parts.append(str(info.get("os")))
    parts.append(f"Python {info.get('python')}, torch {info.get('torch')}, triton {info.get('triton')}")
    return "; ".join(parts)


def write_provenance(out_dir, key: str, *, command: str, files, date_utc: str, machine: str,
                     notes: str = "") -> Path:
    """Add or replace the section ``key`` of <out_dir>/PROVENANCE.md: which command, on which
    machine and when, wrote which files of the folder. Each script writing into a results folder
    owns one section (e.g. "python -m bench", "python -m bench.bench_memory_update"), so a rerun
    of one replaces only its own section."""
    path = Path(out_dir) / "PROVENANCE.md"
    begin, end = f"<!-- begin {key} -->", f"<!-- end {key} -->"
    names = ", ".join(f"`{Path(f).name}`" for f in files)
    section = (f"{begin}\n## {key}\n\n- files: {names}\n- command: `{command}`\n"
               f"- machine: {machine}\n- date (UTC): {date_utc}\n" + (f"- notes: {notes}\n" if notes else "")
               + f"{end}")
    text = path.read_text() if path.exists() else (
        "# Provenance of the files in this folder\n\nWhich command wrote each file, on which machine "
        "and when (written by the command itself; see bench/README.md).\n")
    if begin in text and end in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
    return path


def make_record(*, status: str = "ok", **fields) -> dict:
    """A record with every key of RECORD_KEYS (missing ones None) plus any extra fields given."""
    if not (status in ("ok", "oom") or status.startswith(("skipped: ", "error: "))):
        raise ValueError(f"status must be ok, oom, 'skipped: ...' or 'error: ...', got {status!r}")
    rec = {key: fields.pop(key, None) for key in RECORD_KEYS if key != "status"}
    rec["status"] = status
    rec.update(fields)
    if status != "ok":
        for key in FIGURE_KEYS:
            rec[key] = None
    return rec


def summarize_times(times_ms) -> dict:
    """median, 20th and 80th percentile (linear interpolation) of a list of times in ms."""
    arr = np.asarray(times_ms, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("summarize_times needs at least one time")
    p20, med, p80 = np.percentile(arr, [20, 50, 80])
    return {"median_ms": float(med), "p20_ms": float(p20), "p80_ms": float(p80)}


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_results(records, out_dir, stem: str = "results", meta: dict | None = None):
    """Write records as <out_dir>/<stem>.csv and <stem>.json; returns the two paths.

    The JSON is ``{"meta": {...}, "records": [...]}``; the CSV has the RECORD_KEYS columns first,
    then any extra keys in sorted order.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = [{k: _json_safe(v) for k, v in r.items()} for r in records]
    extra = sorted({k for r in records for k in r} - set(RECORD_KEYS))
    columns = list(RECORD_KEYS) + extra
    csv_path, json_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.json"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        for r in records:
            writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    with open(json_path, "w") as f:
        json.dump({"meta": meta or {}, "records": records}, f, indent=1)
    return csv_path, json_path


def read_results(json_path) -> tuple[dict, list[dict]]:
    """(meta, records) of a JSON file written by write_results."""
    with open(json_path) as f:
        data = json.load(f)
    return data.get("meta", {}), data["records"]
