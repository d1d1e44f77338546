"""L0 gates (Louizos, Welling & Kingma 2018): Hard Concrete modules, L0 layers, selection gates,
penalties, sparse regression and sparse calibration weights.

The public API mirrors PolicyEngine's l0-python 0.6.2 (import ``l0``), so existing code switches by
changing the import; every gate formula comes from :mod:`sparselens.core.hard_concrete`.
"""

from sparselens import __version__
from sparselens.l0.calibration import SparseCalibrationWeights
from sparselens.l0.distributions import HardConcrete
from sparselens.l0.gates import FeatureGate, HybridGate, L0Gate, SampleGate
from sparselens.l0.layers import L0Conv2d, L0DepthwiseConv2d, L0Linear, SparseMLP, prune_model
from sparselens.l0.penalties import (
    PenaltyTracker,
    TemperatureScheduler,
    compute_l0_penalty,
    compute_l0l2_penalty,
    compute_l2_penalty,
    get_active_parameter_count,
    get_sparsity_stats,
    update_temperatures,
)
from sparselens.l0.sparse import SparseL0Linear

__all__ = [
    "FeatureGate",
    "HardConcrete",
    "HybridGate",
    "L0Conv2d",
    "L0DepthwiseConv2d",
    "L0Gate",
    "L0Linear",
    "PenaltyTracker",
    "SampleGate",
    "SparseCalibrationWeights",
    "SparseL0Linear",
    "SparseMLP",
    "TemperatureScheduler",
    "__version__",
    "compute_l0_penalty",
    "compute_l0l2_penalty",
    "compute_l2_penalty",
    "get_active_parameter_count",
    "get_sparsity_stats",
    "prune_model",
    "update_temperatures",
]
