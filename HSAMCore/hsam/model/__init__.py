"""The H-SAM network. Importing this package imports torch."""

from .build import build_from_description, build_hsam, embedding_grid
from .hsam import HSAM, HSAMOutput
from .lora import LoRAQKV, merge_lora

__all__ = ["HSAM", "HSAMOutput", "LoRAQKV", "build_from_description", "build_hsam", "embedding_grid", "merge_lora"]
