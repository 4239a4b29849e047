"""Export a trained run as a real Mixture-of-Experts checkpoint (Sec. 3.5, App. B).

Importing this package registers the ``tomoe`` model type with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(exported_dir)`` works (``import tomoe`` imports this package as soon as
transformers is imported), and registers the classes *for* the Auto classes (``register_for_auto_class``), so
``save_pretrained`` of a loaded export writes the modeling code and ``auto_map`` again and the saved folder still
loads with ``trust_remote_code=True`` without tomoe.

Modules, bottom-up: ``configuration_tomoe``, ``kernels`` and ``modeling_tomoe`` (the tomoe model type; every tomoe
export folder carries a copy as its remote code), ``packing`` (a packed MLP's channel ranges), ``mixtral``,
``qwen3_moe`` and ``qwen2_moe`` (the stock layouts), ``build`` (``export_model``: masks -> experts, in memory), ``compat`` and
``folder`` (``save_export``, ``export_run``: the model folder).
"""

from transformers import AutoConfig, AutoModelForCausalLM

from tomoe.export.build import export_model
from tomoe.export.configuration_tomoe import TomoeConfig
from tomoe.export.folder import export_run, save_export
from tomoe.export.modeling_tomoe import TomoeForCausalLM
from tomoe.export_formats import EXPORT_FORMATS

AutoConfig.register(TomoeConfig.model_type, TomoeConfig, exist_ok=True)
AutoModelForCausalLM.register(TomoeConfig, TomoeForCausalLM, exist_ok=True)
TomoeConfig.register_for_auto_class("AutoConfig")
TomoeForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["EXPORT_FORMATS", "TomoeConfig", "TomoeForCausalLM", "export_model", "export_run", "save_export"]
