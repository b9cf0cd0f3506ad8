"""The benchmark: ``python -m deqkern.bench`` runs every solver side by side (see ``--help``).

Modules: ``runner`` (configuration, timing, metrics), ``peers`` (ParaDiGMS, DEQ-DDIM and torchdeq
run on deqkern's model and chain), ``trace`` (per-round x0 error), ``report`` (table, JSON, PNGs).
Nothing here is imported by ``import deqkern``.
"""
