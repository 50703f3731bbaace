"""The device list of the panel: automatic / CPU / GPU, saying what was found.

torch is not imported here (it may not be installed yet, and importing it takes seconds): if the GUI process
already imported torch its answer is used; otherwise NVIDIA GPUs are found with ``nvidia-smi`` and Apple GPUs
by platform. The worker makes the final choice for "auto" (and falls back to the CPU with a log message).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceChoice:
    id: str  # the worker's --device value: auto | cpu | cuda | mps
    label: str


@dataclass(frozen=True)
class GpuInfo:
    kind: str  # "cuda" | "mps"
    name: str
    memory_mb: int | None = None

    @property
    def text(self) -> str:
        memory = f", {self.memory_mb / 1024:.0f} GB" if self.memory_mb else ""
        return f"{self.name}{memory}"


def _torch_gpus() -> list[GpuInfo] | None:
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if torch.cuda.is_available():
            gpus = []
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                gpus.append(GpuInfo("cuda", props.name, int(props.total_memory // 2**20)))
            return gpus
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return [GpuInfo("mps", "Apple GPU (Metal)")]
        return []
    except Exception:  # a broken CUDA setup must not break the panel
        return None


def _nvidia_smi_gpus(timeout: float = 3.0) -> list[GpuInfo]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=timeout,
                             creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0) if os.name == "nt" else 0)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    gpus = []
    for line in out.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if parts and parts[0]:
            memory = int(float(parts[1])) if len(parts) > 1 and parts[1].replace(".", "", 1).isdigit() else None
            gpus.append(GpuInfo("cuda", parts[0], memory))
    return gpus


def find_gpus() -> list[GpuInfo]:
    """GPUs the worker could use, found without importing torch."""
    found = _torch_gpus()
    if found is not None:
        return found
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return [GpuInfo("mps", "Apple GPU (Metal)")]
    return _nvidia_smi_gpus()


def device_choices(gpus: list[GpuInfo] | None = None) -> list[DeviceChoice]:
    """auto, CPU, then one entry per kind of GPU found (the worker uses the first GPU of that kind)."""
    gpus = find_gpus() if gpus is None else gpus
    cores = os.cpu_count() or 1
    if gpus:
        auto = DeviceChoice("auto", f"Automatic (GPU: {gpus[0].text})")
    else:
        auto = DeviceChoice("auto", "Automatic (no GPU found: CPU)")
    choices = [auto, DeviceChoice("cpu", f"CPU ({cores} cores)")]
    for kind in ("cuda", "mps"):
        of_kind = [g for g in gpus if g.kind == kind]
        if of_kind:
            more = f" (+{len(of_kind) - 1} more)" if len(of_kind) > 1 else ""
            choices.append(DeviceChoice(kind, f"GPU: {of_kind[0].text}{more}"))
    return choices
