"""trainer.precision=auto: bf16-mixed where the device has native bf16, fp32 elsewhere (capabilities mocked)."""

import pytest
import torch

import llmtrain.training.hardware as hw


@pytest.fixture
def machine(monkeypatch):
    """Set what the machine reports: CPU flags, and a CUDA GPU with or without native bf16 (or none)."""

    def set_machine(flags=(), gpu=None, gpu_bf16=False):
        monkeypatch.delenv(hw.CPU_BF16_ENV, raising=False)  # the flags decide, whatever the suite was started with
        monkeypatch.setattr(hw, "cpu_flags", lambda: frozenset(flags))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu is not None)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: gpu_bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: gpu)

    return set_machine


@pytest.mark.parametrize("flags, expected", [
    ({"avx512f", "avx512_bf16"}, "bf16-mixed"),  # x86 with AVX512-BF16
    ({"avx512f", "amx_tile", "amx_bf16"}, "bf16-mixed"),  # x86 with AMX
    ({"fp", "asimd", "bf16"}, "bf16-mixed"),  # Arm with BF16 (Graviton 3, ...)
    ({"avx512f", "avx512_vnni"}, "32-true"),  # AVX512 without BF16 (Ice Lake)
    (set(), "32-true"),  # not Linux, or nothing known
])
def test_auto_on_a_cpu_follows_native_bf16(machine, flags, expected):
    machine(flags)
    precision, why = hw.choose_precision("auto", "auto")
    assert precision == expected and why.startswith("auto: this CPU has")
    assert hw.choose_precision("auto", "cpu")[0] == expected


def test_auto_on_a_gpu_follows_the_gpu(machine):
    machine(flags={"avx512_bf16"}, gpu="NVIDIA A100-SXM4-80GB", gpu_bf16=True)
    assert hw.choose_precision("auto", "auto") == ("bf16-mixed", "auto: NVIDIA A100-SXM4-80GB has native bf16")
    machine(flags={"avx512_bf16"}, gpu="Tesla V100-SXM2-16GB", gpu_bf16=False)
    assert hw.choose_precision("auto", "gpu")[0] == "32-true"  # not the CPU's bf16: the GPU trains
    assert hw.choose_precision("auto", "cpu")[0] == "bf16-mixed"  # accelerator=cpu on the same machine


