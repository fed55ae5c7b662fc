"""AnoDODE (Hu & Jin): multi-scale feature likelihood under a diffusion ODE, and localisation.

Submodules: ``sde`` (the VP SDE of eqs. 6-9), ``likelihood`` (eqs. 10-13: PF-ODE log-likelihood with
Skilling-Hutchinson or exact traces, a per-sample scipy RK45 baseline and a batched torch solver).
"""
