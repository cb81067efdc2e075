"""Crystal tooling for the crystal VAE: Structure conversion, CIF writing, StructureMatcher
metrics and the evaluation command (`python -m engine.crystal.evaluate`)."""
