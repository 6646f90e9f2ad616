"""The task-expert MoE (sparse-upcycled BERT) and the dense models merging turns it into.

Each MoE layer holds K experts = copies of the pretrained FFN block (intermediate dense, output dense,
output LayerNorm), one fine-tuned per task. Attention and embeddings are shared. One forward pass
serves single-task batches in any of the modes: ``dense`` (pretrained FFN + heads-only baseline heads),
``oracle`` (the batch's task expert), ``top1``/``top2`` (token-level learned router, Switch/Mixtral
style), ``soft`` (SMEAR-style: per example Σ_k p_k·expert_k, p the router's probabilities averaged
over the example's tokens) and ``merged`` (one FFN per layer from a merge operator at x, or a static
merged state). `MODE_SPECS` lists them; `TaskMoE._plan` is the one place where they differ.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertAttention, BertEmbeddings

from tanbr_ray.moe.data import NUM_LABELS, check_task
from tanbr_ray.moe.merge import FFN_KEYS, ExpertMerging, ExpertStats, Merger



@dataclass(frozen=True)
class ModeSpec:
    """A serving mode: which FFN each MoE layer runs, and which task heads read the result."""

    ffn: str  # base (pretrained FFN) | task (the request's expert) | routed (token top-k) | soft | merged
    heads: str  # dense (heads-only baseline) | experts (trained with the experts; merged may adapt)
    k: int = 0


MODE_SPECS = {
    "dense": ModeSpec("base", "dense"),
    "oracle": ModeSpec("task", "experts"),
    "top1": ModeSpec("routed", "experts", 1),
    "top2": ModeSpec("routed", "experts", 2),
    "soft": ModeSpec("soft", "experts"),
    "merged": ModeSpec("merged", "experts"),
}
MODES = tuple(MODE_SPECS)


def mode_spec(mode: str) -> ModeSpec:
    if mode not in MODE_SPECS:
        raise ValueError(f"unknown mode {mode!r}; modes: {list(MODES)}")
    return MODE_SPECS[mode]


@dataclass
class Plan:
    layer: Callable  # layer(l, h, attention_mask) -> FFN block output
    heads: nn.ModuleDict
    attn_ln: tuple | None
    use_adapt: bool
    state: Mapping[str, torch.Tensor] | None = None  # the FFN state of task/merged modes


class Head(nn.Module):
    """2-layer task head over mean-pooled tokens."""

    def __init__(self, hidden: int, inner: int, num_labels: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(hidden, inner)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(inner, num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(F.gelu(self.fc(pooled))))


def ffn(h: torch.Tensor, p: Mapping[str, torch.Tensor], eps: float, dropout: float = 0.0, training: bool = False):
    """BERT's FFN block with its post-LayerNorm: LN(h + W2·gelu(W1·h + b1) + b2)."""
    y = F.linear(F.gelu(F.linear(h, p["w1"], p["b1"])), p["w2"], p["b2"])
    y = F.dropout(y, dropout, training)
    z = (y + h).to(p["ln_w"].dtype)  # LayerNorm in the parameters' precision (bf16 autocast on CPU)
    return F.layer_norm(z, (h.shape[-1],), p["ln_w"], p["ln_b"], eps)


def attention(att: BertAttention, h, mask, eps: float, ln: tuple | None = None):
    """BertAttention with an optional LayerNorm override (merge-aware adaptation trains those)."""
    y = att.output.dropout(att.output.dense(att.self(h, mask)[0]))
    if ln is None:
        ln = (att.output.LayerNorm.weight, att.output.LayerNorm.bias)
    return F.layer_norm((y + h).to(ln[0].dtype), (h.shape[-1],), ln[0], ln[1], eps)


