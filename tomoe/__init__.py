"""tomoe: convert a dense Hugging Face decoder LLM into a Mixture-of-Experts model by dynamic structural pruning."""

import tomoe.export  # noqa: F401  (registers the "tomoe" model type with transformers' Auto classes)
from tomoe.config import ToMoEConfig
from tomoe.errors import ToMoEError
from tomoe.export import export_model, save_export
from tomoe.patch import ToMoERouting, attach

__version__ = "0.1.0"
__all__ = ["ToMoEConfig", "ToMoEError", "ToMoERouting", "attach", "export_model", "save_export", "__version__"]
