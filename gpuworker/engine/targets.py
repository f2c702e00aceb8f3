"""Which modules get LoRA layers: the spec's short names (q, k, v, o, gate, up, down, all) mapped
onto each architecture's own module names.

Architectures name their projections differently (Llama's `q_proj`, GPT-NeoX's fused
`query_key_value`, Phi-3's fused `qkv_proj`), so a short name means "whatever module computes
that projection here". Fused modules serve several short names; asking for q alone on Phi-3
therefore trains the whole fused qkv projection, which is the closest the model allows.
"""

from __future__ import annotations

from torch import nn

from gpuworker.errors import EngineError

_LLAMA_LIKE = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
               "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}

# config.model_type -> short name -> module name (None: this architecture has no such module).
PROJECTION_TABLE: dict[str, dict[str, str | None]] = {
    **{t: _LLAMA_LIKE for t in (
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "granite",
        "olmo", "olmo2", "cohere", "smollm3", "stablelm", "helium")},
    "phi3": {"q": "qkv_proj", "k": "qkv_proj", "v": "qkv_proj", "o": "o_proj",
             "gate": "gate_up_proj", "up": "gate_up_proj", "down": "down_proj"},
    "phi": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "dense",
            "gate": None, "up": "fc1", "down": "fc2"},
    "starcoder2": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                   "gate": None, "up": "c_fc", "down": "c_proj"},
    "gpt_neox": {"q": "query_key_value", "k": "query_key_value", "v": "query_key_value",
                 "o": "dense", "gate": None, "up": "dense_h_to_4h", "down": "dense_4h_to_h"},
    "gptj": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj",
             "gate": None, "up": "fc_in", "down": "fc_out"},
    "opt": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj",
            "gate": None, "up": "fc1", "down": "fc2"},
    "falcon": {"q": "query_key_value", "k": "query_key_value", "v": "query_key_value",
               "o": "dense", "gate": None, "up": "dense_h_to_4h", "down": "dense_4h_to_h"},
}


def _linear_types() -> tuple[type[nn.Module], ...]:
    # GPT-2 style models use transformers' Conv1D (a linear layer with transposed weights);
    # bitsandbytes' quantised layers subclass nn.Linear.
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def _linear_leaf_names(model: nn.Module) -> dict[str, int]:
    """Last name component of every linear layer, with how many modules carry it; the output
    head (lm_head, or whatever the model says it is) is left out, as LoRA on it is rarely wanted
    and it is huge."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear = _linear_types()
    names: dict[str, int] = {}
    for full_name, module in model.named_modules():
        if not isinstance(module, linear) or module is head:
            continue
        leaf = full_name.rsplit(".", 1)[-1]
        if leaf == "lm_head":
            continue
        names[leaf] = names.get(leaf, 0) + 1
    return names


def resolve_target_modules(model: nn.Module, requested: list[str]) -> list[str]:
    """The module names peft should wrap for the spec's `target_modules`, in a stable order.

    Raises EngineError when the architecture is unknown (for short names), when it lacks a
    requested projection, or when none of the names exist in the loaded model.
    """
    present = _linear_leaf_names(model)
    model_type = str(getattr(getattr(model, "config", None), "model_type", "") or "unknown")
    if "all" in requested:
        if not present:
            raise EngineError(f"the {model_type} model has no linear layers to put LoRA on")
        return sorted(present)

    table = PROJECTION_TABLE.get(model_type)
    if table is None:
        known = ", ".join(sorted(PROJECTION_TABLE))
        raise EngineError(
            f"lorafleet does not know which modules are q/k/v/o/gate/up/down in a '{model_type}' "
            f"model; set target_modules to 'all' (every linear layer except the output head) "
            f"or use a supported architecture ({known})")
    names: list[str] = []
    for short in requested:
        mapped = table.get(short)
        if mapped is None:
            raise EngineError(f"a '{model_type}' model has no '{short}' projection; choose from "
                              f"{', '.join(k for k, v in table.items() if v)} or all")
        if mapped not in names:
            names.append(mapped)
    missing = [n for n in names if n not in present]
    if missing:
        raise EngineError(f"the loaded '{model_type}' model has no linear modules named "
                          f"{', '.join(missing)}; set target_modules to 'all' instead")
    return names


def projections_label(module_names: list[str]) -> str:
    """Human-readable list of trained projections, like text-generation-webui's log: 'q, v'."""
    return ", ".join(n.replace("_proj", "") for n in module_names)
