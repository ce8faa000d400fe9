"""The `nvml` instrument: what the driver sees — process and device memory, energy, power, clocks.

NVML (package `nvidia-ml-py`, module `pynvml`) counts everything the process holds on the GPU:
the CUDA context, the caching allocator's reserved segments, library workspaces. A background
thread samples it every few milliseconds during the memory pass; the idle baseline, read before
the model is built, is subtracted. Energy is the difference of the total-energy counter (mJ) over
the timed pass, stretched to at least `energy_window_s`.

Every call into NVML goes through the library object given to `NvmlMemory(library=...)` (default:
pynvml), so the logic is testable without a driver. Nothing here raises on an NVML failure: the
number is None and a note says why.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from bench.measure.instrument import MEMORY, TIMED, Instrument

if TYPE_CHECKING:
    from bench.measure.workload import Bench, Workload

# nvmlDeviceGetTotalEnergyConsumption is an unsigned 64-bit count of millijoules.
ENERGY_COUNTER_MODULUS = 2**64
Identity = tuple[str | None, str | None]  # (UUID, PCI bus id) of a CUDA device


def load_nvml(library: Any = None) -> tuple[Any, str]:
    """(initialised NVML library, "") or (None, why not)."""
    if library is None:
        try:
            import pynvml as library
        except ImportError as err:
            return None, f"nvidia-ml-py is not installed ({err})"
    try:
        library.nvmlInit()
    except Exception as err:  # NVMLError (no driver, no libnvidia-ml) or a broken install
        return None, f"NVML init failed: {err}"
    return library, ""


def cuda_identity(index: int) -> Identity:
    """UUID and PCI bus id of CUDA device `index`, as far as this torch build exposes them."""
    props = torch.cuda.get_device_properties(index)
    uuid = str(props.uuid) if getattr(props, "uuid", None) is not None else None
    pci = None
    if hasattr(props, "pci_bus_id"):
        pci = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    return uuid, pci


def _uuid_key(uuid: str | bytes) -> str:
    text = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
    text = text.lower()
    for prefix in ("gpu-", "mig-"):
        text = text.removeprefix(prefix)
    return text


def _pci_key(bus_id: str | bytes) -> tuple[int, ...]:
    """'00000000:3B:00.0' and '0000:3b:00.0' -> (0, 0x3b, 0, 0)."""
    text = bus_id.decode() if isinstance(bus_id, bytes) else str(bus_id)
    domain, bus, rest = text.strip().split(":")
    device, function = rest.split(".")
    return int(domain, 16), int(bus, 16), int(device, 16), int(function, 16)


def match_handle(lib: Any, identity: Identity) -> tuple[Any, str]:
    """The NVML handle of the CUDA device with this identity: by UUID, else by PCI bus id (NVML
    and CUDA number devices differently, and CUDA_VISIBLE_DEVICES renumbers them)."""
    uuid, pci = identity
    handles, unreadable = [], []
    for i in range(lib.nvmlDeviceGetCount()):
        try:  # a GPU this container may not open (NVML lists it, then says No Permission)
            handles.append(lib.nvmlDeviceGetHandleByIndex(i))
        except Exception as err:
            unreadable.append(f"{i}: {err}")
    if uuid:
        for handle in handles:
            if _read(lambda h=handle: _uuid_key(lib.nvmlDeviceGetUUID(h))) == _uuid_key(uuid):
                return handle, "uuid"
    if pci:
        for handle in handles:
            if _read(lambda h=handle: _pci_key(lib.nvmlDeviceGetPciInfo(h).busId)) == _pci_key(pci):
                return handle, "pci_bus_id"
    skipped = f"; NVML devices it could not open: {', '.join(unreadable)}" if unreadable else ""
    raise LookupError(f"no NVML device has UUID {uuid} or PCI bus id {pci}{skipped}")


def _read(query: Callable[[], Any]) -> Any:
    """One NVML query of one device, None where that device will not answer it."""
    try:
        return query()
    except Exception:
        return None


class DeviceMemoryReader:
    """Device used memory: NVML v2 memory info where supported (its `used` leaves out memory the
    driver reserves for itself), v1 otherwise."""

    def __init__(self, lib: Any, handle: Any) -> None:
        self.lib, self.handle = lib, handle
        self.api = "v2" if hasattr(lib, "nvmlMemory_v2") else "v1"

    def used_bytes(self) -> int:
        if self.api == "v2":
            try:
                return int(self.lib.nvmlDeviceGetMemoryInfo(self.handle, version=self.lib.nvmlMemory_v2).used)
            except Exception:  # older driver: function not found / not supported
                self.api = "v1"
        return int(self.lib.nvmlDeviceGetMemoryInfo(self.handle).used)


def process_used_bytes(lib: Any, handle: Any, pid: int) -> tuple[int | None, str]:
    """This process's used GPU memory, or (None, why not)."""
    try:
        processes = lib.nvmlDeviceGetComputeRunningProcesses(handle)
    except Exception as err:
        return None, f"process list unavailable ({err})"
    for process in processes:
        if process.pid == pid:
            if process.usedGpuMemory is None:
                return None, "NVML reports no usedGpuMemory for this process"
            return int(process.usedGpuMemory), ""
    return None, f"pid {pid} is not among the GPU's processes (a container's PID namespace?)"


