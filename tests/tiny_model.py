"""A tiny BERT for tests: a WordPiece vocabulary trained on the training sentences of a
CoLA-format folder (the test data of tests/cola_data.py) and a BertConfig of a few thousand
parameters, saved as a local `save_pretrained` folder.

    python tests/tiny_model.py /tmp/tiny-bert /tmp/cola      # build one by hand
"""

from __future__ import annotations

import sys
from pathlib import Path

from cola_data import sentences as cola_sentences


def make_tiny_bert(path: Path, cola: Path | None, vocab_size: int = 400, hidden: int = 16, layers: int = 2,
                   seed: int = 0, texts: list[str] | None = None, init_range: float = 0.02) -> Path:
    """The vocabulary: trained on the CoLA folder's training sentences, or every word of `texts`."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    if texts is None:
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
        tok.train_from_iterator(cola_sentences(cola), trainers.WordPieceTrainer(vocab_size=vocab_size,  # type: ignore[arg-type]
                                                                                special_tokens=specials))
    else:
        # A fixed vocabulary: every word of `texts` and every character, sorted. (The WordPiece
        # trainer breaks ties in hash order: its vocabulary changes from one build to the next, and
        # with it every run's numbers.)
        words = sorted({w for t in texts for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(t))})
        chars = sorted({c for w in words for c in w})
        vocab = {t: i for i, t in enumerate(dict.fromkeys([*specials, *chars, *(f"##{c}" for c in chars), *words]))}
        tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
        tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]", do_lower_case=True)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=128,
                        num_labels=2, initializer_range=init_range)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def make_tiny_gpt2(path: Path, cola: Path, vocab_size: int = 300, hidden: int = 16, seed: int = 0) -> Path:
    """A tiny GPT-2 (byte-level BPE trained on CoLA) whose tokenizer has no pad token."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(cola_sentences(cola), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = GPT2TokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                             unk_token="<|endoftext|>")
    config = GPT2Config(vocab_size=tok.get_vocab_size(), n_embd=hidden, n_layer=2, n_head=2, n_positions=128)
    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    GPT2LMHeadModel(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def make_tiny_decoder(path: Path, cola: Path, family: str = "llama", vocab_size: int = 300, hidden: int = 16,
                      seed: int = 0) -> Path:
    """A tiny Llama- or Qwen2-architecture sequence classifier (random weights) with a byte-level BPE
    tokenizer trained on CoLA; as with the real ones, the Llama tokenizer has no pad token."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        LlamaConfig,
        LlamaForSequenceClassification,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForSequenceClassification,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(cola_sentences(cola), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # Loaded back, a qwen2 folder's tokenizer pads with <|endoftext|> (Qwen2Tokenizer's default, in the
    # real vocabularies too); the Llama one has no pad token.
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    shape = dict(vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=2 * hidden,
                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                 num_labels=2, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, tie_word_embeddings=False)
    config, cls = ((LlamaConfig(**shape), LlamaForSequenceClassification) if family == "llama"
                   else (Qwen2Config(**shape), Qwen2ForSequenceClassification))
    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    cls(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


if __name__ == "__main__":
    print(make_tiny_bert(Path(sys.argv[1]), Path(sys.argv[2])))
