"""Optional GPU path (the ``[gpu]`` extra, CuPy): colour deconvolution and Gaussian smoothing on a CUDA device.

Everything here is optional: :func:`available` is False without CuPy or without a CUDA device. The engine
calls into this module only when asked (``analyze_region(..., gpu=True)``, ``analyze_slide(..., gpu=True)``,
``ihcscore score --gpu``): the tile's colour deconvolution and the Gaussian smoothing of nucleus detection
then run on the device, everything else on the CPU. Results equal the CPU path
(:func:`ihcscore.stains.rgb_to_od`, the inverse stain matrix, :func:`scipy.ndimage.gaussian_filter` with
``mode="nearest"``) within 1e-4 OD: the same lookup table, the same float32 matrix and the same
truncated Gaussian kernel (``truncate=4.0``) are used, only the summation order differs.

    from ihcscore import gpu
    if gpu.available():
        stain_od, smoothed = gpu.deconvolve_smooth(rgb, stains, sigma_px=3.0)
"""

from __future__ import annotations

import numpy as np

__all__ = ["available", "require", "device_name", "deconvolve", "gaussian", "deconvolve_smooth",
           "deconvolve_smooth_cpu"]

#: What the engine says when ``gpu=True`` finds no usable device.
NO_GPU_MESSAGE = ("no usable GPU: the GPU path needs CuPy (pip install 'ihcscore[gpu]') and a CUDA device "
                  "that runs kernels; run without --gpu to use the CPU")

_STATE: dict = {}


def _cupy():
    """The cupy module when it imports and a CUDA device answers, else None (cached)."""
    if "cp" not in _STATE:
        cp = None
        try:
            import cupy

            if cupy.cuda.runtime.getDeviceCount() > 0:
                cupy.zeros(1).sum()  # a device that cannot run kernels fails here
                cp = cupy
        except Exception:  # noqa: BLE001 - no CuPy, no driver, no device: the CPU path is used
            cp = None
        _STATE["cp"] = cp
    return _STATE["cp"]


def available() -> bool:
    """True when CuPy imports and a CUDA device can run kernels."""
    return _cupy() is not None


def device_name() -> str | None:
    cp = _cupy()
    if cp is None:
        return None
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props.get("name", b"CUDA device")
    return name.decode() if isinstance(name, bytes) else str(name)


def require():
    """The cupy module; ``RuntimeError`` (:data:`NO_GPU_MESSAGE`) when no device is usable."""
    cp = _cupy()
    if cp is None:
        raise RuntimeError(NO_GPU_MESSAGE)
    return cp


def deconvolve(rgb, stains, *, to_host: bool = True):
    """Per-channel OD and stain OD (hematoxylin, DAB, residual) of a uint8 RGB image on the GPU.

    Returns ``(od, stain_od)``, float32 ``(M, N, 3)`` each (NumPy with ``to_host``, else CuPy).
    """
    from .stains import od_lookup_table

    cp = require()
    rgb = np.asarray(rgb)[..., :3]
    if rgb.dtype != np.uint8:
        raise ValueError(f"ihcscore.gpu.deconvolve expects uint8 RGB, got {rgb.dtype}")
    lut = cp.asarray(np.stack([np.asarray(t, dtype=np.float32) for t in od_lookup_table(stains.background)]))
    d = cp.asarray(np.ascontiguousarray(rgb))
    od = cp.empty(d.shape, dtype=cp.float32)
    for c in range(3):
        od[..., c] = lut[c][d[..., c]]
    inv = cp.asarray(np.linalg.inv(stains.matrix).astype(np.float32))
    stain_od = od @ inv
    if to_host:
        return cp.asnumpy(od), cp.asnumpy(stain_od)
    return od, stain_od


def _kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    # scipy.ndimage's kernel: radius int(truncate * sigma + 0.5), normalised exp(-x²/2σ²)
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian(image, sigma_px: float, *, to_host: bool = True):
    """Gaussian filter of a 2-D image on the GPU, like ``scipy.ndimage.gaussian_filter(..., mode="nearest")``."""
    cp = require()
    from cupyx.scipy import ndimage as cndi

    img = image.astype(cp.float32, copy=False) if isinstance(image, cp.ndarray) else \
        cp.asarray(np.ascontiguousarray(image, dtype=np.float32))
    k = cp.asarray(_kernel(sigma_px).astype(np.float32))
    out = cndi.correlate1d(img, k, axis=0, mode="nearest")
    out = cndi.correlate1d(out, k, axis=1, mode="nearest")
    return cp.asnumpy(out) if to_host else out


def deconvolve_smooth(rgb, stains, sigma_px: float, channel: int = 0):
    """GPU: ``(stain_od, smoothed)`` — deconvolved stains and the Gaussian of one stain channel (NumPy out)."""
    cp = require()
    _, stain_od = deconvolve(rgb, stains, to_host=False)
    smoothed = gaussian(stain_od[..., channel], sigma_px, to_host=False)
    out = cp.asnumpy(stain_od), cp.asnumpy(smoothed)
    cp.cuda.Stream.null.synchronize()
    return out


def deconvolve_smooth_cpu(rgb, stains, sigma_px: float, channel: int = 0):
    """The CPU reference of :func:`deconvolve_smooth` (what the engine computes with NumPy/SciPy)."""
    from scipy import ndimage as ndi

    from .stains import deconvolve

    stain_od = deconvolve(np.asarray(rgb)[..., :3], stains)
    smoothed = ndi.gaussian_filter(np.ascontiguousarray(stain_od[..., channel]), sigma_px, mode="nearest")
    return stain_od, smoothed
