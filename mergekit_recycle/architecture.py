"""Architectures: which ones a pool may hold, how a checkpoint's tensor names become the model's,
and the mergekit definitions corrected where transformers 5 no longer saves what they require.

A checkpoint names its tensors as it was saved (GPT-NeoX's output head is `embed_out.weight`,
an old GPT-2 has no `transformer.` prefix); the model transformers 5 builds may name them
otherwise (`lm_head.weight`). `tensor_map` renames each checkpoint tensor with transformers' own
loading rules (its checkpoint conversion mappings and base-model prefix), so the resident merge
writes every tensor where `from_pretrained` would have loaded it, and says which parameters
nothing writes.

SUPPORTED is the architecture matrix that tests/test_architectures.py checks end to end: the
resident merge equals mergekit's merge loaded by AutoModelForCausalLM, its scores equal lm-eval's,
and `optimize` runs to a merged model.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, NamedTuple, Optional, Tuple

from mergekit_recycle.errors import shorten


class Architecture(NamedTuple):
    """One tested architecture: transformers' class name, the family users know, what was corrected."""

    name: str
    model_type: str  # transformers' name of its config
    family: str
    correction: Optional[str] = None


SUPPORTED: Dict[str, Architecture] = {a.name: a for a in [
    Architecture("LlamaForCausalLM", "llama", "Llama"),
    Architecture("MistralForCausalLM", "mistral", "Mistral"),
    Architecture("Qwen2ForCausalLM", "qwen2", "Qwen2, Qwen2.5 (tied embeddings too)"),
    Architecture("Qwen3ForCausalLM", "qwen3", "Qwen3"),
    Architecture("GemmaForCausalLM", "gemma", "Gemma"),
    Architecture("Gemma2ForCausalLM", "gemma2", "Gemma 2"),
    Architecture("Phi3ForCausalLM", "phi3", "Phi-3, Phi-4"),
    Architecture("PhiForCausalLM", "phi", "Phi-1, Phi-2"),
    Architecture("GPTNeoXForCausalLM", "gpt_neox", "GPT-NeoX, Pythia",
                 "mergekit 0.1.5 requires the per-layer buffers attention.bias, attention.masked_bias and "
                 "attention.rotary_emb.inv_freq, which transformers 5 recomputes and no longer saves: they are "
                 "dropped from its definition. The output head is stored as embed_out.weight and loaded as "
                 "lm_head.weight: the resident merge renames it as transformers does"),
    Architecture("GPT2LMHeadModel", "gpt2", "GPT-2"),
    Architecture("Olmo2ForCausalLM", "olmo2", "OLMo 2"),
    Architecture("StableLmForCausalLM", "stablelm", "StableLM 2"),
    Architecture("Starcoder2ForCausalLM", "starcoder2", "StarCoder2"),
    Architecture("CohereForCausalLM", "cohere", "Command R (Cohere)",
                 "mergekit 0.1.5 requires self_attn.q_norm and k_norm, which exist only with use_qk_norm: "
                 "they are marked optional"),
]}

# Per architecture: tensor-name patterns that transformers 5 recomputes and mergekit 0.1.5 still
# requires (dropped from the definition), and ones it requires although configs may leave them out
# (marked optional).
_DROPPED = {"GPTNeoXForCausalLM": r"\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)$"}
_OPTIONAL = {"CohereForCausalLM": r"\.self_attn\.(q_norm|k_norm)\.weight$"}


def supported_list() -> str:
    return ", ".join(SUPPORTED)


def describe_architectures(found: Mapping[str, str]) -> str:
    """What `validate` says of the pool's architectures (recipe field -> architecture, local entries only)."""
    lines = []
    for architecture in sorted(set(found.values())):
        known = SUPPORTED.get(architecture)
        where = ", ".join(location for location, name in found.items() if name == architecture)
        state = (f"tested ({known.family})" + (f"; mergekit's definition corrected: {known.correction}" if known.correction else "")
                 if known else "NOT tested: allowed by merge.allow_untested_architecture")
        lines.append(f"arch     {architecture} ({where}): {state}")
    if not found:
        lines.append("arch     checked when the Hub entries are pulled")
    lines.append(f"         tested architectures: {supported_list()}")
    return "\n".join(lines)


def read_architecture(folder: Path) -> str:
    """The architecture a checkpoint folder's config.json names; OSError when it cannot be read, ValueError
    (saying what is wrong, as a sentence about config.json) when it is not a config transformers could use."""
    text = (folder / "config.json").read_text(encoding="utf-8")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"config.json is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(config, dict):
        raise ValueError(f"config.json holds a JSON {_json_kind(config)} where transformers expects an object of settings")
    return config_architecture(config)


def config_architecture(config: Mapping) -> str:
    """`architectures` joined by commas; the `model_type` when it is missing or empty (ValueError when it is
    something else than a list of class names, which transformers would fail on later, naming no file)."""
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures and all(isinstance(a, str) for a in architectures):
        return ",".join(architectures)
    if architectures not in (None, []):
        shown = shorten(json.dumps(architectures), 60)
        raise ValueError(f'config.json field "architectures" is {shown}; expected a list of model class names, '
                         'such as ["LlamaForCausalLM"]')
    model_type = config.get("model_type")
    return model_type if isinstance(model_type, str) and model_type else "unknown"


def config_problem(exc: Exception) -> str:
    """What read_architecture found wrong with a checkpoint's config.json, and how to fix it, as one clause."""
    reason = str(exc) if str(exc).startswith("config.json") else \
        f"cannot read config.json ({exc.strerror if isinstance(exc, OSError) and exc.strerror else exc})"
    return f"{reason}: fix it, or copy in the config.json saved with these weights"