class MemorySampler:
    """Peaks of process and device used memory, sampled by a background thread."""

    def __init__(
        self, reader: DeviceMemoryReader, pid: int, interval_s: float = 0.005
    ) -> None:
        self.lib, self.handle, self.device = reader.lib, reader.handle, reader
        self.pid, self.interval_s = pid, interval_s
        self.process_peak: int | None = None
        self.device_peak: int | None = None
        self.process_missing = ""  # why a sample had no process reading
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        process, why = process_used_bytes(self.lib, self.handle, self.pid)
        if process is None:
            self.process_missing = why
        else:
            self.process_peak = max(self.process_peak or 0, process)
        with contextlib.suppress(Exception):  # a failed read is a missing sample, not a crash
            self.device_peak = max(self.device_peak or 0, self.device.used_bytes())
        self.samples += 1

    def start(self) -> None:
        self.sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()  # the caching allocator keeps what it reserved: the end still shows it

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()


def energy_delta_mj(start_mj: int, end_mj: int) -> int:
    """Energy between two readings of the total-energy counter, across a wrap."""
    return (end_mj - start_mj) % ENERGY_COUNTER_MODULUS


class NvmlMemory(Instrument):
    """Process and device memory (memory pass) and energy per token (timed pass) from NVML."""

    name = "nvml"
    passes = (MEMORY, TIMED)

    def __init__(
        self,
        library: Any = None,
        identity: Callable[[int], Identity] | None = None,
        interval_s: float = 0.005,
        energy_window_s: float = 1.0,
    ) -> None:
        super().__init__()
        self._library = library  # pynvml, or a stand-in with its functions (tests)
        self._identity = identity or cuda_identity
        self._cuda = identity is None  # talk to torch.cuda only when identities come from it
        self.interval_s = interval_s
        self.min_seconds = energy_window_s
        self.lib: Any = None
        self.handle: Any = None
        self._match = ""
        self._baseline: tuple[int | None, int | None] = (None, None)  # process, device
        self._memory: dict[str, Any] = {}
        self._energy: dict[str, Any] = {}

    # -- availability and baseline ------------------------------------------------------------
    def available(self, device: torch.device) -> tuple[bool, str]:
        if device.type != "cuda":
            return False, f"the workload runs on {device.type}, not CUDA"
        if self._cuda and not torch.cuda.is_available():
            return False, "torch.cuda.is_available() is False"
        self.lib, why = load_nvml(self._library)
        if self.lib is None:
            return False, why
        index = device.index if device.index is not None else (
            torch.cuda.current_device() if self._cuda else 0
        )
        try:
            self.handle, self._match = match_handle(self.lib, self._identity(index))
        except Exception as err:
            return False, f"no NVML handle for cuda:{index}: {err}"
        self._reader = DeviceMemoryReader(self.lib, self.handle)  # remembers if v2 works
        return True, ""

    def prepare(self, workload: Workload) -> None:
        if self._cuda:  # the baseline holds the CUDA context (made by a first allocation) ...
            device = torch.device(workload.device)
            torch.empty(1, device=device)
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()  # ... but no cached segment the allocator will reuse later
        baseline = MemorySampler(self._reader, os.getpid())
        baseline.sample()
        self._baseline = (baseline.process_peak, baseline.device_peak)

    # -- passes --------------------------------------------------------------------------------
    def start(self, bench: Bench, pass_name: str) -> None:
        self._sync(bench)
        if pass_name == MEMORY:
            self._sampler = MemorySampler(self._reader, os.getpid(), self.interval_s)
            self._sampler.start()
        else:
            self._energy_start = self._read_energy()
            self._steps_start = bench.steps
            self._time_start = time.perf_counter()

    def stop(self, bench: Bench, pass_name: str) -> None:
        self._sync(bench)
        if pass_name == MEMORY:
            self._sampler.stop()
            self._memory = self._memory_results(self._sampler)
        else:
            seconds = time.perf_counter() - self._time_start
            tokens = (bench.steps - self._steps_start) * bench.tokens_per_step
            self._energy = self._energy_results(self._read_energy(), seconds, tokens)

    def results(self) -> dict[str, Any]:
        return {"nvml_handle_match": self._match or None, **self._memory, **self._energy}

    # -- helpers -------------------------------------------------------------------------------
    def _sync(self, bench: Bench) -> None:
        if self._cuda:
            torch.cuda.synchronize(bench.device)

    def _memory_results(self, sampler: MemorySampler) -> dict[str, Any]:
        process_base, device_base = self._baseline
        device = None
        if sampler.device_peak is not None and device_base is not None:
            device = sampler.device_peak - device_base
        if sampler.process_peak is not None and not sampler.process_missing:
            process, source = sampler.process_peak - (process_base or 0), "process"
        else:
            process, source = device, "device"
            self.notes.append(
                f"process memory unavailable ({sampler.process_missing}); nvml_process_bytes is "
                "the device's used memory minus its idle baseline"
            )
        if device is None:
            self.notes.append("device memory could not be read")
        return {
            "nvml_process_bytes": process,
            "nvml_device_bytes": device,
            "nvml_process_source": source if process is not None else None,
            "nvml_process_baseline_bytes": process_base,
            "nvml_device_baseline_bytes": device_base,
            "nvml_device_memory_api": sampler.device.api,
            "nvml_samples": sampler.samples,
        }

    def _read_energy(self) -> int | None:
        try:
            return int(self.lib.nvmlDeviceGetTotalEnergyConsumption(self.handle))
        except Exception as err:  # not supported before Volta, or no permission
            self.notes.append(f"energy counter unavailable ({err})")
            return None

    def _energy_results(self, end_mj: int | None, seconds: float, tokens: int) -> dict[str, Any]:
        results: dict[str, Any] = {"nvml_energy_window_s": seconds}
        start_mj = self._energy_start
        if start_mj is not None and end_mj is not None and tokens > 0:
            joules = energy_delta_mj(start_mj, end_mj) / 1000.0
            results |= {
                "energy_j_per_token": joules / tokens,
                "nvml_energy_j": joules,
                "nvml_power_w": joules / seconds if seconds > 0 else None,
            }
            if seconds < self.min_seconds:
                self.notes.append(f"energy window {seconds:.2f} s is shorter than {self.min_seconds} s")
        results |= self._read_power_and_clocks()
        return results

    def _read_power_and_clocks(self) -> dict[str, Any]:
        lib, handle, readings = self.lib, self.handle, {}
        for key, read in (
            ("nvml_power_draw_w", lambda: lib.nvmlDeviceGetPowerUsage(handle) / 1000.0),
            ("nvml_sm_clock_mhz", lambda: lib.nvmlDeviceGetClockInfo(handle, lib.NVML_CLOCK_SM)),
            ("nvml_mem_clock_mhz", lambda: lib.nvmlDeviceGetClockInfo(handle, lib.NVML_CLOCK_MEM)),
        ):
            try:
                readings[key] = read()
            except Exception:
                readings[key] = None
        return readings
