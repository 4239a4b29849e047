"""The formats ``tomoe export`` writes, named apart from the export code so that the command line lists them without
importing torch or transformers (``tomoe.export`` imports both)."""

EXPORT_FORMATS = ("tomoe", "mixtral", "qwen3_moe", "qwen2_moe")  # tomoe's own model type, then the stock transformers MoE layouts
