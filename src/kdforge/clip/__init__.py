"""CLIP distillation (CLIP-KD): CLIP models, image-text data, the CLIP-KD losses and zero-shot evaluation."""

from kdforge.registry import import_submodules

import_submodules("kdforge.clip")  # every module registers its models, losses and methods
