"""Test-suite settings: one torch thread per process.

The suite's tensors are small, and on a 2-core machine intra-op threads mostly contend with each
other (and with the 2-process distributed tests); one thread is faster and steadier.
"""

import torch

torch.set_num_threads(1)
