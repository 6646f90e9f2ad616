"""Neural UCB reward model over merging weights.

f_theta(x) -> R^V predicts the reward of every task type for a merge x (an MLP, width 64 and two
hidden layers by default, as in the paper). For a task mix psi the score of a candidate is

    score(x | psi) = psi . f(x) + gamma * sqrt(g^T A^-1 g),   g = grad_theta(psi . f(x))

with A = lambda*I + sum of g g^T over played (x, psi) (NeuralUCB, Zhou et al. 2020). A is diagonal
by default: then g^T A^-1 g decomposes per linear layer into (delta^2)^T A_W^-1 (a^2) + (delta^2)^T
A_b^-1 for back-propagated deltas and layer inputs a, which scores every candidate in a few batched
matmuls without materialising per-candidate gradients. The full-matrix option materialises them with
torch.func (vmap over grad) and keeps A^-1 by Sherman-Morrison updates; a test checks both paths
agree. After each observation J Adam steps fit f to the replayed history (bounded ring buffer).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.func import functional_call, grad, vmap


@contextmanager
def _one_thread():
    """Run a block with one intra-op thread. The bandit's matmuls are tiny: with several threads
    they spend their time synchronising, and far worse when the cores are shared with model
    inference (measured: the simulator's first policy took minutes instead of seconds)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def single_threaded(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _one_thread():
            return fn(*args, **kwargs)
    return wrapper


class BanditConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    width: int = Field(64, ge=1, le=4096, description="hidden units per layer")
    depth: int = Field(2, ge=1, le=8, description="hidden layers")
    gamma: float = Field(0.03, ge=0.0, le=1e3, description="exploration coefficient")
    lam: float = Field(1.0, gt=0.0, le=1e6, description="regulariser of A (A = lam*I + ...)")
    lr: float = Field(1e-2, gt=0.0, le=1.0, description="Adam learning rate")
    sgd_steps: int = Field(4, ge=0, le=1000, description="J: gradient steps per update")
    batch_size: int = Field(64, ge=1, le=65536)
    history: int = Field(20000, ge=1, le=10_000_000, description="replay buffer capacity")
    full_covariance: bool = False
    prior: float = Field(0.0, ge=0.0, le=100.0, description="scale c of the known-structure prior "
                         "c * h(x_own(v)) per task, h(x) = (x^a - 1)/a, a = 1 - 1/p (log x at p = 1); "
                         "0 = none, the paper's plain MLP")
    prior_power: float = Field(2.0, ge=1.0, le=100.0, description="p: for a mix psi the prior is maximal at x ∝ psi^p "
                               "(1 = ψ-merge itself)")
    psi_weighted: bool = Field(False, description="weigh each task's squared error by its share psi of the "
                               "node's traffic: a task's reward is a mean over about psi x the scored sample, "
                               "so its noise variance is ∝ 1/psi (precision weighting)")
    seed: int = 0


class MLP(nn.Module):
    def __init__(self, n_in: int, n_out: int, width: int, depth: int):
        super().__init__()
        dims = [n_in] + [width] * depth + [n_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)


class NeuralUCB:
    """Reward model f(x) -> R^V with a gradient-based confidence width.

    With `prior` > 0, f(x) = prior(x) + MLP(x): prior_v(x) = c * h(x_{e(v)}), e(v) task v's own expert,
    h(x) = (x^a - 1)/a with a = 1 - 1/p, the Box-Cox curve whose a → 0 limit is log x. For a mix psi,
    psi . prior is maximal at x ∝ psi^p (per expert, the mass of its tasks): p = 1 is ψ-merge, p > 1 a
    sharpened ψ-merge. The bandit starts there and the MLP (its last layer zeroed) learns corrections
    from the rewards. The prior has no parameters: the confidence width is the MLP's."""

    LOG_FLOOR = 1e-3  # h at p = 1 reads x no lower than this (log 0 is -inf)

    def __init__(self, num_experts: int, num_tasks: int, config: BanditConfig | None = None,
                 task_experts=None):
        self.config = c = config or BanditConfig()
        self.num_experts, self.num_tasks = num_experts, num_tasks
        te = np.arange(num_tasks) % num_experts if task_experts is None else np.asarray(task_experts)
        if te.shape != (num_tasks,) or te.min() < 0 or te.max() >= num_experts:
            raise ValueError(f"task_experts: need one expert index in 0..{num_experts - 1} per task, got {te.tolist()}")
        self.task_experts = torch.as_tensor(te, dtype=torch.long)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            self.net = MLP(num_experts, num_tasks, c.width, c.depth).double()
            if c.prior > 0:  # start exactly at the prior
                torch.nn.init.zeros_(self.net.layers[-1].weight)
                torch.nn.init.zeros_(self.net.layers[-1].bias)
        self.params = dict(self.net.named_parameters())
        self.num_params = sum(p.numel() for p in self.params.values())
        self.opt = torch.optim.Adam(self.net.parameters(), lr=c.lr)
        self.gen = torch.Generator().manual_seed(c.seed + 1)
        if c.full_covariance:
            self.A_inv = torch.eye(self.num_params, dtype=torch.float64) / c.lam
        else:
            self.A_diag = {k: torch.full_like(p, c.lam) for k, p in self.params.items()}
        # replay buffer
        self.buf_x = torch.zeros(c.history, num_experts, dtype=torch.float64)
        self.buf_r = torch.zeros(c.history, num_tasks, dtype=torch.float64)
        self.buf_m = torch.zeros(c.history, num_tasks, dtype=torch.float64)  # weight of each reward (0 = not observed)
        self.n_seen = 0

    # --- prediction ------------------------------------------------------------------------
    def prior_of(self, X: torch.Tensor) -> torch.Tensor:
        """(N, V) prior reward per task; zeros when the prior is off."""
        c = self.config
        if c.prior <= 0:
            return torch.zeros(X.shape[0], self.num_tasks, dtype=X.dtype)
        own = X[:, self.task_experts].clamp(min=0.0)
        a = 1.0 - 1.0 / c.prior_power
        if a < 1e-9:
            return c.prior * torch.log(own.clamp(min=self.LOG_FLOOR))
        return c.prior * (own ** a - 1.0) / a

    @single_threaded
    @torch.no_grad()
    def predict(self, xs: np.ndarray) -> np.ndarray:
        X = torch.as_tensor(xs, dtype=torch.float64)
        return (self.prior_of(X) + self.net(X)).numpy()

    @single_threaded
    @torch.no_grad()
    def ucb(self, xs: np.ndarray, psi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(psi . f(x), sqrt(g^T A^-1 g)) for every row of xs."""
        X = torch.as_tensor(xs, dtype=torch.float64)
        w = torch.as_tensor(psi, dtype=torch.float64)
        if self.config.full_covariance:
            mean = self.net(X) @ w
            g = self._per_sample_grads(X, w)
            width2 = ((g @ self.A_inv) * g).sum(1)
        else:
            mean, width2 = self._diag_forward(X, w)
        mean = mean + self.prior_of(X) @ w
        return mean.numpy(), torch.sqrt(torch.clamp(width2, min=0.0)).numpy()

    def _diag_forward(self, X: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, backward of psi.f and sum_j g_j^2 / A_jj per row, all batched."""
        layers = self.net.layers
        acts, masks = [X], []
        h = X
        for layer in layers[:-1]:
            z = layer(h)
            masks.append(z > 0)
            h = torch.relu(z)
            acts.append(h)
        mean = layers[-1](h) @ w
        delta = w.expand(X.shape[0], -1)
        width2 = torch.zeros(X.shape[0], dtype=X.dtype)
        for i in range(len(layers) - 1, -1, -1):
            name = f"layers.{i}"
            d2 = delta * delta
            width2 += ((d2 @ (1.0 / self.A_diag[f"{name}.weight"])) * acts[i] ** 2).sum(1)
            width2 += d2 @ (1.0 / self.A_diag[f"{name}.bias"])
            if i > 0:
                delta = (delta @ layers[i].weight) * masks[i - 1]
        return mean, width2

    def _per_sample_grads(self, X: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Flattened grad_theta(psi . f(x)) per row via torch.func, shape (N, num_params)."""
        params = {k: p.detach() for k, p in self.params.items()}

        def score(p, x):
            return functional_call(self.net, p, (x.unsqueeze(0),)).squeeze(0) @ w

        grads = vmap(grad(score), in_dims=(None, 0))(params, X)
        return torch.cat([grads[k].reshape(X.shape[0], -1) for k in self.params], dim=1)

    # --- learning --------------------------------------------------------------------------
    @single_threaded
    def observe(self, x: np.ndarray, psi: np.ndarray, rewards: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Add (x, rewards) to the history, A += g g^T for the played x, then J gradient steps."""
        xt = torch.tensor(x, dtype=torch.float64)[None]
        w = torch.as_tensor(psi, dtype=torch.float64)
        g = self._per_sample_grads(xt, w)[0]
        with torch.no_grad():
            if self.config.full_covariance:
                Ag = self.A_inv @ g
                self.A_inv -= torch.outer(Ag, Ag) / (1.0 + g @ Ag)
            else:
                offset = 0
                for k, p in self.params.items():
                    n = p.numel()
                    self.A_diag[k] += (g[offset:offset + n] ** 2).reshape(p.shape)
                    offset += n
        slot = self.n_seen % self.config.history
        self.buf_x[slot] = xt[0]
        self.buf_r[slot] = torch.as_tensor(rewards, dtype=torch.float64)
        self.buf_m[slot] = 1.0 if mask is None else torch.as_tensor(mask, dtype=torch.float64)
        if self.config.psi_weighted:
            self.buf_m[slot] *= w
        self.n_seen += 1
        self.train(self.config.sgd_steps)

    def train(self, steps: int) -> float:
        n = min(self.n_seen, self.config.history)
        if n == 0 or steps == 0:
            return float("nan")
        loss = torch.tensor(float("nan"))
        for _ in range(steps):
            idx = torch.randint(0, n, (min(self.config.batch_size, n),), generator=self.gen)
            m, X = self.buf_m[idx], self.buf_x[idx]
            loss = (m * (self.prior_of(X) + self.net(X) - self.buf_r[idx]) ** 2).sum() / m.sum().clamp(min=1.0)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
        return float(loss.detach())

    # --- persistence -----------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything needed to resume exactly, as named tensors (for safetensors)."""
        out = {f"net.{k}": p.detach().clone() for k, p in self.params.items()}
        n = min(self.n_seen, self.config.history)
        out["buf_x"], out["buf_r"] = self.buf_x[:n].clone(), self.buf_r[:n].clone()
        out["buf_m"] = self.buf_m[:n].clone()
        out["gen_state"] = self.gen.get_state().clone()
        if self.config.full_covariance:
            out["A_inv"] = self.A_inv.clone()
        else:
            out.update({f"A_diag.{k}": v.clone() for k, v in self.A_diag.items()})
        for i, p in enumerate(self.net.parameters()):
            st = self.opt.state.get(p)
            if st:
                out[f"adam.{i}.exp_avg"] = st["exp_avg"].clone()
                out[f"adam.{i}.exp_avg_sq"] = st["exp_avg_sq"].clone()
                out[f"adam.{i}.step"] = torch.as_tensor(st["step"], dtype=torch.float64).reshape(1)
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor], n_seen: int) -> None:
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(tensors[f"net.{k}"])
        self.n_seen = n_seen
        n = min(n_seen, self.config.history)
        self.buf_x[:n], self.buf_r[:n] = tensors["buf_x"], tensors["buf_r"]
        self.buf_m[:n] = tensors["buf_m"]
        self.gen.set_state(tensors["gen_state"])
        if self.config.full_covariance:
            self.A_inv = tensors["A_inv"].clone()
        else:
            self.A_diag = {k: tensors[f"A_diag.{k}"].clone() for k in self.params}
        for i, p in enumerate(self.net.parameters()):
            if f"adam.{i}.step" in tensors:
                self.opt.state[p] = {
                    "step": tensors[f"adam.{i}.step"].reshape(()).clone().float(),
                    "exp_avg": tensors[f"adam.{i}.exp_avg"].clone(),
                    "exp_avg_sq": tensors[f"adam.{i}.exp_avg_sq"].clone(),
                }
