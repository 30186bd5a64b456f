"""Text encoders: the UMT5 wrapper (tiny random model + word-level tokenizer built here) and the hash encoder."""
import shutil
import zlib

import pytest
import torch

from inferix.models.text_encoder import HashTextEncoder, UMT5TextEncoder


# ---------------------------------------------------------------------------------------------------
# UMT5
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def umt5(tiny_umt5_dir):
    return UMT5TextEncoder.from_dir(tiny_umt5_dir, text_len=12)


def test_umt5_shape_and_zero_padding(umt5):
    e = umt5.encode("A cat runs over the field")
    assert e.shape == (1, 12, 32) and e.dtype == torch.float32
    assert umt5.text_dim == 32 and umt5.text_len == 12
    nonzero = e[0].abs().sum(-1) > 0
    # 6 words + the closing </s>; everything after is exactly zero
    assert nonzero.tolist() == [True] * 7 + [False] * 5


def test_umt5_equals_unpadded_run(umt5, tiny_umt5_dir):
    # Independent check of the Wan semantics: the kept rows are the encoder states of the prompt's own
    # tokens, i.e. what the encoder gives for the unpadded token sequence.
    from transformers import UMT5EncoderModel
    ids = [3, 4, 6, 13, 1]  # "a cat runs field" </s> in the vocabulary written by conftest
    model = UMT5EncoderModel.from_pretrained(tiny_umt5_dir / "text_encoder", local_files_only=True).eval()
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).last_hidden_state
    got = umt5.encode("a cat runs field")
    assert torch.allclose(got[0, :5], want[0], atol=1e-5), (got[0, :5] - want[0]).abs().max()
    assert got[0, 5:].abs().max() == 0


def test_umt5_single_dir_layout(tiny_umt5_dir, tmp_path, umt5):
    # one directory holding both model and tokenizer files gives the same embeddings
    for sub in ("text_encoder", "tokenizer"):
        for f in (tiny_umt5_dir / sub).iterdir():
            shutil.copy(f, tmp_path / f.name)
    other = UMT5TextEncoder.from_dir(tmp_path, text_len=12)
    assert torch.equal(other.encode("red car in the rain"), umt5.encode("red car in the rain"))


def test_umt5_truncates_to_text_len(tiny_umt5_dir):
    enc = UMT5TextEncoder.from_dir(tiny_umt5_dir, text_len=4)
    e = enc.encode("a cat runs over the red field under the blue sky")
    assert e.shape == (1, 4, 32)
    assert bool((e[0].abs().sum(-1) > 0).all())


def test_umt5_cache_bounded_and_not_aliased(tiny_umt5_dir):
    enc = UMT5TextEncoder.from_dir(tiny_umt5_dir, text_len=8, cache_size=2)
    a = enc.encode("a cat")
    a.mul_(0)  # a caller writing into its result must not corrupt the cache
    assert enc.encode("a cat").abs().sum() > 0
    enc.encode("a dog")
    enc.encode("the sky")
    assert len(enc._cache) == 2
    assert enc.encode("a cat").abs().sum() > 0  # evicted then recomputed, still right


def test_umt5_errors(tiny_umt5_dir, tmp_path, umt5):
    with pytest.raises(TypeError, match="list"):
        umt5.encode(["a cat"])
    with pytest.raises(TypeError, match="NoneType"):
        umt5.encode(None)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        UMT5TextEncoder.from_dir(tmp_path / "nowhere")
    # a hub id is not a local directory: refused without any download attempt
    with pytest.raises(FileNotFoundError, match="google/umt5-xxl"):
        UMT5TextEncoder.from_dir("google/umt5-xxl")


# ---------------------------------------------------------------------------------------------------
# hash encoder
# ---------------------------------------------------------------------------------------------------
def test_hash_encoder_rows_are_word_embeddings():
    enc = HashTextEncoder(text_dim=8, text_len=6, vocab=97, seed=3).eval()
    e = enc.encode("Red car, in the RAIN!")
    assert e.shape == (1, 6, 8)
    words = ["red", "car", "in", "the", "rain"]
    for i, w in enumerate(words):
        assert torch.equal(e[0, i], enc.embedding.weight[zlib.crc32(w.encode()) % 97])
    assert e[0, 5].abs().max() == 0
    assert torch.equal(e, enc.encode("red CAR in the rain"))  # case and punctuation do not matter


def test_hash_encoder_seeded_and_stable():
    a = HashTextEncoder(16, 4, seed=0).eval().encode("a cat")
    b = HashTextEncoder(16, 4, seed=0).eval().encode("a cat")
    c = HashTextEncoder(16, 4, seed=1).eval().encode("a cat")
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert HashTextEncoder(16, 2).eval().encode("one two three four").shape == (1, 2, 16)
    assert HashTextEncoder(16, 3).eval().encode("").abs().max() == 0


def test_hash_encoder_learns():
    enc = HashTextEncoder(text_dim=4, text_len=3, vocab=50, seed=0)
    enc.train()
    out = enc.encode("cat dog")
    assert out.requires_grad
    out.sum().backward()
    rows = {zlib.crc32(w) % 50 for w in (b"cat", b"dog")}
    touched = set(torch.nonzero(enc.embedding.weight.grad.abs().sum(-1)).flatten().tolist())
    assert touched == rows
    before = enc.eval().encode("cat dog")
    with torch.no_grad():
        enc.embedding.weight.add_(1.0)  # an optimizer step, in place
    after = enc.encode("cat dog")
    assert torch.allclose(after[0, :2], before[0, :2] + 1.0)  # the cache did not serve stale values


def test_hash_encoder_cache_in_eval():
    enc = HashTextEncoder(text_dim=4, text_len=3, cache_size=2).eval()
    x = enc.encode("cat")
    assert not x.requires_grad
    x.zero_()
    assert enc.encode("cat").abs().sum() > 0
    enc.encode("dog")
    enc.encode("sky")
    assert len(enc._cache) == 2
    enc.train()
    assert len(enc._cache) == 0


def test_hash_encoder_errors():
    enc = HashTextEncoder(4, 3)
    with pytest.raises(TypeError, match="int"):
        enc.encode(5)
    with pytest.raises(TypeError, match="bytes"):
        enc.encode(b"cat")
    with pytest.raises(ValueError, match="text_len"):
        HashTextEncoder(4, 0)
