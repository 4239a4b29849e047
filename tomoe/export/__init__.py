"""Export a trained run as a real Mixture-of-Experts checkpoint (Sec. 3.5, App. B).

Importing this package registers the ``tomoe`` model type with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(exported_dir)`` works after ``import tomoe``, and registers the classes *for*
the Auto classes (``register_for_auto_class``), so ``save_pretrained`` of a loaded export writes the modeling code
and ``auto_map`` again and the saved folder still loads with ``trust_remote_code=True`` without tomoe.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from tomoe.export.configuration_tomoe import TomoeConfig
from tomoe.export.modeling_tomoe import TomoeForCausalLM

AutoConfig.register(TomoeConfig.model_type, TomoeConfig, exist_ok=True)
AutoModelForCausalLM.register(TomoeConfig, TomoeForCausalLM, exist_ok=True)
TomoeConfig.register_for_auto_class("AutoConfig")
TomoeForCausalLM.register_for_auto_class("AutoModelForCausalLM")

EXPORT_FORMATS = ("tomoe", "mixtral", "qwen3_moe")

from tomoe.export.build import export_model  # noqa: E402  (reads EXPORT_FORMATS)
from tomoe.export.folder import export_run, save_export  # noqa: E402

__all__ = ["EXPORT_FORMATS", "TomoeConfig", "TomoeForCausalLM", "export_model", "export_run", "save_export"]
