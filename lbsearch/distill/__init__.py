"""Healing: per-layer attention transfer into a block library, then global distillation."""
from ..recipe import HealConfig, TransferConfig
from .healing import heal, teacher_mode, trainable_parameters
from .library import BlockLibrary, trainable_pairs
from .transfer import collect_layer_data, transfer_layer
from .tuning import add_lora, add_tuning, remove_lora, remove_tuning

__all__ = ["BlockLibrary", "HealConfig", "TransferConfig", "add_lora", "add_tuning", "collect_layer_data", "heal",
           "remove_lora", "remove_tuning", "teacher_mode", "trainable_pairs", "trainable_parameters", "transfer_layer"]
