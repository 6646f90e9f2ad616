"""Router core (numpy/torch only, no Ray): monitor, partition tree, neural bandit, Tanbr, baselines."""

from tanbr_ray.router.bandit import BanditConfig, NeuralUCB
from tanbr_ray.router.hoo import HOOPolicy
from tanbr_ray.router.monitor import CountMinSketch, MonitorConfig, TaskMonitor
from tanbr_ray.router.nucb import NucbPolicy
from tanbr_ray.router import registry
from tanbr_ray.router.policy import Policy
from tanbr_ray.router.static import BestXPolicy, PsiMergePolicy, RandomPolicy, UniformPolicy
from tanbr_ray.router.tanbr import Tanbr, TanbrConfig
from tanbr_ray.router.tree import PartitionTree, TreeConfig

__all__ = [
    "BanditConfig", "BestXPolicy", "CountMinSketch", "HOOPolicy", "MonitorConfig", "NeuralUCB", "NucbPolicy",
    "PartitionTree", "Policy", "PsiMergePolicy", "RandomPolicy", "Tanbr",
    "TanbrConfig", "TaskMonitor", "TreeConfig", "UniformPolicy", "registry",
]
