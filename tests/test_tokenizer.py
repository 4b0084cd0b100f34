import torch
import transformers

from leangpt.checkpoint import load_checkpoint
from leangpt.data.tokenizer import EOT, TextTokenizer

SAMPLES = ["plain ascii text.", "  leading spaces\nand\ttabs\r\n", "naïve café — «quotes» 東京 🙂 ∑x²",
           "", "\x00\x01 control", "ｆｕｌｌｗｉｄｔｈ and combining é"]


def trained() -> TextTokenizer:
    return TextTokenizer.train(["hello world, this is some text for a tokenizer " * 20, "more words here"], 300)


def test_round_trips_arbitrary_text():
    tk = trained()
    for text in SAMPLES:
        assert tk.decode(tk.encode(text)) == text


def test_token_bytes_sum_to_utf8_length():
    tk = trained()
    for text in SAMPLES:
        ids = tk.encode(text)
        assert int(tk.token_bytes[ids].sum()) == len(text.encode("utf-8"))
    assert tk.token_bytes[tk.eos_id] == 0


def test_streaming_never_splits_a_character():
    tk = trained()
    text = "東京 🙂 naïve"
    pieces = list(tk.stream_pieces(iter(tk.encode(text))))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_checkpoint_tokenizer_loads_in_transformers(tiny_checkpoint):
    ours = TextTokenizer.load(tiny_checkpoint)
    theirs = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint)
    for text in SAMPLES:
        assert theirs(text)["input_ids"] == ours.encode(text)
    assert theirs.eos_token == EOT and theirs.eos_token_id == ours.eos_id


def test_transformers_gpt2_directory_loads_with_same_logits(tmp_path, tiny_checkpoint):
    # A directory as transformers writes it: GPT2LMHeadModel.save_pretrained plus a GPT-2 tokenizer.
    _, ours, _ = load_checkpoint(tiny_checkpoint)
    vocab_dir = tmp_path / "vocab"
    vocab_dir.mkdir()
    ours.tk.model.save(str(vocab_dir))
    gpt2_tok = transformers.GPT2TokenizerFast(vocab=str(vocab_dir / "vocab.json"), merges=str(vocab_dir / "merges.txt"))
    assert len(gpt2_tok) == ours.vocab_size
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(gpt2_tok), n_positions=32, n_embd=64, n_layer=2, n_head=2)).eval()
    hf_dir = tmp_path / "hf"
    ref.save_pretrained(hf_dir)
    gpt2_tok.save_pretrained(hf_dir)
    model, tokenizer, _ = load_checkpoint(hf_dir)
    ids = tokenizer.encode("the king speaks of love")
    assert ids == gpt2_tok("the king speaks of love")["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, atol=1e-5, rtol=0)


def varied_texts(n: int = 400, seed: int = 0) -> list[str]:
    import random
    rng = random.Random(seed)
    chars = [chr(c) for c in [*range(32, 127)] * 6 + [*range(0xA0, 0x500), *range(0x2000, 0x2070), *range(0x4E00, 0x4E80),
                                                     *range(0x1F600, 0x1F640), 9, 10, 13, 0x300, 0x301]]
    words = ["the", " king", "'s", "'ll", " 2024", "...", "  ", "\n\n", "naïve", "東京", "🙂", "<|endoftext|>"]
    return [" ".join(rng.choices(words, k=rng.randint(0, 30))) + "".join(rng.choices(chars, k=rng.randint(0, 200)))
            for _ in range(n)] + SAMPLES


def test_fast_encoder_gives_the_same_ids_as_tokenizers(tmp_path):
    texts = varied_texts()
    tk = TextTokenizer.train(texts[:200] * 3, 700)
    assert tk.fast is not None
    assert tk.encode_batch(texts) == [tk.encode(t) for t in texts]
    # A GPT-2 style directory (vocab.json, whose entries include <|endoftext|>, plus merges.txt) qualifies too.
    tk.tk.model.save(str(tmp_path))
    gpt2 = TextTokenizer.load(tmp_path)
    assert gpt2.fast is not None
    assert gpt2.encode_batch(texts) == [gpt2.encode(t) for t in texts]


def test_encoders_other_than_plain_byte_level_bpe_use_tokenizers():
    from tokenizers import normalizers
    tk = trained()
    tk.tk.normalizer = normalizers.Lowercase()
    tk = TextTokenizer(tk.tk)
    assert tk.fast is None
    assert tk.encode_batch(SAMPLES) == [tk.encode(t) for t in SAMPLES]
