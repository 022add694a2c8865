"""Which device a command runs on: the one place that turns --device into a torch.device."""
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
