"""The model-adapter seam (models/adapter.py): options, defaults, and an engine driven by an adapter it cannot name."""
import pytest
import torch

from inferix.models.adapter import ModelAdapter, ModelOption, parse_option_text

from engine_utils import run_latents, tiny_bundle, tiny_engine


def test_option_text():
    assert parse_option_text(["mirrors=hv,d,a", " corrector = off "]) == {"mirrors": "hv,d,a", "corrector": "off"}
    assert parse_option_text(None) == {} and parse_option_text(["k="]) == {"k": ""}
    for bad, msg in ((["mirrors"], "expected KEY=VALUE"), (["=1"], "expected KEY=VALUE"),
                     (["a=1", "a=2"], "--model-option a given twice")):
        with pytest.raises(ValueError, match=msg):
            parse_option_text(bad)


def test_a_plain_model_takes_no_options_and_changes_nothing():
    b = tiny_bundle()
    a = b.adapter.configure()
    assert type(a) is ModelAdapter and a.settings() == {} and a.lanes() == 0 and a.start_frames("x", 1) is None
    x = [torch.ones(2)]
    assert a.finish_block(x, [None], None) is x and a.extra_rows(x, None) == [] and a.combine(x, []) is x
    with pytest.raises(ValueError, match=r"unknown model option 'mirrors' for model 'test-tiny' \(it takes: none\)"):
        b.adapter.configure({"mirrors": "h"})
    eng = tiny_engine()
    assert eng.model_options == {} and eng.kv_lanes == 1 and eng.profiler.summary()["model_options"] == {}
    with pytest.raises(AttributeError):
        eng.mirrors


class Twin(ModelAdapter):
    """One extra row, the stream's own input again, in one extra lane; the two predictions averaged, so the
    frames are the plain model's (up to batched-matmul rounding); finished blocks are recorded and scaled by the
    option."""
    options = (ModelOption("scale", float, 1.0),)

    def __init__(self, bundle):
        super().__init__(bundle)
        self.finished = []

    def check(self):
        if self.values["scale"] <= 0:
            raise ValueError(f"model option scale must be positive, got {self.values['scale']}")

    def lanes(self):
        return 1

    def extra_rows(self, x, actions):
        return [(x.clone(), actions)]

    def combine(self, own, extras):
        return (own + extras[0]) / 2

    def finish_block(self, x0s, previous, actions):
        self.finished.append([p is None for p in previous])
        return [x0 * self.values["scale"] for x0 in x0s]


def test_an_engine_runs_what_the_adapter_says():
    plain = run_latents(tiny_engine(), frames=9)
    b = tiny_bundle()
    b.adapter_class = Twin
    from inferix.engine import Engine
    eng = Engine(b, window=None, sink=0, kv_pages=12, keep_latents=True)
    assert eng.kv_lanes == 2 and eng.pool.num_pages == 24
    assert torch.allclose(run_latents(eng, frames=9), plain, atol=1e-5, rtol=0)
    assert eng.adapter.finished == [[True], [False], [False]]  # one call per finished block; a stream's first has no
    assert eng.pages_in_use == 0  # previous frame
    eng2 = Engine(b, window=None, sink=0, kv_pages=12, keep_latents=True, model_options={"scale": "0.5"})
    assert eng2.scale == 0.5 and eng2.model_options == {"scale": 0.5}
    assert not torch.equal(run_latents(eng2, frames=9), plain)
    with pytest.raises(ValueError, match="model option scale must be positive, got -1.0"):
        Engine(b, kv_pages=8, scale=-1)
    with pytest.raises(ValueError, match="model option scale: could not convert"):
        Engine(b, kv_pages=8, model_options={"scale": "big"})
