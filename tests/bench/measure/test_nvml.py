"""NVML logic through a stand-in library object: CI has no NVIDIA driver, so the real pynvml can
only show that a missing driver is reported, never crashes and never reads as 0."""

import os
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from bench.env import capture
from bench.measure import Workload, make_instrument, measure, run_pass
from bench.measure.instrument import MEMORY, TIMED
from bench.measure.nvml import NvmlMemory, energy_delta_mj, load_nvml, match_handle
from models import ModelStats

CUDA = torch.device("cuda", 0)
GiB = 2**30


class FakeNVMLError(Exception):
    pass


class FakeNvml:
    """The pynvml functions the instrument calls, over one device whose readings tests set."""

    NVMLError = FakeNVMLError
    nvmlMemory_v2 = 0x02000028
    NVML_CLOCK_SM, NVML_CLOCK_MEM = 1, 2

    def __init__(self, *, init_error=None, v2=True, energy_supported=True,
                 uuid="GPU-8F2A0000-1111-2222-3333-444455556666", bus_id="00000000:3B:00.0"):
        self.init_error, self.v2, self.energy_supported = init_error, v2, energy_supported
        self.uuid, self.bus_id = uuid, bus_id
        self.processes = []  # SimpleNamespace(pid, usedGpuMemory)
        self.used_v1 = self.used_v2 = 0
        self.energy_mj = 0
        self.calls = []

    def nvmlInit(self):
        if self.init_error:
            raise FakeNVMLError(self.init_error)

    def nvmlSystemGetDriverVersion(self):
        return "550.54.15"

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("handle", i)

    def nvmlDeviceGetUUID(self, handle):
        return self.uuid if handle[1] == 1 else "GPU-00000000-0000-0000-0000-000000000000"

    def nvmlDeviceGetPciInfo(self, handle):
        return SimpleNamespace(busId=(self.bus_id if handle[1] == 1 else "00000000:01:00.0").encode())

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        assert handle == ("handle", 1), "talked to the wrong GPU"
        if version is not None:
            self.calls.append("v2")
            if not self.v2:
                raise FakeNVMLError("Function Not Found")
            return SimpleNamespace(used=self.used_v2)
        self.calls.append("v1")
        return SimpleNamespace(used=self.used_v1)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return list(self.processes)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if not self.energy_supported:
            raise FakeNVMLError("Not Supported")
        return self.energy_mj

    def nvmlDeviceGetPowerUsage(self, handle):
        return 250_000  # mW

    def nvmlDeviceGetClockInfo(self, handle, kind):
        return 1980 if kind == self.NVML_CLOCK_SM else 2619


def identity(index):  # what torch.cuda would say about the device: the fake's second GPU
    return "8f2a0000-1111-2222-3333-444455556666", "0000:3b:00.0"


def nvml(lib, **kw) -> NvmlMemory:
    return NvmlMemory(library=lib, identity=identity, **kw)


class StubBench:
    """What the NVML instrument and run_pass use of a bench; steps sleep instead of computing."""

    def __init__(self, lib=None, on_step=None, seconds=0.002):
        self.device, self.fake, self.steps, self.tokens_per_step = torch.device("cpu"), False, 0, 100
        self.lib, self.on_step, self.seconds = lib, on_step, seconds

    def step(self):
        time.sleep(self.seconds)
        if self.on_step:
            self.on_step(self)
        self.steps += 1
        return ModelStats()

    def warm_up(self, steps=1):
        for _ in range(steps):
            self.step()