def _json_kind(value) -> str:
    return {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), "null")


def unsupported_reason(architecture: str) -> Optional[str]:
    """Why a pool of `architecture` is refused (None when it is in the tested matrix)."""
    if architecture in SUPPORTED:
        return None
    return (f"architecture {architecture} is not one mergekit-recycle has tested (supported: {supported_list()}); "
            "set `merge.allow_untested_architecture: true` in the recipe to try it anyway")


@dataclass(frozen=True)
class TensorMap:
    """Where a checkpoint's tensors go in a model built by transformers.

    `targets`: checkpoint tensor -> the model's state-dict key it is loaded into (one per parameter:
    a tied parameter is written once, through the first name the model gives it).
    `left_out`: checkpoint tensors the model does not load (buffers it recomputes, a tied copy).
    `converted`: checkpoint tensors transformers only loads through a tensor conversion (fused
    experts, split projections), which a name-by-name merge cannot reproduce.
    `unwritten`: model parameters that no checkpoint tensor writes.
    """

    architecture: str
    targets: Dict[str, str]
    left_out: Tuple[str, ...]
    converted: Tuple[str, ...]
    unwritten: Tuple[str, ...]

    def refusal(self) -> Optional[str]:
        """One line on why merging into the model would leave it partly unmerged; None when it would not."""
        if not self.unwritten:
            return None
        shown = ", ".join(self.unwritten[:4]) + (f" and {len(self.unwritten) - 4} more" if len(self.unwritten) > 4 else "")
        why = (f"; transformers converts {', '.join(self.converted[:2])} before loading it, which a tensor-by-tensor "
               "merge does not do" if self.converted else "")
        if not self.targets:
            why += "; none of the checkpoint's tensors is one of this model's: is config.json the one saved with them?"
        return f"the {self.architecture} model has parameters no checkpoint tensor writes: {shown}{why}"


def tensor_map(model, checkpoint_tensors: Iterable[str]) -> TensorMap:
    """Map checkpoint tensor names to `model`'s, as `from_pretrained` would load them."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    state = model.state_dict()
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    # One canonical name per parameter: tied ones share a tensor, and are written once.
    canonical: Dict[int, str] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        canonical.setdefault(id(parameter), name)
    parameter_of = {name: id(p) for name, p in model.named_parameters(remove_duplicate=False)}

    targets: Dict[str, str] = {}
    left_out: List[str] = []
    converted: List[str] = []
    writer: Dict[int, str] = {}  # parameter -> the checkpoint tensor written into it
    for name in sorted(checkpoint_tensors, key=_natural_key):
        renamed, conversion = rename_source_key(name, renamings, converters, model.base_model_prefix, state)
        if renamed not in state and name in state:  # as transformers: a key the model has is kept as it is
            renamed, conversion = name, None
        if conversion is not None:
            converted.append(name)
        elif renamed not in state:
            left_out.append(name)
        elif renamed not in parameter_of:  # a persistent buffer: loaded as it is
            targets[name] = renamed
        else:
            identity = parameter_of[renamed]
            earlier = writer.get(identity)
            if earlier is not None and (targets[earlier] == canonical[identity] or renamed != canonical[identity]):
                left_out.append(name)  # a tied copy (lm_head.weight next to the embedding): written once
                continue
            if earlier is not None:
                left_out.append(earlier)
                del targets[earlier]
            targets[name] = renamed
            writer[identity] = name
    unwritten = [name for identity, name in canonical.items() if identity not in writer]
    return TensorMap(architecture=type(model).__name__, targets=targets, left_out=tuple(left_out),
                     converted=tuple(converted), unwritten=tuple(unwritten))


def _natural_key(text: str) -> Tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


# -- mergekit's definitions, corrected ----------------------------------------------------------

def correct_mergekit_definitions() -> None:
    """Replace mergekit 0.1.5's definitions of the architectures in _DROPPED and _OPTIONAL with corrected
    copies, in mergekit's own registry of JSON architectures. Idempotent."""
    from mergekit.architecture import json_definitions

    for name in set(_DROPPED) | set(_OPTIONAL):
        definitions = json_definitions.NAME_TO_ARCH.get(name)
        if not definitions:
            continue
        corrected = [_corrected(definition, _DROPPED.get(name), _OPTIONAL.get(name)) for definition in definitions]
        json_definitions.NAME_TO_ARCH[name] = corrected
        for old, new in zip(definitions, corrected):
            if old in json_definitions.JSON_ARCHITECTURES:
                json_definitions.JSON_ARCHITECTURES[json_definitions.JSON_ARCHITECTURES.index(old)] = new


def _corrected(architecture, dropped: Optional[str], optional: Optional[str]):
    from mergekit.architecture.base import ModuleDefinition
    from mergekit.architecture.json_definitions import JsonModuleArchitecture

    def fix(weights):
        kept = [w for w in weights if not (dropped and re.search(dropped, w.name))]
        return [w.model_copy(update={"optional": True}) if optional and re.search(optional, w.name) else w for w in kept]

    modules = {}
    for key, module in architecture.modules.items():
        info = module.architecture
        if not isinstance(info, JsonModuleArchitecture):
            modules[key] = module
            continue
        definition = info.definition
        fixed = definition.model_copy(update={
            "pre_weights": fix(definition.pre_weights),
            "post_weights": fix(definition.post_weights),
            "layer_templates": definition.layer_templates.model_copy(
                update={"weights": fix(definition.layer_templates.weights)}),
        })
        modules[key] = ModuleDefinition(architecture=JsonModuleArchitecture(definition=fixed),
                                        weight_prefix=module.weight_prefix, subfolder=module.subfolder)
    return architecture.model_copy(update={"modules": modules})
