"""Shared test setup.

Triton kernels run on CPU only in the interpreter, which must be switched on before any kernel is decorated,
so the variable is set here, before anything imports the kernels. On a CUDA machine it is left alone, so the
kernel tests run natively there (set TRITON_INTERPRET=1 by hand to interpret on a GPU machine too).

Every model the suite runs on the CPU is tiny: one intra-op thread is faster than two fighting over a small shared
machine (oversubscription made the tiny VAE decode 10-25x slower), so the whole session runs with one. Tests that
change the thread count put it back.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"

# Headless Debian Chromium driven by PyPI playwright (never `playwright install`), one per test module: playwright's
# sync API runs one instance per thread and keeps an event loop running in it while it lives, so it must be gone
# before a later module's asyncio code (aiortc tests) runs.
CHROMIUM = os.environ.get("INFERIX_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic",
                 # WebRTC host candidates as plain addresses (not mDNS names), and video that plays by itself
                 "--disable-features=WebRtcHideLocalIpsWithMdns", "--autoplay-policy=no-user-gesture-required"]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: install the Debian package (apt-get install -y chromium) "
                    f"or set INFERIX_CHROMIUM", pytrace=False)
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, timeout=30000)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="session")
def self_forcing_tiny() -> Path:
    """The reference fixture folder (weights, inputs, expected latents; see its README)."""
    return FIXTURES / "self_forcing_tiny"


TINY_WORDS = ("a cat dog runs jumps over the red blue green field sky under tree river walks in snow "
              "city night rain car").split()


def write_tiny_umt5(root: Path, d_model: int = 32, seed: int = 0) -> Path:
    """A tiny UMT5 encoder (random, seeded) in root/text_encoder and a word-level tokenizer in root/tokenizer.

    The tokenizer lower-cases, splits on whitespace/punctuation and appends </s>, like the T5 tokenizers do;
    ids: <pad> 0, </s> 1, <unk> 2, then the words of TINY_WORDS.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in TINY_WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(root / "tokenizer")
    cfg = UMT5Config(vocab_size=64, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UMT5EncoderModel(cfg).eval()
    model.save_pretrained(root / "text_encoder")
    return root


@pytest.fixture(scope="session")
def tiny_umt5_dir(tmp_path_factory) -> Path:
    return write_tiny_umt5(tmp_path_factory.mktemp("tiny_umt5"))
