"""LV-Bench evaluation: Video Drift Error (VDE) with reference or weight-free metric backends, a runner
that generates LV-Bench prompts with the engine, HTML/CSV/JSON reports and the ``lvbench`` command.

The VDE formula, the weight-free metrics and the online ``DriftMonitor`` live one floor down in
``inferix.drift`` (the engine uses them while generating); they are re-exported here.
"""
from inferix.drift import DriftMonitor, chunk_bounds, vde, vde_weights

from .backends import build_scorers
from .groundtruth import ground_truth_drift
from .runner import EvalConfig, evaluate_videos, load_prompts, prompt_schedule, run_benchmark
from .vde import score_video

__all__ = ["DriftMonitor", "EvalConfig", "build_scorers", "chunk_bounds", "evaluate_videos", "ground_truth_drift",
           "load_prompts", "prompt_schedule", "run_benchmark", "score_video", "vde", "vde_weights"]
