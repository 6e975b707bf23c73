"""Training scripts for the small real models shipped under ``models/``.

Run each from the repository root: ``python -m train.vae``, ``python -m train.dit``,
``python -m train.pixart`` (the VAE first: both transformers train on its latents).
"""
