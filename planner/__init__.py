"""ditfastattn planner: calibrate a DiTFastAttn plan on a real diffusers pipeline.

``registry`` names the supported models, ``loading`` loads them, ``calibration``
holds the calibration inputs, ``search`` is the greedy search (it drives the
runtime's own processors), ``build`` turns a search into a plan and ``output``
writes it; ``distributed`` spreads a calibration over the ranks torchrun starts. The
``planner`` command (``cli.py``) puts them together.
"""
