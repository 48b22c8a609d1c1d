"""Build a tiny random Llama model, offline, for the real-engine tests.

No hub is reachable here, so the model is made from nothing: a byte-level BPE tokenizer trained
on a fixed local text, a 2-layer Llama with random weights (seeded, so every build is the same),
and a chat template. Its answers are gibberish, but vLLM loads and serves it like any Llama, in
seconds and a few hundred MB. Run with the vLLM venv's python (it has torch, transformers and
tokenizers): `python scripts/make_tiny_model.py DIR`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<unk>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CORPUS = """\
kvsleep sits in front of your vLLM and SGLang engines, routes OpenAI-compatible requests by
their model, and puts idle engines to sleep so their GPU memory goes back to the pool. A request
for a sleeping model is held, not dropped, while kvsleep wakes the engine. Hello, how are you?
The quick brown fox jumps over the lazy dog. Once upon a time there was a small model that
answered every question with random words. One two three four five six seven eight nine ten.
user assistant system: Say hello. Tell me a story. What is the capital of France? Paris.
"""


def build(out: Path) -> None:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 512

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)


if __name__ == "__main__":
    build(Path(sys.argv[1]))
