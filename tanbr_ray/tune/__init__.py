"""Ray Tune sweeps of Tanbr's knobs (rho, slot length, tree thresholds, bandit settings).

Each trial is one simulation (`tanbr_ray.sim`) of the Tanbr policy reporting per slot, so ASHA can
stop bad settings early. This package is the only one besides `cluster` that imports Ray.
"""

from tanbr_ray.tune.config import SearchDist, TuneSpec, load_tune_config

__all__ = ["SearchDist", "TuneSpec", "load_tune_config"]
