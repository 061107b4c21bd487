"""Chip specifications, and the roofline estimate of a step from the per-device counts of kimi_jax.train.hlo_stats.

The roofline (`roofline`) is an ESTIMATE, not a measurement: max(FLOPs / peak, HBM bytes / HBM bandwidth) plus
the collectives' wire bytes over the interconnect bandwidth (no overlap of communication with compute, and
every collective at the chip's aggregate link bandwidth).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    name: str
    peak_flops: float        # dense bf16 FLOP/s per chip (one JAX device)
    hbm_bytes: float         # per chip
    hbm_bandwidth: float     # bytes/s per chip
    ici_bandwidth: float     # bytes/s per chip, aggregate over its fast links (ICI / NVLink), both directions
    dcn_bandwidth: float     # bytes/s per chip across slices / hosts (DCN / InfiniBand), assumed
    source: str


GiB = 1024 ** 3
# Vendor figures (cloud.google.com/tpu/docs/<version>, NVIDIA H100/H200 datasheets); "ICI" = aggregate
# interconnect bandwidth per chip as the vendor states it (Gbps / 8). TPU HBM is the capacity XLA reports as
# usable where known (v5p: 95.74 GiB). DCN per chip is an assumption (one 200 Gbps NIC per 4-chip host for TPU,
# one 400 Gbps InfiniBand NIC per GPU).
CHIPS: dict[str, ChipSpec] = {
    "v5p": ChipSpec("TPU v5p", 459e12, 95.74 * GiB, 2765e9, 4800e9 / 8, 200e9 / 8 / 4,
                    "Google: 459 TFLOP/s bf16, 95 GB HBM2e at 2765 GB/s, ICI 4800 Gbps/chip"),
    "v6e": ChipSpec("TPU v6e", 918e12, 31.25 * GiB, 1640e9, 3584e9 / 8, 200e9 / 8 / 4,
                    "Google: 918 TFLOP/s bf16, 32 GB HBM at 1640 GB/s, ICI 3584 Gbps/chip"),
    "v5e": ChipSpec("TPU v5e", 197e12, 15.75 * GiB, 819e9, 1600e9 / 8, 200e9 / 8 / 4,
                    "Google: 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s, ICI 1600 Gbps/chip"),
    "v4": ChipSpec("TPU v4", 275e12, 32 * GiB, 1228e9, 2400e9 / 8, 200e9 / 8 / 4,
                   "Google: 275 TFLOP/s bf16, 32 GiB HBM2 at 1228 GB/s, ICI 6 links (~2400 Gbps/chip assumed)"),
    "h100": ChipSpec("H100 SXM", 989e12, 80e9, 3.35e12, 900e9, 400e9 / 8,
                     "NVIDIA: 989 TFLOP/s dense bf16, 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s"),
    "h200": ChipSpec("H200 SXM", 989e12, 141e9, 4.8e12, 900e9, 400e9 / 8,
                     "NVIDIA: 989 TFLOP/s dense bf16, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s"),
    "h800": ChipSpec("H800 SXM", 989e12, 80e9, 3.35e12, 400e9, 400e9 / 8,
                     "NVIDIA: as H100 with NVLink 400 GB/s"),
}


def roofline(flops: float, hbm_bytes: float, ici_wire_bytes: float, slow_wire_bytes: float, chip: ChipSpec,
             model_flops: float | None = None) -> dict[str, float]:
    """An ESTIMATE of the step time per device (seconds) from per-device counts:
    compute = flops / peak, memory = hbm_bytes / HBM bandwidth, ici = fast-link wire bytes / ICI (NVLink)
    bandwidth, dcn = cross-slice (cross-host) wire bytes / DCN (IB) bandwidth;
    step = max(compute, memory) + ici + dcn (no overlap of communication); step_overlapped = max of all four.
    MFU estimate = model_flops (per device) / (step * peak)."""
    compute = flops / chip.peak_flops
    memory = hbm_bytes / chip.hbm_bandwidth
    ici = ici_wire_bytes / chip.ici_bandwidth
    dcn = slow_wire_bytes / chip.dcn_bandwidth
    step = max(compute, memory) + ici + dcn
    out = {"compute_s": compute, "hbm_s": memory, "ici_s": ici, "dcn_s": dcn, "step_s": step,
           "step_overlapped_s": max(compute, memory, ici, dcn)}
    if model_flops is not None:
        out["model_flops"] = model_flops
        out["mfu"] = model_flops / (step * chip.peak_flops) if step else float("nan")
        out["mfu_overlapped"] = (model_flops / (out["step_overlapped_s"] * chip.peak_flops)
                                 if out["step_overlapped_s"] else float("nan"))
    return out
