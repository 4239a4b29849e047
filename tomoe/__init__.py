"""tomoe: convert a dense Hugging Face decoder LLM into a Mixture-of-Experts model by dynamic structural pruning."""

from tomoe.config import ToMoEConfig
from tomoe.errors import ToMoEError

__version__ = "0.1.0"
__all__ = ["ToMoEConfig", "ToMoEError", "__version__"]
