"""Stochastic Parameter Decomposition (Bushnaq, Braun, Sharkey et al. 2025, arXiv 2506.20790).

Split chosen weight matrices of a frozen model into rank-1 subcomponents ``W ~ (V U)^T`` with
learned causal-importance functions, trained so the model still works under random ablations
bounded by CI while CI stays sparse.

* method: :class:`ComponentModel` (with :class:`DecomposedModule` patterns), components,
  CI functions, masks and routing, :func:`compute_losses` (:class:`LossConfig`);
* toy targets: TMS (:class:`TMSModel`) and residual MLPs (:class:`ResidMLP`), metrics
  (:func:`mmcs_ml2r`, :func:`identity_ci_error`, :func:`ci_l0`, ...);
* runs: :class:`SPDRunConfig`, :func:`load_config` (bundled configs by name),
  :func:`run_spd` (the ``sparselens spd run`` job), :func:`load_run`.

Names are imported on first use, so ``import sparselens.spd`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # method
    "LinearComponents": "components",
    "TiedLinearComponents": "components",
    "EmbeddingComponents": "components",
    "TransposedLinear": "components",
    "CIOutput": "ci_functions",
    "make_ci_function": "ci_functions",
    "DecomposedModule": "component_model",
    "ComponentModel": "component_model",
    "stochastic_masks": "masks",
    "delta_mask": "masks",
    "uniform_k_subset_routes": "masks",
    "ImportanceMinimalityConfig": "losses",
    "PGDConfig": "losses",
    "LossConfig": "losses",
    "recon_error": "losses",
    "importance_minimality": "losses",
    "faithfulness": "losses",
    "compute_losses": "losses",
    "pgd_recon": "losses",
    "eval_recon": "losses",
    # toy targets and metrics
    "TMSConfig": "targets.tms",
    "TMSModel": "targets.tms",
    "tms_batch": "targets.tms",
    "tms_decomposition": "targets.tms",
    "train_tms": "targets.tms",
    "train_verified_tms": "targets.tms",
    "represented_features": "targets.tms",
    "ResidMLPConfig": "targets.resid_mlp",
    "ResidMLP": "targets.resid_mlp",
    "resid_mlp_batch": "targets.resid_mlp",
    "resid_mlp_preset": "targets.resid_mlp",
    "train_resid_mlp": "targets.resid_mlp",
    "save_target": "targets.io",
    "load_target": "targets.io",
    "ci_l0": "metrics",
    "mmcs_ml2r": "metrics",
    "neuron_contributions": "metrics",
    "NeuronContributions": "metrics",
    "subcomponent_norms": "metrics",
    "count_active": "metrics",
    "clean_inputs": "metrics",
    "count_non_negligible": "metrics",
    "identity_ci_error": "metrics",
    "dense_ci_error": "metrics",
    "one_hot_ci": "metrics",
    # runs
    "SPDRunConfig": "config",
    "FaithfulnessWarmup": "config",
    "CONFIG_NAMES": "config",
    "load_config": "config",
    "Task": "tasks",
    "load_task": "tasks",
    "SPDTrainer": "trainer",
    "build_model": "trainer",
    "run_spd": "run",
    "load_run": "run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sparselens.spd' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"sparselens.spd.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
