"""Diffusion distillation: DDPM base, DDIM, progressive distillation, CFD and RDD (relational diffusion KD)."""

from kdforge.diffusion import data, features, method, unet  # noqa: F401 - registers data sets, models, the method
from kdforge.diffusion.losses import PixelMemory, ProjectionHead, cfd_loss, is_p2p_loss, memory_p2p_loss
from kdforge.diffusion.method import Diffusion, pd_loss
from kdforge.diffusion.sample import ddim_sample, sample_run, save_grid
from kdforge.diffusion.schedule import CosineGrid, sampling_grid
from kdforge.diffusion.unet import DdpmUNet, DiffusersDenoiser, SmallUNet, load_ddpm_checkpoint

__all__ = [
           "CosineGrid",
           "DdpmUNet",
           "DiffusersDenoiser",
           "Diffusion",
           "PixelMemory",
           "ProjectionHead",
           "SmallUNet",
           "cfd_loss",
           "ddim_sample",
           "is_p2p_loss",
           "load_ddpm_checkpoint",
           "memory_p2p_loss",
           "pd_loss",
           "sample_run",
           "sampling_grid",
           "save_grid",
]
