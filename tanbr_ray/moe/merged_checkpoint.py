"""`tanbr merge`: a model merged at x written as standard checkpoints `from_pretrained` loads — one
`*ForSequenceClassification` folder per task (config.json + model.safetensors): the merged MLP in every
MoE layer, the shared parts (with their merge-aware adaptation when the model has one) and the task's
head. A native Mixtral merges into a Mistral (the same attention and norms, one dense gated MLP).
Mean-pooled MLP heads (the built-in model's) ride beside a zero standard classifier as `tanbr_head.*`,
as `export-pool` writes them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from tanbr_ray.fileio import atomic_write, atomic_write_json
from tanbr_ray.moe.pool_parts import HEAD_PREFIX


def _save(clf, state: dict[str, torch.Tensor], path: Path, extra: dict[str, torch.Tensor] | None = None) -> None:
    clf.load_state_dict(state)
    path.mkdir(parents=True, exist_ok=True)
    clf.config.save_pretrained(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in clf.state_dict().items()}
    tensors.update({k: v.detach().cpu().contiguous().clone() for k, v in (extra or {}).items()})
    atomic_write(path / "model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))


def _head_extra(head, clf) -> dict[str, torch.Tensor]:
    """A mean-pooled MLP head: declared in the config, stored beside the (zeroed) standard classifier."""
    if "mean_mlp" not in head:
        return {}
    h = head["mean_mlp"]
    clf.config.tanbr_head = {"pooling": "mean", "inner": int(h.fc.out_features)}
    return {HEAD_PREFIX + k: v for k, v in h.state_dict().items()}


@torch.no_grad()
def _pool_checkpoints(moe, state: dict[str, torch.Tensor], out: Path) -> list[Path]:
    """A pool (or a native MoE, as a Mistral): per task, the base architecture with merged MLPs."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, MistralConfig

    fam = moe.family
    own = {n: p for n, p in moe.backbone.named_parameters()}
    own.update({n: b for n, b in moe.backbone.named_buffers()})
    swapped = {f"{n}." for n, m in moe.backbone.named_modules() if type(m).__name__ == "ExpertMLP"}
    adapt = {k.replace("__", "."): v for k, v in moe.adapt.items()} if bool(moe.adapted) else {}
    paths = []
    for t in moe.tasks:
        raw = dict(moe.head_configs[t])
        if fam.native:  # the merged Mixtral is a Mistral: one dense gated MLP of an expert's width
            keep = {k: v for k, v in raw.items() if k in MistralConfig().to_dict() and k != "model_type"}
            cfg = MistralConfig(**keep)
        else:
            cfg = AutoConfig.for_model(raw.pop("model_type"), **raw)
        clf = AutoModelForSequenceClassification.from_config(cfg).eval()
        bb = getattr(clf, fam.backbone)
        target = bb.state_dict()
        for n in target:
            if any(n.startswith(s) for s in swapped) or n not in own:
                continue
            target[n] = adapt.get(n, own[n])
        layers = fam.layer_list(bb)
        for m, l in enumerate(moe.moe_layers):
            prefix = next(n for n, mod in bb.named_modules() if mod is layers[l])
            for k in moe.keys:  # the template's names, relative to where the MLP sits in the layer
                target[f"{prefix}.{_mlp_prefix(fam)}{k}"] = state[k][m]
        state_all = {f"{fam.backbone}.{k}": v for k, v in target.items()}
        heads = moe.merge_heads if bool(moe.adapted) else moe.heads
        head = heads[t.replace("-", "_")]
        for k, v in clf.state_dict().items():
            if not k.startswith(f"{fam.backbone}."):
                state_all[k] = v
        extra = _head_extra(head, clf)
        if not extra:
            for part, mod in head.items():
                for k, v in mod.state_dict().items():
                    key = f"{fam.backbone}.pooler.{k}" if part == "pooler" else f"{part}.{k}"
                    state_all[key] = v
        else:
            state_all = {k: (torch.zeros_like(v) if any(w in k for w in ("classifier", "score", "pooler")) else v)
                         for k, v in state_all.items()}
        _save(clf, state_all, out / t, extra)
        paths.append(out / t)
    return paths


def _mlp_prefix(fam) -> str:
    """Where a template's parameters sit in a layer: BERT's block spans intermediate/output (its names
    are layer-relative already), DistilBERT's is `ffn`, the rest (a merged Mixtral's too) `mlp`."""
    if fam.name in ("bert", "roberta"):
        return ""  # "intermediate.dense.weight" / "output.dense.weight" are layer-relative already
    return {"distilbert": "ffn.", "gpt2": "mlp."}.get(fam.name, "mlp.")


def write_merged(moe, x, operator: str | None, out: str | Path) -> list[Path]:
    """Write the model merged at x (under `operator`, default the model's) as one checkpoint per task."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"merge: {out} exists and is not empty")
    x = moe.validate_x(np.asarray(x, dtype=float))
    op = operator or moe.merge_operator
    state = moe.merged_state(x, op)
    if hasattr(moe, "family"):
        kind = moe.backbone.config.model_type
        if moe.family.native and kind != "mixtral":
            raise ValueError(f"merge: a merged {kind} has no standard dense architecture to write (its shared "
                             "expert or attention norms); merged checkpoints of native MoEs: mixtral (as mistral)")
        if moe.family.native and moe.moe_layers != list(range(len(moe.family.layer_list(moe.backbone)))):
            raise ValueError("merge: a native MoE merged as a Mistral needs every layer to be a MoE layer "
                             f"(this one: {moe.moe_layers})")
        paths = _pool_checkpoints(moe, state, out)
    else:
        from tanbr_ray.moe.export import write_builtin_merged

        paths = write_builtin_merged(moe, state, out)
    atomic_write_json(out / "merged.json", {"x": x.tolist(), "operator": op, "model": dict(moe.identity),
                                            "tasks": list(moe.tasks), "adapted": bool(moe.adapted)})
    return paths


def read_merged(path: str | Path) -> dict:
    return json.loads((Path(path) / "merged.json").read_text())
