"""A tiny random Llama (3 layers, GQA 4:2) with a word-level tokenizer, built offline."""

from __future__ import annotations

import re

import pytest
import torch

from vllm_duo.identify import data as D

SEED_WORDS = " ".join([*D._NAMES, *D._PLACES, *D._NOUNS, *D._ADJS, *D._VERBS, *D._ADVS, *D._TEMPLATES,
                       *D.PASSKEY_ALPHABET, *D.ORDINALS, D.NEEDLE, D.QUESTION, D.PROMPT_START, D.PROMPT_END])


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(re.findall(r"\w+|[^\w\s]", SEED_WORDS)))
    vocab = {"[UNK]": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>")


def tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny_llama")
    tok = word_tokenizer()
    tiny_llama(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: one thread is faster, and steadier on a busy 2-core CI box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
