"""State dicts of sparsified layers in the plain layout: a plain model loads them, a sparsified one resumes exactly.

A sparsified layer's ``state_dict()`` holds the keys of the plain layer it came from: ``weight`` is
the masked weight (what the layer computes with), so ``nn.Linear``/``nn.Conv2d`` models and
Hugging Face ``from_pretrained`` load it strictly. What exact resumption also needs (the dense
weight, whose pruned entries SR-STE may regrow, the mask, the step counters) rides in the state dict's
``_metadata`` under the layer's prefix, key ``"nmsparse"``; ``torch.save`` and
``torch.load(weights_only=True)`` keep it, plain layers ignore it. A state dict rebuilt as a new
dict (``{k: v for ...}``) or stored as safetensors loses it: loading such one into a sparsified
layer recomputes the mask from the loaded (masked) weight, keeps the step counters, and warns.
Older checkpoints with ``parametrizations.*`` and ``sdgp_step`` keys still load as they are, and
FSDP2-sharded (DTensor) weights keep that layout (squash an unsharded model to export it).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

from .weight import find_parametrization

META = "nmsparse"
_PARAM_KEYS = ("original", "0.mask", "0.step")
_NO_META = ("nmsparse: a state dict without nmsparse's sparsity state was loaded into sparsified layers: their masks "
            "were recomputed from the loaded (masked) weights and their step counters kept. To resume exactly, "
            "save and load the state_dict() object itself (torch.save / torch.load keep the state; a dict rebuilt "
            "from its items or a safetensors file does not)")


def _is_sharded(t) -> bool:
    """A DTensor (FSDP2, tensor parallel): its masks cannot be computed shard-locally here."""
    return hasattr(t, "placements") and hasattr(t, "to_local")


def _masked_weight(module: nn.Module, tensor: str, p) -> torch.Tensor:
    """The weight the layer computes with outside training (its eval mask), read without counting a step."""
    original = getattr(module.parametrizations, tensor).original.detach()
    with torch.no_grad():
        return original * p.eval_mask(original)


# The hooks look their parametrization up on the module they are called for: a deepcopy of a
# model shares the hook functions but not the parametrizations.

def _save_weight(tensor: str):
    def hook(module, state_dict, prefix, local_metadata):
        p = find_parametrization(module, tensor)
        base = f"{prefix}parametrizations.{tensor}."
        if base + "original" not in state_dict or _is_sharded(state_dict[base + "original"]):
            return  # FSDP2's sharded (DTensor) weights keep the parametrization layout for its own loaders
        dense = state_dict.pop(base + "original")
        mask = state_dict.pop(base + "0.mask")
        step = state_dict.pop(base + "0.step")
        for sub in ("parametrizations", f"parametrizations.{tensor}", f"parametrizations.{tensor}.0"):
            getattr(state_dict, "_metadata", {}).pop(prefix + sub, None)
        state_dict[prefix + tensor] = _masked_weight(module, tensor, p)
        # The dense weight too: SR-STE's pruned entries can regrow, and a resumed run matches bit for bit.
        local_metadata.setdefault(META, {})[tensor] = {"dense": dense, "mask": mask, "step": step}
    return hook


def _load_weight(tensor: str):
    def hook(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        p = find_parametrization(module, tensor)
        key, base = prefix + tensor, f"{prefix}parametrizations.{tensor}."
        if key not in state_dict or base + "original" in state_dict:
            return  # the older layout (or nothing for this layer): loaded as it is
        weight = state_dict.pop(key)
        entry = local_metadata.get(META, {}).get(tensor)
        if entry is None:
            warnings.warn(_NO_META, stacklevel=4)
            state_dict[base + "original"] = weight
            with torch.no_grad():
                state_dict[base + "0.mask"] = p.initial_mask(weight)
            state_dict[base + "0.step"] = p.step.detach().clone()
            return
        state_dict[base + "original"] = entry["dense"]
        state_dict[base + "0.mask"] = entry["mask"]
        state_dict[base + "0.step"] = entry["step"]
    return hook


def _save_sdgp(module, state_dict, prefix, local_metadata):
    weight = state_dict.get(prefix + "weight", state_dict.get(prefix + "parametrizations.weight.original"))
    if _is_sharded(weight):
        return  # sharded by FSDP2: the whole layer keeps the earlier layout
    step = state_dict.pop(prefix + "sdgp_step", None)
    if step is not None:
        local_metadata.setdefault(META, {})["sdgp_step"] = step


def _load_sdgp(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    step = local_metadata.get(META, {}).get("sdgp_step")
    if step is not None and prefix + "sdgp_step" not in state_dict:
        state_dict[prefix + "sdgp_step"] = step


def plain_layout(module: nn.Module, tensor: str | None = None) -> None:
    """Give a converted layer the plain state-dict layout: its weight parametrization on `tensor`, or
    (tensor None) an SDGP layer's step counter. Called by sparsify's handlers; undone by squash."""
    handles = module.__dict__.setdefault("_nmsparse_state_hooks", [])
    if tensor is None:
        handles += [module.register_state_dict_post_hook(_save_sdgp),
                    module.register_load_state_dict_pre_hook(_load_sdgp)]
    else:
        handles += [module.register_state_dict_post_hook(_save_weight(tensor)),
                    module.register_load_state_dict_pre_hook(_load_weight(tensor))]


def remove_plain_layout(module: nn.Module) -> None:
    """Remove the hooks plain_layout installed (squash does, before the layer becomes plain)."""
    for handle in module.__dict__.pop("_nmsparse_state_hooks", []):
        handle.remove()


def parametrized_tensors(module: nn.Module) -> list[str]:
    """Names of the module's tensors that carry a parametrization."""
    return list(module.parametrizations.keys()) if parametrize.is_parametrized(module) else []
