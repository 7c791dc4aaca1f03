"""Healing: per-layer attention transfer into a block library, then global distillation."""
from .healing import HealConfig, add_lora, heal, teacher_mode, trainable_parameters
from .healed import load_healed, save_healed
from .library import BlockLibrary, lswa_pairs
from .run import heal_plan
from .transfer import TransferConfig, collect_layer_data, transfer_layer

__all__ = ["BlockLibrary", "HealConfig", "TransferConfig", "add_lora", "collect_layer_data", "heal", "heal_plan",
           "load_healed", "lswa_pairs", "save_healed", "teacher_mode", "trainable_parameters", "transfer_layer"]
