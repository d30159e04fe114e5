"""Where things live inside each language-model family, so no other code hard-codes module paths.

Pruning, LoRA targeting and distillation ask the adapter for decoder layers, attention
and MLP projections; adding a family means adding one `Family` entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from harness.errors import HarnessError


@dataclass(frozen=True)
class Family:
    """Names of the projections in one decoder layer. `*_in` are sliced by rows, `*_out` by columns."""

    attn_in: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    attn_out: str = "o_proj"
    mlp_in: tuple[str, ...] = ("gate_proj", "up_proj")
    mlp_out: str = "down_proj"
    attn: str = "self_attn"
    mlp: str = "mlp"
    final_norm: str = "norm"  # the decoder's norm after the last layer
    # Why the attention head count cannot change (None: it can), e.g. an attention class that derives
    # head_dim from hidden_size / num_heads, so a checkpoint with fewer heads would not load.
    heads_fixed: str | None = None


LLAMA_LIKE = Family()
FAMILIES = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    # Qwen2.5-VL's language model: Qwen2 with multimodal rotary positions
    "qwen2_5_vl_text": Family(heads_fixed="Qwen2.5-VL's attention takes head_dim = hidden_size / num_heads, so a "
                                          "checkpoint with fewer heads would not load: width pruning removes MLP "
                                          "channels only"),
    "phi": Family(attn_out="dense", mlp_in=("fc1",), mlp_out="fc2", final_norm="final_layernorm"),
}


@dataclass(frozen=True)
class Layout:
    """One multimodal class: its transformers name and where it keeps its parts (attribute paths)."""

    cls: str
    decoder: str = "model.language_model"  # the language model's base decoder (layers, final norm)
    vision_tower: str = "model.vision_tower"
    projector: str = "model.multi_modal_projector"
    # Other parameters with one value per hidden channel (sliced with the hidden size), e.g. LLaVA-OneVision's
    # learned newline token that ends each row of image tokens.
    hidden_params: tuple[str, ...] = ()


# The multimodal classes whose module layout the adapter knows (config `model_type` -> layout). LLaVA-1.5,
# Bunny after `harness convert bunny` and every embedded teacher are `LlavaForConditionalGeneration`.
MLLM_CLASSES = {
    "llava": Layout("LlavaForConditionalGeneration"),
    "llava_onevision": Layout("LlavaOnevisionForConditionalGeneration",  # SigLIP + Qwen2
                              hidden_params=("model.image_newline",)),
    "internvl": Layout("InternVLForConditionalGeneration"),  # InternViT + Qwen2 / Llama
    "idefics3": Layout("Idefics3ForConditionalGeneration", decoder="model.text_model",  # SigLIP + Llama (SmolVLM)
                       vision_tower="model.vision_model", projector="model.connector"),
    # Qwen2.5-VL keeps its projector (the patch merger) inside its vision tower.
    "qwen2_5_vl": Layout("Qwen2_5_VLForConditionalGeneration", vision_tower="model.visual",
                         projector="model.visual.merger"),
}


def check_mllm(model_type: str, where: object) -> None:
    """One clear error for a multimodal family the harness does not know (before transformers fails deep inside)."""
    if model_type not in MLLM_CLASSES:
        known = ", ".join(f"{t} ({layout.cls})" for t, layout in MLLM_CLASSES.items())
        raise HarnessError(f"{where} is a {model_type!r} model; supported multimodal families: {known} "
                           f"(adding one: docs/design.md)")


def mllm_class(model_type: str) -> type:
    """The transformers class of a multimodal `model_type` (checked)."""
    import transformers

    check_mllm(model_type, "this checkpoint")
    return getattr(transformers, MLLM_CLASSES[model_type].cls)


def mllm_config(config: dict):
    """A config object from a multimodal config dict, of the class its `model_type` names.

    `Cls(**d)` is `Cls.from_dict(d)` without the log line that serialises the whole config."""
    from transformers import CONFIG_MAPPING

    check_mllm(config.get("model_type"), "this config")
    return CONFIG_MAPPING[config["model_type"]](**config)


def _attr(root: nn.Module, path: str) -> nn.Module:
    for name in path.split("."):
        root = getattr(root, name)
    return root


class LMAdapter:
    """Uniform view of the language model inside a multimodal model of a known layout (`MLLM_CLASSES`)."""

    def __init__(self, model: nn.Module):
        check_mllm(model.config.model_type, type(model).__name__)
        self.model = model
        self.layout = MLLM_CLASSES[model.config.model_type]
        self.config = model.config.text_config
        self.family_name = self.config.model_type
        if self.family_name not in FAMILIES:
            raise HarnessError(
                f"unsupported language-model family {self.family_name!r}; supported: {', '.join(sorted(FAMILIES))}"
            )
        self.family = FAMILIES[self.family_name]

    @property
    def decoder(self) -> nn.Module:
        """The base decoder (embeddings, layers, final norm), without the LM head."""
        return _attr(self.model, self.layout.decoder)

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    @property
    def final_norm(self) -> nn.Module:
        return getattr(self.decoder, self.family.final_norm)

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    @property
    def projector(self) -> nn.Module:
        return _attr(self.model, self.layout.projector)

    @property
    def vision_tower(self) -> nn.Module:
        """The vision encoder; in some layouts (Qwen2.5-VL) the projector is one of its submodules."""
        return _attr(self.model, self.layout.vision_tower)

    @property
    def projector_in_tower(self) -> bool:
        return self.layout.projector.startswith(self.layout.vision_tower + ".")

    def attn(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.family.attn)

    def mlp(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.family.mlp)

    def attn_linears(self, layer: nn.Module) -> tuple[list[nn.Linear], nn.Linear]:
        a = self.attn(layer)
        return [getattr(a, n) for n in self.family.attn_in], getattr(a, self.family.attn_out)

    def mlp_linears(self, layer: nn.Module) -> tuple[list[nn.Linear], nn.Linear]:
        m = self.mlp(layer)
        return [getattr(m, n) for n in self.family.mlp_in], getattr(m, self.family.mlp_out)

    @property
    def hidden_params(self) -> list[nn.Parameter]:
        """The layout's extra parameters indexed by hidden channel (`Layout.hidden_params`)."""
        return [_attr(self.model, path) for path in self.layout.hidden_params]

    @property
    def lora_target(self) -> str:
        """peft `target_modules` regex: every decoder linear, in the layers of this layout's decoder only."""
        decoder = self.layout.decoder.split(".")[-1]
        return rf".*{decoder}\.layers\.\d+\..*\.({'|'.join(self.linear_names)})$"

    @property
    def linear_names(self) -> list[str]:
        """Leaf names of every decoder linear layer (LoRA targets)."""
        f = self.family
        return [*f.attn_in, f.attn_out, *f.mlp_in, f.mlp_out]

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.num_heads

    def lm_parameters(self) -> int:
        """Parameters of the language model, embeddings and LM head included (the paper's LM size).

        A tied LM head (SmolLM2's) is the embedding matrix itself and counts once."""
        params = {id(p): p for p in (*self.decoder.parameters(), self.lm_head.weight)}
        return sum(p.numel() for p in params.values())