def test_missing_package_is_reported(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    lib, why = load_nvml()
    assert lib is None and "nvidia-ml-py is not installed" in why
    ok, why = NvmlMemory(identity=identity).available(CUDA)
    assert not ok and "nvidia-ml-py is not installed" in why


def test_the_real_library_without_a_driver_is_unavailable_with_its_error_text():
    pytest.importorskip("pynvml")
    lib, why = load_nvml()
    if lib is not None:
        pytest.skip("an NVIDIA driver is present")
    ok, reason = NvmlMemory(identity=identity).available(CUDA)
    assert not ok and reason == why and "NVML" in reason
    env = capture("cpu")
    assert env["nvml"] == {"available": False, "reason": why}


def test_nvml_error_at_init_is_a_reason_not_a_crash():
    ok, why = nvml(FakeNvml(init_error="Driver Not Loaded")).available(CUDA)
    assert not ok and "Driver Not Loaded" in why


def test_cpu_workloads_leave_nvml_out_and_their_columns_empty(toys):
    row = measure(Workload(model="toy-stack", phase="eval"), [nvml(FakeNvml()), "tracked"])
    assert row["nvml_process_bytes"] is None and row["nvml_device_bytes"] is None
    assert row["energy_j_per_token"] is None
    assert "nvml unavailable: the workload runs on cpu" in row["notes"]


def test_handle_matched_by_uuid_then_pci_bus_id():
    lib = FakeNvml()
    assert match_handle(lib, identity(0)) == (("handle", 1), "uuid")
    assert match_handle(lib, (None, "0000:3B:00.0")) == (("handle", 1), "pci_bus_id")
    assert match_handle(lib, ("no-such-uuid", "0000:3b:00.0")) == (("handle", 1), "pci_bus_id")
    with pytest.raises(LookupError, match="no NVML device"):
        match_handle(lib, ("no-such-uuid", "0000:99:00.0"))
    ok, why = NvmlMemory(library=lib, identity=lambda i: ("x", None)).available(CUDA)
    assert not ok and "no NVML handle for cuda:0" in why


class GuardedNvml(FakeNvml):
    """Device 0 belongs to someone else: NVML lists it, then refuses to open it (a container's
    cgroup), or opens it and refuses to read its identity."""

    def __init__(self, refuse, **kw):
        super().__init__(**kw)
        self.refuse = refuse

    def nvmlDeviceGetHandleByIndex(self, i):
        if i == 0 and self.refuse == "open":
            raise FakeNVMLError("Insufficient Permissions")
        return super().nvmlDeviceGetHandleByIndex(i)

    def nvmlDeviceGetUUID(self, handle):
        if handle[1] == 0 and self.refuse == "read":
            raise FakeNVMLError("Insufficient Permissions")
        return super().nvmlDeviceGetUUID(handle)


@pytest.mark.parametrize("refuse", ["open", "read"])
def test_a_device_nvml_cannot_open_does_not_hide_ours(refuse):
    lib = GuardedNvml(refuse)
    assert match_handle(lib, identity(0)) == (("handle", 1), "uuid")
    assert match_handle(lib, (None, "0000:3b:00.0")) == (("handle", 1), "pci_bus_id")
    with pytest.raises(LookupError, match="no NVML device") as err:
        match_handle(lib, ("no-such-uuid", "0000:99:00.0"))
    assert ("could not open: 0: Insufficient Permissions" in str(err.value)) == (refuse == "open")


def _memory_pass(lib, inst, *, baseline, peak):
    """Baseline readings before the model, then a pass whose step raises usage to `peak`."""
    lib.used_v1, lib.used_v2, procs = baseline
    lib.processes = procs
    assert inst.available(CUDA) == (True, "")
    inst.prepare(Workload(model="unused"))

    def rise(bench):
        lib.used_v1, lib.used_v2, lib.processes = peak

    bench = StubBench(on_step=rise, seconds=0.03)  # long enough for the 5 ms sampler to see it
    run_pass(bench, [inst], MEMORY)
    return inst.results()


def me(used):
    return [SimpleNamespace(pid=os.getpid(), usedGpuMemory=used)]


def test_process_memory_with_idle_baseline_subtracted():
    lib = FakeNvml()
    inst = nvml(lib)
    other = SimpleNamespace(pid=1, usedGpuMemory=5 * GiB)
    r = _memory_pass(lib, inst, baseline=(9 * GiB, 8 * GiB, [other, *me(GiB // 2)]),
                     peak=(13 * GiB, 12 * GiB, [other, *me(GiB // 2 + 3 * GiB)]))
    assert r["nvml_process_bytes"] == 3 * GiB and r["nvml_process_source"] == "process"
    assert r["nvml_device_bytes"] == 4 * GiB  # v2 readings
    assert r["nvml_process_baseline_bytes"] == GiB // 2 and r["nvml_device_memory_api"] == "v2"
    assert r["nvml_handle_match"] == "uuid" and r["nvml_samples"] >= 2
    assert inst.notes == []


@pytest.mark.parametrize("case", ["used-none", "pid-mismatch"])
def test_falls_back_to_device_memory_and_says_so(case):
    lib = FakeNvml()
    if case == "used-none":  # e.g. Windows WDDM, or a driver that hides it
        baseline, peak = me(None), me(None)
    else:  # inside a container NVML reports host PIDs
        baseline = peak = [SimpleNamespace(pid=os.getpid() + 100_000, usedGpuMemory=GiB)]
    inst = nvml(lib)
    r = _memory_pass(lib, inst, baseline=(2 * GiB, GiB, baseline), peak=(5 * GiB, 4 * GiB, peak))
    assert r["nvml_process_bytes"] == r["nvml_device_bytes"] == 3 * GiB
    assert r["nvml_process_source"] == "device"
    expected = "no usedGpuMemory" if case == "used-none" else "not among the GPU's processes"
    assert any(expected in n and "device's used memory" in n for n in inst.notes)


def test_v1_memory_info_where_v2_is_unsupported():
    lib = FakeNvml(v2=False)
    r = _memory_pass(lib, nvml(lib), baseline=(2 * GiB, 0, me(GiB)), peak=(7 * GiB, 0, me(6 * GiB)))
    assert r["nvml_device_bytes"] == 5 * GiB and r["nvml_device_memory_api"] == "v1"
    assert lib.calls.count("v2") == 1  # tried once, then v1 only


def test_unreadable_device_memory_is_none_not_zero():
    lib = FakeNvml()

    def broken(handle, version=None):
        raise FakeNVMLError("GPU is lost")

    lib.nvmlDeviceGetMemoryInfo = broken
    r = _memory_pass(lib, nvml(lib), baseline=(0, 0, me(GiB)), peak=(0, 0, me(2 * GiB)))
    assert r["nvml_device_bytes"] is None and r["nvml_process_bytes"] == GiB


def test_energy_counter_wrap():
    assert energy_delta_mj(2**64 - 500, 1500) == 2000
    assert energy_delta_mj(1000, 4000) == 3000


def test_energy_window_is_stretched_to_its_minimum_and_gives_joules_per_token():
    lib = FakeNvml()
    lib.energy_mj = 2**64 - 10_000  # wraps during the window
    inst = nvml(lib, energy_window_s=0.2)
    assert inst.available(CUDA)[0]

    def burn(bench):
        lib.energy_mj = (lib.energy_mj + 1_000) % 2**64  # 1 J a step

    bench = StubBench(on_step=burn, seconds=0.01)
    run_pass(bench, [inst], TIMED)
    r = inst.results()
    assert r["nvml_energy_window_s"] >= 0.2 and bench.steps >= 10
    assert r["nvml_energy_j"] == pytest.approx(bench.steps * 1.0)
    assert r["energy_j_per_token"] == pytest.approx(1.0 / bench.tokens_per_step)
    assert r["nvml_power_draw_w"] == 250.0 and r["nvml_sm_clock_mhz"] == 1980
    assert r["nvml_power_w"] == pytest.approx(bench.steps / r["nvml_energy_window_s"])


def test_energy_unsupported_is_none_with_a_note():
    lib = FakeNvml(energy_supported=False)
    inst = nvml(lib, energy_window_s=0.0)
    assert inst.available(CUDA)[0]
    run_pass(StubBench(), [inst], TIMED)
    assert inst.results().get("energy_j_per_token") is None
    assert any("energy counter unavailable (Not Supported)" in n for n in inst.notes)


def test_registered_under_its_name():
    assert isinstance(make_instrument("nvml"), NvmlMemory)
