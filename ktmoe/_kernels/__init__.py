"""Compiled kernels (C: AMX, AVX-512, portable) and their Cython wrapper `_core`."""
