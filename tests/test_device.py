"""--device and the machine's name in a run's record."""
import platform

import pytest
import torch

from fastmnist.device import cpu_model, device_name, resolve_device


def test_auto_is_cuda_exactly_where_torch_sees_a_gpu():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_cuda_without_a_gpu_is_one_value_error_with_the_remedy(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="torch sees no CUDA GPU; use --device cpu or auto"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("name", ["gpu", "CPU", "", None, "cuda:0"])
def test_other_names_are_refused(name):
    with pytest.raises(ValueError, match="device must be auto, cpu or cuda"):
        resolve_device(name)


def test_cpu_model_names_the_first_processor_with_family_and_model(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n"
                    "model name\t: AMD EPYC Processor\n\nprocessor\t: 1\nmodel name\t: Something Else\n")
    assert cpu_model(str(info)) == "AMD EPYC Processor (family 25, model 1)"


def test_cpu_model_without_cpuinfo_falls_back_to_platform(tmp_path):
    assert cpu_model(str(tmp_path / "missing")) == (platform.processor() or platform.machine())


def test_device_name_of_the_cpu_is_its_model():
    assert device_name(torch.device("cpu")) == cpu_model()
    assert device_name(torch.device("cpu"))  # never empty: a result must name its machine