def test_a_gpu_that_only_emulates_bf16_trains_in_fp32(machine, monkeypatch):
    """A V100 answers is_bf16_supported() True by emulation (the default); only the native answer counts."""
    machine(gpu="Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert hw.cuda_bf16() is False
    assert hw.choose_precision("auto", "gpu")[0] == "32-true"


def test_a_precision_that_is_set_is_kept(machine):
    machine(flags={"avx512_bf16"})
    assert hw.choose_precision("32-true", "auto") == ("32-true", "as set by trainer.precision")
    assert hw.choose_precision("bf16-mixed", "cpu")[0] == "bf16-mixed"


def test_cpu_flags_reads_this_machine():
    flags = hw.cpu_flags()
    assert isinstance(flags, frozenset)
    if hw.platform.system() == "Linux" and hw.platform.machine() == "x86_64":
        assert "sse2" in flags  # every x86-64 CPU has it: the parser found the flags line


@pytest.mark.parametrize("line, flag", [
    ("flags\t\t: fpu sse2 avx512f avx512_bf16", "avx512_bf16"),  # x86
    ("Features\t: fp asimd sve bf16", "bf16"),  # Arm
])
def test_cpu_flags_read_the_x86_and_the_arm_line(monkeypatch, line, flag):
    from io import StringIO

    monkeypatch.setattr(hw.platform, "system", lambda: "Linux")
    monkeypatch.setattr(hw, "open", lambda path: StringIO(f"processor\t: 0\nvendor_id\t: Some\n{line}\n"),
                        raising=False)
    hw.cpu_flags.cache_clear()
    try:
        assert flag in hw.cpu_flags() and hw.cpu_bf16()
    finally:
        hw.cpu_flags.cache_clear()  # the real machine's again for the next test


def test_native_bf16_is_the_cpus_on_the_cpu_and_never_on_mps(machine):
    machine(flags={"avx512_bf16"})
    assert hw.native_bf16(torch.device("cpu"))
    assert not hw.native_bf16(torch.device("mps"))
    machine(flags=set())
    assert not hw.native_bf16(torch.device("cpu"))


def test_as_many_devices_as_gpus_is_fine_and_one_more_is_refused(machine, monkeypatch):
    from omegaconf import OmegaConf

    machine(gpu="NVIDIA A100-SXM4-80GB", gpu_bf16=True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    trainer = lambda devices: OmegaConf.create(  # noqa: E731
        {"accelerator": "gpu", "devices": devices, "precision": "bf16-mixed"})
    assert hw.hardware_problems(trainer(2)) == []
    assert hw.hardware_problems(trainer(3)) == [
        "trainer.devices=3 but this machine has 2 GPUs: set trainer.devices=2 or fewer"]


@pytest.mark.parametrize("precision", [16, "16", "16-mixed", "16-true"])
def test_fp16_on_a_cpu_is_refused_however_it_is_written(machine, precision):
    from omegaconf import OmegaConf

    machine(gpu=None)
    trainer = OmegaConf.create({"accelerator": "cpu", "devices": 1, "precision": precision})
    [problem] = hw.hardware_problems(trainer)
    assert problem.startswith(f"trainer.precision={precision} needs a CUDA GPU")


def test_the_fused_optimizer_runs_on_cuda_and_cpu_but_not_mps(machine, monkeypatch):
    machine(gpu=None)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert hw.fused_optimizer("cpu") and hw.fused_optimizer("auto")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)  # a Mac: auto trains on MPS
    assert not hw.fused_optimizer("auto") and hw.fused_optimizer("cpu")
    machine(gpu="NVIDIA H100 80GB HBM3", gpu_bf16=True)
    assert hw.fused_optimizer("gpu") and hw.fused_optimizer("auto")


def test_a_run_on_this_cpu_builds_a_fused_adamw(tmp_path):
    from conftest import TINY, compose

    from llmtrain.run.train import build, fused_where_supported

    cfg = compose([*TINY, "optimizer=adamw"], tmp_path)
    opt = build(cfg.optimizer, **fused_where_supported(cfg))([torch.nn.Parameter(torch.zeros(2))])
    assert opt.defaults["fused"] is True
    cfg = compose([*TINY, "optimizer=adamw", "optimizer.fused=false"], tmp_path)
    assert build(cfg.optimizer, **fused_where_supported(cfg))([torch.nn.Parameter(torch.zeros(2))]).defaults[
        "fused"] is False


def test_is_sharded_reads_a_strategy_its_config_node_or_its_name():
    """One answer for the live strategy (outputs, the module), its config before anything is built (the memory
    pre-flight) and the names trainer.strategy takes."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
    from omegaconf import OmegaConf

    from llmtrain.training.hardware import is_sharded

    class MyFSDP(FSDPStrategy):
        pass

    assert is_sharded(FSDPStrategy()) and is_sharded(MyFSDP()) and not is_sharded(DDPStrategy())
    node = OmegaConf.create({"_target_": "lightning.pytorch.strategies.FSDPStrategy", "sharding_strategy": "FULL"})
    assert is_sharded(node) and not is_sharded(OmegaConf.create({"_target_": "x.DDPStrategy"}))
    assert is_sharded("fsdp") and is_sharded("fsdp_cpu_offload") and not is_sharded("ddp") and not is_sharded("auto")


def test_the_test_switch_makes_the_cpu_look_as_it_says(machine, monkeypatch):
    """LLMTRAIN_CPU_BF16=1 or 0 runs the suite as on a CPU with or without native bf16, whatever this one has."""
    machine({"avx512f"})
    monkeypatch.setenv(hw.CPU_BF16_ENV, "1")
    assert hw.choose_precision("auto", "cpu") == ("bf16-mixed", "auto: this CPU has native bf16 (LLMTRAIN_CPU_BF16=1)")
    machine({"avx512_bf16"})
    monkeypatch.setenv(hw.CPU_BF16_ENV, "0")
    assert hw.choose_precision("auto", "cpu")[0] == "32-true" and not hw.native_bf16(torch.device("cpu"))
    monkeypatch.setenv(hw.CPU_BF16_ENV, "maybe")  # anything else: the flags decide
    assert hw.cpu_bf16()
