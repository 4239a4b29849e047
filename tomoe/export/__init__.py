"""Export a trained run as a real Mixture-of-Experts checkpoint (Sec. 3.5, App. B).

Importing this package registers the ``tomoe`` model type with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(exported_dir)`` works after ``import tomoe``.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from tomoe.export.configuration_tomoe import TomoeConfig
from tomoe.export.modeling_tomoe import TomoeForCausalLM

AutoConfig.register(TomoeConfig.model_type, TomoeConfig, exist_ok=True)
AutoModelForCausalLM.register(TomoeConfig, TomoeForCausalLM, exist_ok=True)

EXPORT_FORMATS = ("tomoe", "mixtral", "qwen3_moe")


def export_run(run_dir, out_dir, format: str = "tomoe"):
    """Write the run in ``run_dir`` as a Hugging Face model folder ``out_dir``; returns its path."""
    from tomoe.export.build import export_run as _export_run

    return _export_run(run_dir, out_dir, format)


__all__ = ["EXPORT_FORMATS", "TomoeConfig", "TomoeForCausalLM", "export_run"]
