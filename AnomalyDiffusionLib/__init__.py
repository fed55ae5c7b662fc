"""AnomalyDiffusionLib: diffusion-model anomaly detection and segmentation for brain MRI.

Slicer-free. Data flows one way: volumes → slices → method → per-slice results → volume outputs.
"""

__version__ = "0.1.0"
