"""The embedded default models: LLaVA- and Bunny-shaped MLLMs sized for 2 CPU cores.

They are plain `LlavaForConditionalGeneration` models with a tokenizer built from the
synthetic world's vocabulary, so every stage of the harness runs on them exactly as
it runs on LLaVA-v1.5-7B or Bunny-v1.0-3B.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers import decoders as tk_decoders
from tokenizers.models import WordLevel

from harness.errors import HarnessError
from harness.synthetic import world

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]

# LLaVA-v1.5's conversation format ("USER: ... ASSISTANT: ...</s>") without a system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{{ '\n' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %} "
    "{% else %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{{ item['text'] }}{% endfor %}{% endif %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tokenizer():
    """A word-level tokenizer over the world's vocabulary, with a SentencePiece-like space marker."""
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)]
    )
    pieces = set()
    for text in world.vocabulary_texts():
        pieces.update(tok for tok, _ in pre.pre_tokenize_str(text.lower()))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for piece in sorted(pieces):
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Replace("\n", " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre
    tok.decoder = tk_decoders.Metaspace()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=512,
    )


@dataclass(frozen=True)
class EmbeddedSpec:
    """How one embedded model is shaped; `text` and `vision` are transformers config kwargs."""

    name: str
    vision_type: str  # "clip_vision_model" | "siglip_vision_model"
    text_type: str  # "llama" | "phi" | "mistral" | "qwen2"
    feature_strategy: str  # "default" drops CLS (CLIP); "full" keeps all tokens (SigLIP)
    text: dict = field(default_factory=dict)
    vision: dict = field(default_factory=dict)
    # A pretrained language model (`harness.models.base`) instead of a random one shaped by `text`.
    base_lm: str | None = None


_VISION = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
               image_size=world.IMAGE_SIZE, patch_size=world.CELL)
_LM = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=12, num_attention_heads=8,
           max_position_embeddings=512, tie_word_embeddings=False)

EMBEDDED: dict[str, EmbeddedSpec] = {
    "tiny-llava": EmbeddedSpec("tiny-llava", "clip_vision_model", "llama", "default",
                               text=dict(_LM, num_key_value_heads=8, rms_norm_eps=1e-5), vision=_VISION),
    "tiny-bunny": EmbeddedSpec("tiny-bunny", "siglip_vision_model", "phi", "full",
                               # Phi's partial rotary leaves 3 of a 12-wide head's frequencies: 1,
                               # 0.32, 0.10 rad a token at rope_theta 30. At 10000 (1, 0.046, 0.002)
                               # tiny-bunny answered position questions at chance; 30 beat 100
                               # (docs/teachers.md, teacher quality).
                               text=dict(_LM, num_key_value_heads=8, partial_rotary_factor=0.5, rope_theta=30.0,
                                         resid_pdrop=0.0, embd_pdrop=0.0), vision=_VISION),
    # The embedded study on a real pretrained language model: SmolLM2-135M-Instruct (30 layers, GQA).
    "smol-llava": EmbeddedSpec("smol-llava", "clip_vision_model", "llama", "default", vision=_VISION,
                               base_lm="smollm2-135m-instruct"),
    # Test-only variants: grouped-query attention in the Llama and Qwen2 styles.
    "tiny-llava-gqa": EmbeddedSpec("tiny-llava-gqa", "clip_vision_model", "mistral", "default",
                                   text=dict(_LM, num_key_value_heads=2, sliding_window=None), vision=_VISION),
    "tiny-qwen2": EmbeddedSpec("tiny-qwen2", "siglip_vision_model", "qwen2", "full",
                               text=dict(_LM, num_key_value_heads=4), vision=_VISION),
}


