"""What every run shares: the run directory (config, manifest, metrics, atomic checkpoints,
staged final outputs, exact resume), atomic file writes, seeding, logging, progress bars and
clean handling of termination signals."""

from sparselens.train.atomic import (
    atomic_open,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    atomic_write_yaml,
    load_safetensors,
    load_torch,
    remove_temp_files,
    save_safetensors,
    save_torch,
)
from sparselens.train.checkpoint import load_checkpoint, save_checkpoint
from sparselens.train.config import format_validation_error, load_yaml_mapping
from sparselens.train.logging_setup import setup_logging
from sparselens.train.manifest import build_manifest
from sparselens.train.progress import progress_bar, progress_enabled
from sparselens.train.rundir import RunDir, save_figure
from sparselens.train.seeding import seed_everything
from sparselens.train.signals import Interrupted, termination_signals

__all__ = [
    "Interrupted",
    "RunDir",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "atomic_write_yaml",
    "build_manifest",
    "format_validation_error",
    "load_checkpoint",
    "load_safetensors",
    "load_torch",
    "load_yaml_mapping",
    "progress_bar",
    "progress_enabled",
    "remove_temp_files",
    "save_checkpoint",
    "save_figure",
    "save_safetensors",
    "save_torch",
    "seed_everything",
    "setup_logging",
    "termination_signals",
]
