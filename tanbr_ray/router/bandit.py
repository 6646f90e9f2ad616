"""Neural UCB reward model over merging weights.

f_theta(x) -> R^V predicts the reward of every task type for a merge x (an MLP, width 64 and two
hidden layers by default, as in the paper). For a task mix psi the score of a candidate is

    score(x | psi) = psi . f(x) + gamma * sqrt(g^T A^-1 g),   g = grad_theta(psi . f(x))

with A = lambda*I + sum of g g^T over played (x, psi) (NeuralUCB, Zhou et al. 2020). A is diagonal
by default: then g^T A^-1 g decomposes per linear layer into (delta^2)^T A_W^-1 (a^2) + (delta^2)^T
A_b^-1 for back-propagated deltas and layer inputs a, which scores every candidate in a few batched
matmuls without materialising per-candidate gradients, and, since delta is linear in psi, scores them
for every node's psi at once (`ucb_many`). The full-matrix option materialises them with torch.func
(vmap over grad) and keeps A^-1 by Sherman-Morrison updates; a test checks both paths agree. After
each batch of observations (one node's, or a whole slot's) J Adam steps fit f to the replayed history
(bounded ring buffer).
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
        self._snapshot: list | None = None  # float32 scoring copy (`_scoring`)

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
        """(psi . f(x), sqrt(g^T A^-1 g)) for every row of xs; psi one mix (V,) or one per row (N, V)."""
        X = torch.as_tensor(xs, dtype=torch.float64)
        w = torch.as_tensor(psi, dtype=torch.float64)
        W = w.expand(X.shape[0], -1) if w.dim() == 1 else w
        if self.config.full_covariance:
            out = self.net(X)
            g = self._per_sample_grads(X, W)
            width2 = ((g @ self.A_inv) * g).sum(1)
        else:  # scored in float32: half the time of float64, far inside the gaps between candidates
            X, W, w = X.float(), W.float(), w.float()
            snap = self._scoring()
            out, layers = self._backprop(X, w if w.dim() == 1 else W, snap)  # one mix: broadcast
            width2 = sum(s.mul_(d * d).sum(-1) for (_, _, d), s in zip(layers, self._scales(layers, snap)))
        f = out + self.prior_of(X)
        mean = f @ w if w.dim() == 1 else (f * W).sum(1)
        return mean.double().numpy(), torch.sqrt(torch.clamp(width2, min=0.0)).double().numpy()

    @single_threaded
    @torch.no_grad()
    def ucb_many(self, xs: np.ndarray, psis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`ucb` of the same candidates for many mixes at once: (mean, width), each (mixes, candidates).

        With the diagonal A, the delta back-propagated from psi . f is linear in psi, delta = psi M(x),
        so g^T A^-1 g = psi^T G(x) psi with G(x) = sum over layers and units o of s_o(x) M_o M_o^T
        (V x V per candidate). One backward pass per task type gives every M, and the widths of all
        mixes are one matmul, instead of one backward pass per mix."""
        if self.config.full_covariance:
            rows = [self.ucb(xs, p) for p in np.asarray(psis)]
            return np.stack([m for m, _ in rows]), np.stack([w for _, w in rows])
        X = torch.as_tensor(xs, dtype=torch.float32)
        P = torch.as_tensor(psis, dtype=torch.float32)
        V, snap = self.num_tasks, self._scoring()
        eye = torch.eye(V)[:, None, :].expand(V, X.shape[0], V)
        out, layers = self._backprop(X, eye, snap)  # deltas (V, N, units): row v is M_v
        G = torch.zeros(X.shape[0], V, V)
        for (_, _, M), s in zip(layers, self._scales(layers, snap)):
            G += torch.einsum("vco,co,wco->cvw", M, s, M)
        mean = P @ (out + self.prior_of(X)).T
        width2 = (P[:, :, None] * P[:, None, :]).reshape(len(P), V * V) @ G.reshape(-1, V * V).T
        return mean.double().numpy(), torch.sqrt(torch.clamp(width2, min=0.0)).double().numpy()

    def _backprop(self, X: torch.Tensor, W: torch.Tensor, layers: list) -> tuple[torch.Tensor, list]:
        """Forward pass of the MLP (`layers`: (weight, bias, ...) per linear layer), then the backward
        pass of W . f(x) per row (W: (..., N, V), the task weights per row, leading dims batched; or
        (V,), one for every row):
        (MLP output (N, V), [(layer index, its input a (N, in), the delta at its output (..., N, out))],
        last layer first). The gradient of W . f with respect to a layer's weight is delta ⊗ a, and
        to its bias delta."""
        acts = [X]
        for weight, bias, *_ in layers[:-1]:
            acts.append(torch.addmm(bias, acts[-1], weight.T).relu_())
        out = torch.addmm(layers[-1][1], acts[-1], layers[-1][0].T)
        delta, grads = W, []
        for i in range(len(layers) - 1, -1, -1):
            grads.append((i, acts[i], delta))
            if i > 0:  # through the ReLU: ReLU's own backward kernel (a mask multiply costs ~9x more here)
                delta = torch.ops.aten.threshold_backward(torch.matmul(delta, layers[i][0]), acts[i], 0.0)
        return out, grads

    def _scoring(self) -> list[tuple[torch.Tensor, ...]]:
        """Per layer (weight, bias, (1/A_W)^T, 1/A_b) in float32, for scoring candidates; rebuilt once
        after each change of the network or of A (a slot's many scorings share it)."""
        if self._snapshot is None:
            self._snapshot = [(layer.weight.detach().float(), layer.bias.detach().float(),
                               (1.0 / self.A_diag[f"layers.{i}.weight"]).T.float().contiguous(),
                               (1.0 / self.A_diag[f"layers.{i}.bias"]).float())
                              for i, layer in enumerate(self.net.layers)]
        return self._snapshot

    @staticmethod
    def _scales(grads: list, snap: list) -> list[torch.Tensor]:
        """Per layer, s[n, o] = sum_i a[n, i]^2 / A_W[o, i] + 1 / A_b[o]: then that layer's share of
        g^T A^-1 g is sum_o delta[n, o]^2 s[n, o] (A diagonal)."""
        return [torch.addmm(snap[i][3], a * a, snap[i][2]) for i, a, _ in grads]  # a * a: square() is pow, 10x slower here

    def _per_sample_grads(self, X: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """Flattened grad_theta(w . f(x)) per row (x, w) of (X, W) via torch.func, shape (N, num_params)."""
        params = {k: p.detach() for k, p in self.params.items()}

        def score(p, x, w):
            return functional_call(self.net, p, (x.unsqueeze(0),)).squeeze(0) @ w

        grads = vmap(grad(score), in_dims=(None, 0, 0))(params, X, W)
        return torch.cat([grads[k].reshape(X.shape[0], -1) for k in self.params], dim=1)

    # --- learning --------------------------------------------------------------------------
    def observe(self, x: np.ndarray, psi: np.ndarray, rewards: np.ndarray, mask: np.ndarray | None = None) -> None:
        """One observation: `observe_many` of a single row."""
        self.observe_many(np.asarray(x)[None], np.asarray(psi)[None], np.asarray(rewards)[None],
                          None if mask is None else np.asarray(mask)[None])

    @single_threaded
    def observe_many(self, xs: np.ndarray, psis: np.ndarray, rewards: np.ndarray,
                     masks: np.ndarray | None = None) -> None:
        """A slot's observations (rows): add them to the history, A += g g^T for each played x (all at
        the parameters the choices were made with), then J gradient steps. J steps per call is the
        batched bandit's rule: a slot's rewards arrive together and the model is refitted once."""
        X = torch.tensor(np.asarray(xs), dtype=torch.float64)
        W = torch.tensor(np.asarray(psis), dtype=torch.float64)
        with torch.no_grad():
            if self.config.full_covariance:
                for g in self._per_sample_grads(X, W):
                    Ag = self.A_inv @ g
                    self.A_inv -= torch.outer(Ag, Ag) / (1.0 + g @ Ag)
            else:  # sum over rows of (delta ⊗ a)^2, per layer, without per-row gradients
                net = [(layer.weight.detach(), layer.bias.detach()) for layer in self.net.layers]
                for i, a, d in self._backprop(X, W, net)[1]:
                    self.A_diag[f"layers.{i}.weight"] += (d * d).T @ (a * a)
                    self.A_diag[f"layers.{i}.bias"] += (d * d).sum(0)
        R = torch.tensor(np.asarray(rewards), dtype=torch.float64)
        m = torch.ones_like(R) if masks is None else torch.tensor(np.asarray(masks), dtype=torch.float64)
        if self.config.psi_weighted:
            m = m * W
        cap, n = self.config.history, len(X)
        keep = slice(max(0, n - cap), n)  # a ring buffer keeps the newest `history` rows
        slots = (self.n_seen + torch.arange(n)[keep]) % cap
        self.buf_x[slots], self.buf_r[slots], self.buf_m[slots] = X[keep], R[keep], m[keep]
        self.n_seen += n
        self.train(self.config.sgd_steps)

    def train(self, steps: int) -> float:
        self._snapshot = None
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
        self._snapshot = None
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
