"""A real, tiny byte-level BPE tokenizer for tests, written the way the Hub lays tokenizers out.

`write_tiny_tokenizer(folder)` trains a BPE model on a few English paragraphs (well under a second)
and writes tokenizer.json, tokenizer_config.json and special_tokens_map.json, so that both
transformers' AutoTokenizer and our Tokenizer can load the folder and be compared.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# Our own short corpus: plain English with digits and punctuation, enough to learn a few hundred
# merges. Changing it changes every token id, so leave it alone unless tests are updated too.
CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog did not mind at all.",
    "A small model can learn a lot when the data is clean and the task is clear.",
    "Fine-tuning with low-rank adapters trains only a few extra weights, not the whole network.",
    'She said: "Write the answer in one line, please." He wrote 42 and went home.',
    "Tokens are pieces of text; a tokenizer turns text into tokens and back again.",
    "On Monday the weather was cold, on Tuesday it rained, and on Friday the sun came out.",
    "What is the capital of France? The capital of France is Paris.",
    "User: hello there! Assistant: Hello! How can I help you today?",
    "Numbers like 1, 2, 3, 10, 100 and 2024 appear in text all the time.",
    "The system prompt tells the assistant how to behave during the conversation.",
    "Keep the learning rate small, save checkpoints often, and watch the validation loss.",
    "Apples, oranges and bananas are fruit; carrots and potatoes are vegetables.",
]

CHATML_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

# ChatML with a default system prompt when the conversation has none (as SmolLM2 and Qwen2 do).
# Written over several lines on purpose: it only renders right with trim_blocks and lstrip_blocks.
CHATML_TEMPLATE = """{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
{{ '<|im_start|>system\\nYou are a small, helpful assistant.<|im_end|>\\n' }}{% endif %}
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}
{% if add_generation_prompt %}
{{ '<|im_start|>assistant\\n' }}{% endif %}
"""

# Llama-3 style: BOS written by the template, headers around roles, tools shown as JSON, and
# raise_exception for a role it does not know.
LLAMA3_TEMPLATE = """{{ bos_token }}{% if tools %}
{{ '<|start_header_id|>system<|end_header_id|>\\n\\nYou may call these tools:\\n' }}{% for tool in tools %}
{{ tool | tojson(indent=2) + '\\n' }}{% endfor %}
{{ '<|eot_id|>' }}{% endif %}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}
{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
{{- message['content'] | trim + '<|eot_id|>' }}{% endfor %}
{% if add_generation_prompt %}
{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}
"""


def _train(special: list[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on CORPUS; special tokens take the first ids."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        # Every byte gets an id, so any unicode text encodes without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def write_tiny_tokenizer(folder, template: str = "chatml", vocab_size: int = 512) -> None:
    """Write a tiny tokenizer folder that transformers and ondevice_lora both load.

    template: "chatml" (SmolLM2/Qwen-style special tokens, no BOS added by encode) or "llama3"
    (Llama-3 special tokens, BOS added by a TemplateProcessing post-processor).
    vocab_size: total ids including the 256 byte tokens and the special tokens.
    """
    if template == "chatml":
        # The same choice of special tokens as SmolLM2-Instruct.
        special, bos, eos, pad, unk = (
            CHATML_SPECIAL,
            "<|im_start|>",
            "<|im_end|>",
            "<|im_end|>",
            "<|endoftext|>",
        )
        chat_template = CHATML_TEMPLATE
    elif template == "llama3":
        special, bos, eos, pad, unk = (
            LLAMA3_SPECIAL,
            "<|begin_of_text|>",
            "<|eot_id|>",
            "<|end_of_text|>",
            None,
        )
        chat_template = LLAMA3_TEMPLATE
    else:
        raise ValueError(f"template must be 'chatml' or 'llama3', got {template!r}")
    if vocab_size < 256 + len(special):
        raise ValueError(f"vocab_size must be at least {256 + len(special)}, got {vocab_size}")

    tok = _train(special, vocab_size)
    if template == "llama3":
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, bos_id)],
        )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))

    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in special
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "unk_token": unk,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "chat_template": chat_template,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {"bos_token": bos, "eos_token": eos, "pad_token": pad}
    if unk is not None:
        special_map["unk_token"] = unk
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
