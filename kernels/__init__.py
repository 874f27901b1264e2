"""Triton kernels, installed as :mod:`head4d.kernels` (this folder is mapped onto it).

One op per file, each exposing the calling contract its op's autograd glue expects.
Importing a module here imports Triton; :mod:`head4d` imports them lazily.
"""
