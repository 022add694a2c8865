"""Which device a command runs on: the one place that turns --device into a torch.device; and its name."""
import platform

import torch


def resolve_device(name) -> torch.device:
    """auto: CUDA where torch sees a GPU, else the CPU; cpu or cuda as asked, or one ValueError saying why not."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """What a result should name: the GPU's name, or the CPU's (see cpu_model)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's name from /proc/cpuinfo, with its family and model numbers (a VM may show only "AMD EPYC",
    and the numbers tell Zen 3 from Zen 4); elsewhere what platform knows."""
    fields = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if not line.strip():
                    break  # the first processor's block is enough
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name
