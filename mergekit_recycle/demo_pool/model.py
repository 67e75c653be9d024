"""The demo pool's model: a character-level tokenizer and a tiny transformers Llama (or Qwen2,
Mistral), saved as ordinary Hugging Face checkpoints that AutoTokenizer, mergekit and lm-eval load."""

from pathlib import Path

from mergekit_recycle.demo_pool.skills import CHARACTERS

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def char_tokenizer():
    """A character-level tokenizer built with `tokenizers`, wrapped as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    # lm-eval relies on the tokenizer to add BOS, as Llama's does.
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_input_names=["input_ids", "attention_mask"],
    )


# The architectures a plan may choose: transformers' class and config, and whether the output
# embedding is tied to the input one. Every one of them has a mergekit architecture definition.
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", False),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", True),
    "mistral": ("MistralForCausalLM", "MistralConfig", False),
}


def tiny_model(tokenizer, seed: int, architecture: str = "llama", hidden_size: int = 32, layers: int = 2):
    """A freshly initialised causal LM of `architecture` (a key of ARCHITECTURES), small enough
    to train and merge in seconds: 4 attention heads, an MLP twice as wide as the model."""
    import torch
    import transformers

    model_class, config_class, tied = ARCHITECTURES[architecture]
    extra = {"sliding_window": None} if architecture == "mistral" else {}
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tied,
        **extra,
    )
    torch.manual_seed(seed)
    return getattr(transformers, model_class)(config)


def tiny_llama(tokenizer, seed: int, hidden_size: int = 32, layers: int = 2):
    """A freshly initialised LlamaForCausalLM small enough to train and merge in seconds."""
    return tiny_model(tokenizer, seed, "llama", hidden_size, layers)


def save_checkpoint(model, tokenizer, directory: Path) -> Path:
    """Save as a Hugging Face checkpoint directory: safetensors, config, tokenizer."""
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


# Per transformers model_type: what a tiny config of it needs beyond the shared sizes. The
# architecture matrix (architecture.SUPPORTED) is tested with tiny checkpoints of each.
_TINY_OVERRIDES = {
    "qwen2": {"tie_word_embeddings": True},  # as Qwen2.5's small models
    "mistral": {"sliding_window": None},
    "gemma2": {"head_dim": 8},
    "gpt_neox": {"tie_word_embeddings": False},
}


def tiny_causal_lm(tokenizer, seed: int, model_type: str, hidden_size: int = 32, layers: int = 2):
    """A freshly initialised causal LM of any transformers `model_type` (hidden size ≤ 64), built from
    a config alone, offline: 4 attention heads (2 key-value heads where the architecture has them)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **_TINY_OVERRIDES.get(model_type, {}),
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)
