"""The networks, in one place: the ADM UNet (AnoFPDM; the core of AnoDODE's score networks), AnoDODE's
feature decoder, and the layers they share. Built from configurations stored with their weights
(:mod:`~AnomalyDiffusionLib.modelio`); no method logic here."""

from .decoder import Decoder
from .layers import group_norm, zero_init
from .unet import UNet, UNetConfig, count_parameters, timestep_embedding, unet_config

__all__ = [
    "Decoder",
    "UNet",
    "UNetConfig",
    "count_parameters",
    "group_norm",
    "timestep_embedding",
    "unet_config",
    "zero_init",
]
