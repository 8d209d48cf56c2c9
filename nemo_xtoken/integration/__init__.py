"""ModelOpt / Megatron-Bridge / NeMo-Run integration (imports those packages lazily)."""
