"""Bookkeeping the benchmarks share: the machine a figure was measured on, and their CSV files."""

from __future__ import annotations

import csv
import platform
from pathlib import Path

__all__ = ["device_name", "write_csv", "write_preset_csv"]


def device_name(device: str) -> str:
    """The GPU's name for "cuda", else the CPU's model name (from /proc/cpuinfo on Linux)."""
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def write_preset_csv(path, preset: str, new_rows: list[dict], fieldnames: list[str], command: str, header: str) -> None:
    """Write a benchmark's CSV: this preset's rows replace earlier ones; other presets' rows and commands stay.

    The file starts with `# header`, then one `# preset NAME: command` line per preset, then the rows.
    """
    path = Path(path)
    comments, old_rows = {}, []
    if path.exists():
        lines = path.read_text().splitlines()
        for line in lines:
            if line.startswith("# preset "):
                comments[line.split()[2].rstrip(":")] = line
        old_rows = [r for r in csv.DictReader(l for l in lines if not l.startswith("#")) if r["preset"] != preset]
    comments[preset] = f"# preset {preset}: {command}"
    write_csv(
        path,
        [f"# {header}", *(comments[name] for name in sorted(comments))],
        fieldnames,
        sorted(old_rows, key=lambda r: r["preset"]) + new_rows,
    )


def write_csv(path, comments: list[str], fieldnames, rows) -> None:
    """A benchmark CSV: comment lines ("# ..."), which say what made the figures, then the header and rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        f.writelines(line + "\n" for line in comments)
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
