"""Experiment grids: specs, content-addressed stages, local and SLURM runners, tidy results."""