def extended_mask(attention_mask: torch.Tensor, dtype) -> torch.Tensor:
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def mean_pool(h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    m = attention_mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


def _param_bytes(tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


class CastOnce:
    """bf16 copies of FFN matmul weights (w1, w2) for inference under bf16 autocast. Autocast's cast
    cache keeps only leaf tensors that need grad, so it recast these weights at every pass (a
    merged FFN at batch 1 cost more than the top-1 MoE). The copy is the cast autocast makes, so
    outputs are bit-identical; it is remade when a weight changes (in place or by a reload). Outside
    bf16 inference (fp32, or training) the weights pass through untouched."""

    KEYS = ("w1", "w2")

    def __init__(self):
        self._entry: tuple | None = None  # (which tensors, at which version; their cast copies)

    def get(self, ffns: Sequence[Mapping[str, torch.Tensor]]) -> Sequence[Mapping[str, torch.Tensor]]:
        dev = ffns[0]["w1"].device.type
        if (torch.is_grad_enabled() or not torch.is_autocast_enabled(dev)
                or torch.get_autocast_dtype(dev) != torch.bfloat16):
            return ffns
        key = tuple((p[k].data_ptr(), p[k]._version) for p in ffns for k in self.KEYS)
        entry = self._entry
        if entry is None or entry[0] != key:
            entry = (key, [{k: v.detach().to(torch.bfloat16) if k in self.KEYS else v for k, v in p.items()}
                           for p in ffns])
            self._entry = entry  # one assignment: a thread sharing this sees the old entry or the new
        return entry[1]


class TaskMoE(ExpertMerging, nn.Module):
    """A BERT whose FFN blocks in `moe_layers` are K task experts; see the module docstring."""

    def __init__(
        self,
        bert_config: BertConfig,
        tasks: list[str],
        moe_layers: list[int] | None = None,
        head_hidden: int = 384,
        dropout: float = 0.1,
        budget: int | None = None,
    ):
        super().__init__()
        for t in tasks:
            check_task(t)
        cfg = copy.deepcopy(bert_config)
        cfg._attn_implementation = "sdpa"
        self.bert_config = cfg
        self.tasks = list(tasks)
        self.num_experts = len(tasks)
        self.expert_of = {t: i for i, t in enumerate(tasks)}
        L, H, I, K = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, self.num_experts
        self.moe_layers = list(range(L)) if moe_layers is None else list(moe_layers)
        if not self.moe_layers or min(self.moe_layers) < 0 or max(self.moe_layers) >= L:
            raise ValueError(f"moe_layers: {self.moe_layers} outside 0..{L - 1}")
        self.first_moe = self.moe_layers[0]
        self.budget = budget or K
        if self.budget > K:
            raise ValueError(f"budget: {self.budget} exceeds the number of experts {K}")
        self.eps = cfg.layer_norm_eps
        self.dropout = dropout
        M = len(self.moe_layers)
        self.embeddings = BertEmbeddings(cfg)
        self.attn = nn.ModuleList([BertAttention(cfg, layer_idx=i) for i in range(L)])

        def stack(*lead):
            return nn.ParameterDict(
                {
                    "w1": nn.Parameter(torch.zeros(*lead, I, H)),
                    "b1": nn.Parameter(torch.zeros(*lead, I)),
                    "w2": nn.Parameter(torch.zeros(*lead, H, I)),
                    "b2": nn.Parameter(torch.zeros(*lead, H)),
                    "ln_w": nn.Parameter(torch.ones(*lead, H)),
                    "ln_b": nn.Parameter(torch.zeros(*lead, H)),
                }
            )

        self.base = stack(L)  # the pretrained FFN of every layer (dense mode, non-MoE layers)
        self.experts = stack(M, K)
        self.router_w = nn.Parameter(torch.zeros(M, K, H))
        self.router_b = nn.Parameter(torch.zeros(M, K))
        mk = lambda: nn.ModuleDict({self._hk(t): Head(H, head_hidden, NUM_LABELS[t], dropout) for t in tasks})  # noqa: E731
        self.heads = mk()  # trained with the experts (oracle, top-k)
        self.dense_heads = mk()  # heads-only baseline on the frozen pretrained model
        self.merge_heads = mk()  # merge-aware adaptation (used in merged mode once adapted)
        self.merge_attn_ln_w = nn.Parameter(torch.ones(L, H))
        self.merge_attn_ln_b = nn.Parameter(torch.zeros(L, H))
        self.register_buffer("adapted", torch.zeros((), dtype=torch.uint8))
        self.static_merges: dict[str, dict[str, torch.Tensor]] = {}  # computed on first use
        self.stats: ExpertStats | None = None  # Fishers and Grams for the fisher/regmean operators
        self.merge_operator = "linear"
        self.regmean_alpha = 0.9
        self._merger: Merger | None = None
        self._cast = CastOnce()  # the experts with bf16 w1/w2, for inference under bf16 autocast
        self.tokenizer = None  # set by build/load: the base model's tokenizer
        self.max_len_single = 64
        self.max_len_pair = 128

    # ----------------------------------------------------------------------------- setup helpers
    @staticmethod
    def _hk(task: str) -> str:
        return task.replace("-", "_")

    def load_pretrained_bert(self, bert: nn.Module) -> None:
        """Copy a HF BertModel: embeddings and attention shared, every expert starts as the FFN."""
        self.embeddings.load_state_dict(bert.embeddings.state_dict())
        with torch.no_grad():
            for l, layer in enumerate(bert.encoder.layer):
                self.attn[l].load_state_dict(layer.attention.state_dict())
                src = {
                    "w1": layer.intermediate.dense.weight,
                    "b1": layer.intermediate.dense.bias,
                    "w2": layer.output.dense.weight,
                    "b2": layer.output.dense.bias,
                    "ln_w": layer.output.LayerNorm.weight,
                    "ln_b": layer.output.LayerNorm.bias,
                }
                for k in FFN_KEYS:
                    self.base[k][l].copy_(src[k])
                self.merge_attn_ln_w[l].copy_(layer.attention.output.LayerNorm.weight)
                self.merge_attn_ln_b[l].copy_(layer.attention.output.LayerNorm.bias)
            self.reset_experts_to_base()

    def reset_experts_to_base(self) -> None:
        with torch.no_grad():
            for k in FFN_KEYS:
                for e in range(self.num_experts):
                    self.experts[k][:, e].copy_(self.base[k][self.moe_layers])

    @property
    def device(self) -> torch.device:
        return self.router_w.device

    @property
    def expert_labels(self) -> list[str]:
        return [f"expert:{t}" for t in self.tasks]  # expert k was trained on task k

    @property
    def expert_map(self) -> str:
        return "task"

    def expert_state(self, e: int) -> dict[str, torch.Tensor]:
        """Expert e of every MoE layer as a state ([layers, ...] tensors), as `serving_experts` holds it."""
        if not 0 <= e < self.num_experts:
            raise ValueError(f"expert index {e} outside 0..{self.num_experts - 1}")
        return {k: v[:, e] for k, v in self.serving_experts().items()}

    def serving_experts(self) -> Mapping[str, torch.Tensor]:
        """The experts as the token-routed, soft and oracle modes read them: at inference under bf16
        autocast, with w1 and w2 cast once (see `CastOnce`; one expert is a slice, which autocast's
        cast cache never keeps, so every pass recast every expert it touched)."""
        return self._cast.get([self.experts])[0]

    def base_state(self) -> dict[str, torch.Tensor]:
        return {k: self.base[k][self.moe_layers] for k in FFN_KEYS}

    # ----------------------------------------------------------------------------- merging (ExpertMerging)
    def expert_tensors(self) -> dict[str, torch.Tensor]:
        return {k: self.experts[k] for k in FFN_KEYS}


    def check_state(self, state: Mapping[str, torch.Tensor]) -> None:
        for k in FFN_KEYS:
            want = tuple(self.experts[k].shape[:1] + self.experts[k].shape[2:])
            if k not in state or tuple(state[k].shape) != want:
                raise ValueError(f"merged state: {k} missing or shaped {getattr(state.get(k), 'shape', None)}, want {want}")

    # ----------------------------------------------------------------------------- forward modes
    def _plan(self, mode: str, task: str, x=None, state=None, adapted: bool | None = None) -> "Plan":
        """What a mode runs: the FFN of every layer ffn(l, h, mask), the heads and the attention
        LayerNorm override. The one place where modes differ."""
        spec = mode_spec(mode)
        training = self.training
        moe_idx = {l: m for m, l in enumerate(self.moe_layers)}
        base = lambda l, h: ffn(h, {kk: self.base[kk][l] for kk in FFN_KEYS}, self.eps, self.dropout, training)  # noqa: E731
        use_adapt = False
        if spec.ffn == "merged":
            if (x is None) == (state is None):
                raise ValueError("merged mode needs exactly one of x (weight vector) or state (merged weights)")
            if state is None:
                state = self.merged_state(x)
            else:
                self.check_state(state)
            use_adapt = bool(self.adapted.item()) if adapted is None else bool(adapted)
        elif spec.ffn == "task":
            state = self.expert_state(self.task_index(task))

        def moe_ffn(l, h, mask):
            m = moe_idx[l]
            if spec.ffn in ("task", "merged"):
                return ffn(h, {kk: state[kk][m] for kk in FFN_KEYS}, self.eps, self.dropout, training)
            if spec.ffn == "routed":
                return self._routed(m, h, spec.k)
            return self._soft(m, h, mask)

        def layer(l, h, mask):
            return moe_ffn(l, h, mask) if (spec.ffn != "base" and l in moe_idx) else base(l, h)

        heads = {"dense": self.dense_heads, "experts": self.heads}[spec.heads]
        if use_adapt:
            heads = self.merge_heads
        ln = (self.merge_attn_ln_w, self.merge_attn_ln_b) if use_adapt else None
        return Plan(layer, heads, ln, use_adapt, state)

    def router_logits(self, m: int, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.router_w[m], self.router_b[m])

    def _routed(self, m: int, h: torch.Tensor, k: int) -> torch.Tensor:
        """Token-level top-k: each token through its k best experts, gate weights renormalised."""
        shape = h.shape
        hf = h.reshape(-1, shape[-1])
        p = torch.softmax(self.router_logits(m, hf).float(), dim=-1)
        topv, topi = p.topk(k, dim=-1)
        topv = (topv / topv.sum(-1, keepdim=True)).to(h.dtype)
        out = torch.zeros_like(hf)
        experts = self.serving_experts()
        for e in range(self.num_experts):
            sel = topi == e
            rows = sel.any(-1).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            w = (topv * sel).sum(-1)[rows]
            p_e = {kk: experts[kk][m, e] for kk in FFN_KEYS}
            y = w[:, None] * ffn(hf[rows], p_e, self.eps, self.dropout, self.training)
            out.index_add_(0, rows, y.to(out.dtype))
        return out.reshape(shape)

    def soft_weights(self, m: int, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Per example: the router's expert probabilities averaged over its real tokens, [B, K]."""
        p = torch.softmax(self.router_logits(m, h).float(), dim=-1)
        w = attention_mask.to(p.dtype).unsqueeze(-1)
        return (p * w).sum(1) / w.sum(1).clamp(min=1.0)

    def _soft(self, m: int, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """SMEAR-style soft merging: each example's FFN is Σ_k p_k(example) W_k (per layer)."""
        p = self.soft_weights(m, h, attention_mask).to(h.dtype)
        E = {kk: v[m] for kk, v in self.serving_experts().items()}
        a = F.gelu(torch.einsum("bth,bih->bti", h, torch.einsum("bk,kih->bih", p, E["w1"])) + (p @ E["b1"])[:, None])
        y = torch.einsum("bti,bhi->bth", a, torch.einsum("bk,khi->bhi", p, E["w2"])) + (p @ E["b2"])[:, None]
        y = F.dropout(y, self.dropout, self.training)
        z = F.layer_norm((y + h).to(E["ln_w"].dtype), (h.shape[-1],), None, None, self.eps)
        return z * (p @ E["ln_w"])[:, None] + (p @ E["ln_b"])[:, None]

    def head_for(self, mode: str, task: str, use_adapt: bool) -> Head:
        spec = mode_spec(mode)
        heads = self.merge_heads if use_adapt else {"dense": self.dense_heads, "experts": self.heads}[spec.heads]
        return heads[self._hk(task)]

    def embed_to_first_moe(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        """Everything that does not depend on the mode or x: embeddings, the layers below the first
        MoE layer and the first MoE layer's attention. Its output is what the eval cache stores."""
        mask = extended_mask(attention_mask, self.embeddings.word_embeddings.weight.dtype)
        h = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        for l in range(self.first_moe):
            h = ffn(attention(self.attn[l], h, mask, self.eps), {k: self.base[k][l] for k in FFN_KEYS}, self.eps,
                    self.dropout, self.training)
        return attention(self.attn[self.first_moe], h, mask, self.eps)

    def pooled_from_first_moe(self, h, attention_mask, task, mode="oracle", x=None, state=None, adapted=None, record=None):
        """Mean-pooled last hidden state from the cached first-MoE-layer FFN input onwards; returns
        (pooled, use_adaptation). `record` (a list) collects (layer, FFN input) pairs for calibration."""
        self.task_index(task)
        plan = self._plan(mode, task, x, state, adapted)
        mask = extended_mask(attention_mask, h.dtype)
        for l in range(self.first_moe, self.bert_config.num_hidden_layers):
            if l > self.first_moe:
                ln = None if plan.attn_ln is None else (plan.attn_ln[0][l], plan.attn_ln[1][l])
                h = attention(self.attn[l], h, mask, self.eps, ln)
            if record is not None:
                record.append((l, h))
            h = plan.layer(l, h, attention_mask)
        return mean_pool(h, attention_mask), plan.use_adapt

    def forward_from_first_moe(self, h, attention_mask, task, mode="oracle", x=None, state=None, adapted=None):
        """Logits from the cached input of the first MoE layer's FFN onwards."""
        pooled, use = self.pooled_from_first_moe(h, attention_mask, task, mode, x, state, adapted)
        return self.head_for(mode, task, use)(pooled)

    def forward(self, input_ids, attention_mask, token_type_ids, task, mode="oracle", x=None, state=None, adapted=None):
        """Full forward of a single-task batch → logits [B, num_labels]."""
        h = self.embed_to_first_moe(input_ids, attention_mask, token_type_ids)
        return self.forward_from_first_moe(h, attention_mask, task, mode, x, state, adapted)

    # ----------------------------------------------------------------------------- evaluation API
    def prepare(self, splits, batch_size: int = 32, progress: bool = False):
        """Eval cache for many predictions on the same examples (see tanbr_ray.moe.infer)."""
        from tanbr_ray.moe.infer import prepare

        return prepare(self, splits, batch_size, progress)

    def predict(self, cache, mode: str = "oracle", x=None, state=None, adapted=None, bf16: bool = False) -> dict[str, np.ndarray]:
        from tanbr_ray.moe.infer import predict

        return predict(self, cache, mode, x=x, state=state, adapted=adapted, bf16=bf16)

    def predict_merged(self, x, cache, adapted=None, bf16: bool = False) -> dict[str, np.ndarray]:
        """Predictions of the dense model merged with weight vector x (validated)."""
        return self.predict(cache, "merged", x=x, adapted=adapted, bf16=bf16)

    def predict_static(self, name: str, cache, adapted=None, bf16: bool = False) -> dict[str, np.ndarray]:
        """Predictions of a static merge ('uniform', 'fisher', 'regmean')."""
        return self.predict(cache, "merged", state=self.static_state(name), adapted=adapted, bf16=bf16)

    def scores(self, cache, preds, subset=None) -> dict[str, float]:
        from tanbr_ray.moe.infer import score

        return score(cache, preds, subset)

    # ----------------------------------------------------------------------------- dense models, bytes
    @torch.no_grad()
    def dense_model(self, x=None, state=None, adapted: bool | None = None) -> "DenseModel":
        """A standalone dense model: merged FFNs (x or state) in MoE layers, or the pretrained FFNs
        (heads-only baseline) when neither is given. Holds only one FFN per layer."""
        if x is None and state is None:
            return DenseModel.from_moe(self, self.base_state(), self.dense_heads, None)
        plan = self._plan("merged", self.tasks[0], x, state, adapted)
        return DenseModel.from_moe(self, plan.state, plan.heads, plan.attn_ln)

    def edge_parts(self) -> tuple[str, dict, dict[str, torch.Tensor]]:
        """(the shell class, its config, its tensors): the dense model of merged serving without the MoE
        layers' FFNs (heads and attention norms as merged serving uses them)."""
        dm = self.dense_model(x=np.full(self.num_experts, 1.0 / self.num_experts))
        moe_ffn = {f"ffn.{l}.{k}" for l in self.moe_layers for k in FFN_KEYS}
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in dm.state_dict().items() if k not in moe_ffn}
        config = {"bert_config": self.bert_config.to_dict(), "moe_layers": list(self.moe_layers),
                  "head_hidden": dm.heads[self._hk(self.tasks[0])].fc.out_features}
        return f"{DenseModel.__module__}:{DenseModel.__qualname__}", config, tensors

    def resident_bytes(self, mode: str) -> int:
        """Parameter bytes a node must hold to serve the mode."""
        shared = list(self.embeddings.parameters()) + list(self.attn.parameters()) + list(self.heads.parameters())
        non_moe = [
            self.base[k][l] for k in FFN_KEYS for l in range(self.bert_config.num_hidden_layers) if l not in self.moe_layers
        ]
        per_layer_ffn = [self.experts[k][:, 0] for k in FFN_KEYS]
        spec = mode_spec(mode)
        held = shared + non_moe + [self.experts[k] for k in FFN_KEYS]
        if spec.ffn in ("base", "merged"):
            held = shared + non_moe + per_layer_ffn
        elif spec.ffn in ("routed", "soft"):
            held = held + [self.router_w, self.router_b]
        return _param_bytes(held)


class DenseModel(nn.Module):
    """One FFN per layer: what a merged MoE ships to an edge node.

    Built from a TaskMoE (`TaskMoE.dense_model`) or, on a node that never holds the experts, from its
    structure plus a state dict (`DenseModel.skeleton` + `load_state_dict`). `with_ffn` returns a model
    with new merged FFNs that shares every other module, so a node swaps versions without a copy and
    a forward already running keeps the model it started with."""

    def __init__(self, bert_config: BertConfig, tasks: list[str], moe_layers: list[int], head_hidden: int):
        super().__init__()
        cfg = copy.deepcopy(bert_config)
        cfg._attn_implementation = "sdpa"
        L, H, I = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
        self.eps = cfg.layer_norm_eps
        self.tasks = list(tasks)
        self.moe_layers = list(moe_layers)
        self.embeddings = BertEmbeddings(cfg)
        self.attn = nn.ModuleList([BertAttention(cfg, layer_idx=i) for i in range(L)])
        shapes = {"w1": (I, H), "b1": (I,), "w2": (H, I), "b2": (H,), "ln_w": (H,), "ln_b": (H,)}
        self.ffn_shapes = shapes
        self.ffn = nn.ModuleList(
            nn.ParameterDict({k: nn.Parameter(torch.zeros(shapes[k]), requires_grad=False) for k in FFN_KEYS})
            for _ in range(L))
        self.heads = nn.ModuleDict({TaskMoE._hk(t): Head(H, head_hidden, NUM_LABELS[t], 0.0) for t in tasks})
        self._cast = CastOnce()  # the shell's own FFNs with bf16 w1/w2, for inference under bf16 autocast
        self.eval()

    @classmethod
    @torch.no_grad()
    def from_moe(cls, moe: TaskMoE, state: Mapping[str, torch.Tensor], heads: nn.ModuleDict, attn_ln) -> "DenseModel":
        dm = cls(moe.bert_config, moe.tasks, moe.moe_layers, heads[TaskMoE._hk(moe.tasks[0])].fc.out_features)
        dm.embeddings.load_state_dict(moe.embeddings.state_dict())
        dm.attn.load_state_dict(moe.attn.state_dict())
        dm.heads.load_state_dict(heads.state_dict())
        moe_idx = {l: m for m, l in enumerate(moe.moe_layers)}
        for l in range(len(dm.ffn)):
            for k in FFN_KEYS:
                dm.ffn[l][k].copy_(state[k][moe_idx[l]] if l in moe_idx else moe.base[k][l])
        if attn_ln is not None:
            for l in range(moe.first_moe + 1, len(dm.attn)):
                dm.attn[l].output.LayerNorm.weight.copy_(attn_ln[0][l])
                dm.attn[l].output.LayerNorm.bias.copy_(attn_ln[1][l])
        return dm.to(moe.device).eval()

    @classmethod
    def from_package(cls, config: dict, tensors: Mapping[str, torch.Tensor], tasks: list[str]) -> "DenseModel":
        """The shell an edge node builds from `TaskMoE.edge_parts` (its MoE layers' FFNs left empty)."""
        shell = cls(BertConfig(**config["bert_config"]), tasks, config["moe_layers"], config["head_hidden"])
        missing, unexpected = shell.load_state_dict(tensors, strict=False)
        allowed = {f"ffn.{l}.{k}" for l in config["moe_layers"] for k in FFN_KEYS}
        if unexpected or set(missing) - allowed:
            raise ValueError(f"edge package does not match its config: missing {sorted(set(missing) - allowed)}, "
                             f"unexpected {sorted(unexpected)}")
        for l in shell.moe_layers:  # every version brings these: the shell holds none (it serves through with_ffn)
            shell.ffn[l] = nn.ParameterDict()
        return shell

    def with_ffn(self, state: Mapping[str, torch.Tensor]) -> "MergedVersion":
        """This shell served with other merged FFNs in its MoE layers ([moe layers, ...] tensors, as
        `TaskMoE.merged_state` gives them): the forward reads them as arguments, so nothing of the
        shell is copied or edited, and versions on one shell may run at once (a replica serving
        several nodes; a forward already running keeps the version it started with). Not
        `torch.func.functional_call`: it swaps the module's parameters for the call, which two
        threads on one shell would see."""
        layers: list[Mapping[str, torch.Tensor]] = list(self.ffn)
        for k in FFN_KEYS:
            want = (len(self.moe_layers), *self.ffn_shapes[k])
            if k not in state or tuple(state[k].shape) != want:
                raise ValueError(f"merged FFN: {k} missing or shaped {getattr(state.get(k), 'shape', None)}, want {want}")
        ref = self.embeddings.word_embeddings.weight
        for m, l in enumerate(self.moe_layers):
            layers[l] = {k: state[k][m].detach().to(device=ref.device, dtype=ref.dtype).contiguous() for k in FFN_KEYS}
        return MergedVersion(self, layers)

    def forward(self, input_ids, attention_mask, token_type_ids, task: str,
                ffn_layers: Sequence[Mapping[str, torch.Tensor]] | None = None) -> torch.Tensor:
        """Logits of one task's head; `ffn_layers` (one parameter mapping per layer) replaces the
        shell's FFNs."""
        key = task.replace("-", "_")
        if key not in self.heads:
            raise ValueError(f"unknown task {task!r}; tasks: {self.tasks}")
        layers = self._cast.get(self.ffn) if ffn_layers is None else ffn_layers
        mask = extended_mask(attention_mask, self.embeddings.word_embeddings.weight.dtype)
        h = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        for l, att in enumerate(self.attn):
            h = ffn(attention(att, h, mask, self.eps), layers[l], self.eps)
        return self.heads[key](mean_pool(h, attention_mask))

    def resident_bytes(self) -> int:
        return _param_bytes(self.parameters())


class MergedVersion:
    """One merged version on a shared DenseModel shell: the shell's forward with these FFN tensors."""

    def __init__(self, shell: DenseModel, ffn_layers: list[Mapping[str, torch.Tensor]]):
        self.shell, self.ffn_layers = shell, ffn_layers
        self._cast = CastOnce()  # this version's FFNs with bf16 w1/w2, for inference under bf16 autocast

    def __call__(self, input_ids, attention_mask, token_type_ids, task: str) -> torch.Tensor:
        return self.shell(input_ids, attention_mask, token_type_ids, task, ffn_layers=self._cast.get(self.ffn_layers))

    def tensors(self) -> list[torch.Tensor]:
        """What this version holds beyond its shell: the MoE layers' FFNs."""
        return [t for l in self.shell.moe_layers for t in self.ffn_layers[l].values()]

    def resident_bytes(self) -> int:
        """The shell (everything but the MoE layers' FFNs) plus this version's FFNs."""
        own = self.tensors()
        replaced = {id(p) for l in self.shell.moe_layers for p in self.shell.ffn[l].values()}
        shell = sum(p.numel() * p.element_size() for p in self.shell.parameters() if id(p) not in replaced)
        return int(shell + sum(t.numel() * t.element_size() for t in own))
