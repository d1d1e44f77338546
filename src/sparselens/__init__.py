"""sparselens: learning sparse structure in neural networks.

Capabilities share one core of sparsity math (:mod:`sparselens.core`):

* :mod:`sparselens.l0` -- Hard Concrete L0 gates, L0 layers, sparse regression and sparse
  calibration weights (a drop-in for PolicyEngine's l0-python).
"""

__version__ = "0.1.0"
