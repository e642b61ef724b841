"""GPU cost model: a roofline per layer, dense, 2:4 sparse tensor cores or block-sparse GEMM (see targets/gpu.yaml)."""

from __future__ import annotations

from ..layers import LayerFormat, LayerSpec
from .common import LayerEstimate

__all__ = ["estimate_gpu"]


def estimate_gpu(spec: LayerSpec, fmt: LayerFormat | None, prof, grid=None, **_options) -> LayerEstimate:
    """Roofline estimate; a sparse path is used only when faster than dense (other targets' options are ignored)."""
    db = prof["dtype_bytes"]
    act = (spec.in_numel + spec.out_numel) * db
    wbytes = spec.weight_numel * db
    bw = prof["memory_gbps"] * 1e9
    dense_rate = prof["dense_tflops"] * 1e12 * prof["efficiency"]
    ovh = prof["launch_overhead_us"] * 1e-6
    flops = 2 * spec.macs
    td = ovh + max(flops / dense_rate, (act + wbytes) / bw)
    notes, details = [], {"roofline": "max(flops / rate, bytes / bandwidth) + overhead"}
    if fmt is None or not fmt.sparse:
        return LayerEstimate(td, td, act + wbytes, act + wbytes, spec.macs, spec.macs, details=details)
    extra = prof["sparse_overhead_us"] * 1e-6
    if fmt.kind == "nm" and fmt.fits_24:
        rate = prof["sparse_24_tflops"] * 1e12 * prof["sparse_efficiency"]
        sw = wbytes / 2 + spec.weight_numel / 2 / 4  # half the values + 2 bits per kept value
        t = ovh + extra + max(flops / rate, (act + sw) / bw)
        macs = spec.macs  # tensor cores skip half the products; time uses the sparse rate
        details["path"] = "2:4 sparse tensor cores"
        if t >= td:
            notes.append("2:4 kernel not faster than dense here (small layer): runs dense")
            return LayerEstimate(td, td, act + wbytes, act + wbytes, spec.macs, spec.macs, details=details, notes=notes)
        return LayerEstimate(t, td, int(act + sw), act + wbytes, macs // 2, spec.macs, details=details, notes=notes)
    if fmt.kind == "nm":
        notes.append(f"{fmt.n}:{fmt.m} is not 2:4-compatible: no tensor-core path, runs dense")
        return LayerEstimate(td, td, act + wbytes, act + wbytes, spec.macs, spec.macs, details=details, notes=notes)
    d = fmt.block_density
    rate = prof["dense_tflops"] * 1e12 * prof["efficiency"] * prof["block_sparse_efficiency"]
    bo, bi = prof["block"]
    kept = d * (spec.co // bo) * (spec.ci // bi)
    sw = wbytes * d + kept * 2 + (spec.co // bo + 1) * 4
    t = ovh + extra + max(flops * d / rate, (act + sw) / bw)
    details["path"] = "block-sparse GEMM on kept blocks"
    if t >= td:
        notes.append("block-sparse kernel not faster than dense here: runs dense")
        return LayerEstimate(td, td, act + wbytes, act + wbytes, spec.macs, spec.macs, details=details, notes=notes)
    return LayerEstimate(t, td, int(act + sw), act + wbytes, int(spec.macs * d), spec.macs, details=details,
                         notes=notes)
