"""Launching training: TPU VMs, Slurm and plain multi-node GPU jobs, sweeps and scaling curves."""
