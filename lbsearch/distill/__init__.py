"""Healing: per-layer attention transfer into a block library, then global distillation."""
from ..recipe import HealConfig, TransferConfig
from .healing import add_lora, heal, remove_lora, teacher_mode, trainable_parameters
from .library import BlockLibrary, trainable_pairs
from .transfer import collect_layer_data, transfer_layer

__all__ = ["BlockLibrary", "HealConfig", "TransferConfig", "add_lora", "collect_layer_data", "heal", "remove_lora",
           "teacher_mode", "trainable_pairs", "trainable_parameters", "transfer_layer"]