def build_embedded(name: str, seed: int = 0, scale: dict | None = None):
    """A randomly initialised embedded model and its processor.

    `scale` overrides text-config fields (tests use it to shrink the language model). A spec with a
    pretrained `base_lm` takes only `num_hidden_layers` (its first N pretrained layers).
    """
    import torch
    from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration

    spec = EMBEDDED[name]
    if spec.base_lm:
        extra = sorted(set(scale or {}) - {"num_hidden_layers"})
        if extra:
            raise HarnessError(f"{name}'s language model is pretrained: only num_hidden_layers can be scaled, "
                               f"not {', '.join(extra)}")
        return build_on_base(spec, seed=seed, layers=(scale or {}).get("num_hidden_layers"))
    tokenizer = build_tokenizer()
    text_kwargs = {**spec.text, "vocab_size": len(tokenizer), **(scale or {})}
    text_cfg = AutoConfig.for_model(
        spec.text_type, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **text_kwargs
    )
    vision_cfg = AutoConfig.for_model(spec.vision_type, **spec.vision)
    n_patches = (world.IMAGE_SIZE // world.CELL) ** 2
    config = LlavaConfig(
        vision_config=vision_cfg.to_dict(), text_config=text_cfg.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy=spec.feature_strategy, image_seq_length=n_patches,
        tie_word_embeddings=False,
    )
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model, build_processor(spec, tokenizer)


def build_processor(spec: EmbeddedSpec, tokenizer):
    from transformers import CLIPImageProcessor, LlavaProcessor, SiglipImageProcessor

    size = world.IMAGE_SIZE
    if spec.vision_type == "clip_vision_model":
        image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        extra = 1  # the CLS token, dropped by the "default" strategy
    else:
        image_processor = SiglipImageProcessor(size={"height": size, "width": size})
        extra = 0
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=world.CELL,
        vision_feature_select_strategy=spec.feature_strategy, num_additional_image_tokens=extra,
        chat_template=CHAT_TEMPLATE,
    )


# --- embedded models on a pretrained language model (smol-llava) -------------------------------------

# SmolLM2's ChatML turns, with image items; no default system prompt (it would add ~20 tokens to
# every sample for nothing the synthetic world asks).
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}{{ '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{{ '\n' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\n' }}{% endif %}"
)


def build_smol_llava(seed: int = 0, layers: int | None = None, base_dir=None):
    """smol-llava: a CLIP tower and 2-layer GELU projector (random, seeded) on SmolLM2-135M-Instruct."""
    return build_on_base(EMBEDDED["smol-llava"], seed=seed, layers=layers, base_dir=base_dir)


def build_on_base(spec: EmbeddedSpec, seed: int = 0, layers: int | None = None, base_dir=None):
    """A vision tower and 2-layer GELU projector (random, seeded) on the spec's pretrained `base_lm`.

    A native `LlavaForConditionalGeneration` with the base model's tokenizer (plus an `<image>` token,
    whose embedding row is the mean of the others) and ChatML turns. The language model's
    weights are the pretrained ones (`harness.models.base`), or with `layers` its first N decoder
    layers (tests use a truncated copy). Returns (model, processor).
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

    from harness.models.base import base_lm_dir

    base = base_dir or base_lm_dir(spec.base_lm)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.padding_side = "left"
    tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|endoftext|>"
    lm = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    text = lm.config.to_dict()
    if layers is not None:
        lm.model.layers = lm.model.layers[:layers]
        text["num_hidden_layers"] = layers
    text.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    vision_cfg = AutoConfig.for_model(spec.vision_type, **spec.vision)
    config = LlavaConfig(
        vision_config=vision_cfg.to_dict(), text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy=spec.feature_strategy,
        image_seq_length=(world.IMAGE_SIZE // world.CELL) ** 2, tie_word_embeddings=text["tie_word_embeddings"],
    )
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    embed = lm.get_input_embeddings().weight.detach()
    state = {f"model.language_model.{k.removeprefix('model.')}": v for k, v in lm.state_dict().items()
             if k.startswith("model.")}
    state["model.language_model.embed_tokens.weight"] = torch.cat([embed, embed.mean(0, keepdim=True)])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(k.startswith("model.language_model.") for k in missing):
        raise RuntimeError(f"{spec.name}: language-model weights did not fit ({unexpected[:3]}, {missing[:3]})")
    model.tie_weights()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    processor = build_processor(spec, tokenizer)
    processor.chat_template = CHATML_TEMPLATE
    return model, processor
