"""Settings for every test run, unit tests and notebooks (nbval) alike."""

import os

# OpenMP threads that spin while they wait starve each other when a core is busy elsewhere (a
# notebook kernel's own threads, a second process): notebook cells ran 10x slower on 2 cores.
# Kernels started by nbval inherit the environment of this process.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
