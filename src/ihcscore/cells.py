"""Nucleus detection and cell expansion on one region (QuPath-style watershed cell detection)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DetectionParams:
    """Nucleus and cell detection parameters (the preset's ``[detection]`` table).

    Lengths are in µm, areas in µm², intensities in OD units.
    """

    image: str = "hematoxylin"  # "hematoxylin" | "od_sum"
    exclude_dab: bool = False
    pixel_size_um: float = 0.5
    background_radius_um: float = 8.0
    median_radius_um: float = 0.0
    sigma_um: float = 1.5
    threshold: float = 0.1
    min_area_um2: float = 10.0
    max_area_um2: float = 400.0
    max_background: float = 2.0
    split_by_shape: bool = True
    cell_expansion_um: float = 5.0
    membrane_width_um: float = 1.0
