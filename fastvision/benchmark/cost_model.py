"""A stated cost model for the GPU benchmark cases: a predicted lower bound on one call's time.

The bound is the largest of three terms, each a floor the call cannot beat:

- memory: the op's minimal DRAM bytes (``OpSpec.cost``, the case's ``bytes_moved``) over the
  device's copy bandwidth (measured by the run when it has a GPU, else the H100's 3.0 TB/s);
- compute: the useful FLOPs over the peak of the instruction class that runs them (wgmma about
  800, mma.sync about 400 TFLOP/s for 16-bit inputs; CUDA cores about 60 TFLOP/s in float32);
- issue: the hot loops' warp instructions (static SASS per score x scores / 32 threads per warp)
  over what the SMs can issue (132 SMs x 4 schedulers x 1.98 GHz, one warp instruction per
  scheduler per cycle).

Whichever is largest *binds*. The figures are predictions from compiled code and datasheet peaks,
never measurements; the GPU pass puts measured times beside them and keeps measured/predicted so
the model can be corrected.
"""

from __future__ import annotations

from dataclasses import dataclass

# The instruction classes a case's FLOPs can run on, and their peak in TFLOP/s on the modelled GPU.
FLOP_CLASSES = ("wgmma", "mma", "cuda_core")


@dataclass(frozen=True)
class DeviceModel:
    """Peaks of the modelled GPU. ``bandwidth_source`` says whether the bandwidth was measured."""

    name: str = "H100 SXM"
    bandwidth_gbps: float = 3000.0
    bandwidth_source: str = "assumed (datasheet-level copy bandwidth; not measured)"
    wgmma_tflops: float = 800.0
    mma_tflops: float = 400.0
    cuda_core_tflops: float = 60.0
    sms: int = 132
    schedulers_per_sm: int = 4
    clock_ghz: float = 1.98

    def peak_tflops(self, flop_class: str) -> float:
        if flop_class not in FLOP_CLASSES:
            raise ValueError(f"flop_class must be one of {FLOP_CLASSES}, got {flop_class!r}")
        return {"wgmma": self.wgmma_tflops, "mma": self.mma_tflops, "cuda_core": self.cuda_core_tflops}[
            flop_class
        ]

    @property
    def warp_instructions_per_s(self) -> float:
        return self.sms * self.schedulers_per_sm * self.clock_ghz * 1e9


H100 = DeviceModel()


def with_measured_bandwidth(model: DeviceModel, gbps: float | None) -> DeviceModel:
    """``model`` with the copy bandwidth a run measured (unchanged when ``gbps`` is None)."""
    if gbps is None or gbps <= 0:
        return model
    from dataclasses import replace

    return replace(model, bandwidth_gbps=float(gbps), bandwidth_source="measured by this run (copy kernel)")


@dataclass(frozen=True)
class Prediction:
    """Times in milliseconds; ``None`` for a term the case gives no input for (not modelled)."""

    memory_ms: float | None
    compute_ms: float | None
    issue_ms: float | None
    flop_class: str | None
    bound_ms: float | None
    binds: str  # "memory", "compute (wgmma)", "issue", or "not modelled"

    def share_of_floor(self, measured_ms: float | None) -> float | None:
        """predicted / measured: the share of the floor a measurement reaches (1.0 at the bound)."""
        if measured_ms is None or not self.bound_ms or measured_ms <= 0:
            return None
        return self.bound_ms / measured_ms

    def describe(self) -> str:
        if self.bound_ms is None:
            return "no prediction: neither bytes, FLOPs nor hot-loop instructions declared"
        terms = [
            f"{name} {value * 1e3:.3g} us"
            for name, value in (
                ("memory", self.memory_ms),
                (f"compute/{self.flop_class}", self.compute_ms),
                ("issue", self.issue_ms),
            )
            if value is not None
        ]
        return f"{self.bound_ms * 1e3:.3g} us, {self.binds} binds ({', '.join(terms)})"


def predict(
    bytes_moved: int = 0,
    flops: int = 0,
    flop_class: str | None = None,
    warp_instructions: float | None = None,
    device: DeviceModel = H100,
) -> Prediction:
    """The lower bound of one call: max(bytes / bandwidth, FLOPs / peak(flop_class), warp
    instructions / issue rate). A term whose input is 0 or None is left out (not modelled)."""
    if bytes_moved < 0 or flops < 0 or (warp_instructions is not None and warp_instructions < 0):
        raise ValueError("bytes_moved, flops and warp_instructions must be non-negative")
    if flops and flop_class is None:
        raise ValueError("flops given without the flop_class that runs them")
    memory = bytes_moved / (device.bandwidth_gbps * 1e9) * 1e3 if bytes_moved else None
    compute = flops / (device.peak_tflops(flop_class) * 1e12) * 1e3 if flops else None
    issue = warp_instructions / device.warp_instructions_per_s * 1e3 if warp_instructions else None
    terms = {"memory": memory, f"compute ({flop_class})": compute, "issue": issue}
    present = {k: v for k, v in terms.items() if v is not None}
    if not present:
        return Prediction(None, None, None, flop_class, None, "not modelled")
    binds = max(present, key=present.__getitem__)
    return Prediction(memory, compute, issue, flop_class if flops else None, present[binds], binds)


def warp_instructions_from_sass(instructions_per_score: float, scores: int) -> float:
    """Warp instructions of a hot loop: each thread issues ``instructions_per_score`` static SASS
    instructions per score it owns (the budget table's *per score*), 32 threads share a warp
    instruction."""
    if instructions_per_score < 0 or scores < 0:
        raise ValueError("instructions_per_score and scores must be non-negative")
    return instructions_per_score * scores / 32
