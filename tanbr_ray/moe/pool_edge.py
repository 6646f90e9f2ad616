"""What an edge node holds of a pool (or a native MoE): its backbone and heads without the experts,
plus one merged MLP per MoE layer per version — the pool's counterpart of the built-in `DenseModel`.

The package is the pool's stored config (JSON: the shell is rebuilt from it, as the cache loader
does) and plain tensors: the backbone without the MoE layers' MLPs, with merge-aware adaptation
folded in, and the heads merged mode reads. A version's MLPs are modules of their own (the template
copied with the merged tensors assigned), so versions on one shell run from several threads at once
without swapping any module's parameters.
"""

from __future__ import annotations

import contextvars
import copy
from collections.abc import Mapping

import torch
from torch import nn

from tanbr_ray.moe.pool_model import ExpertMLP, PoolMoE, features, install_expert_mlps, read_head, trunk

_VERSION: contextvars.ContextVar[list[nn.Module]] = contextvars.ContextVar("tanbr_pool_version")
META_KEYS = ("pool_config", "backbone_config", "head_configs", "mean_mlp_heads", "pooling", "moe_layers")


def pool_shell_parts(moe: PoolMoE) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the shell's config, its tensors) for merged serving: the experts, router and MoE layers' MLPs
    stay with the router; adapted parameters and heads replace the plain ones when merged mode adapts."""
    config = {k: moe.meta[k] for k in META_KEYS if k in moe.meta}  # the stored config it was loaded or saved with
    adapted = bool(moe.adapted.item())
    own = {f"backbone.{n}": moe.adapt[n.replace(".", "__")] for n in moe.adapt_names()} if adapted else {}
    skip = tuple(f"backbone.{n}.template." for n, m in moe.backbone.named_modules() if isinstance(m, ExpertMLP))
    tensors = {k: own.get(k, v) for k, v in moe.state_dict().items()
               if k.startswith("backbone.") and not k.startswith(skip)}
    heads = moe.merge_heads if adapted else moe.heads
    tensors.update((f"heads.{n}", p) for n, p in heads.state_dict().items())
    tensors.update((k, v) for k, v in _computed_buffers(moe.backbone, "backbone.").items() if not k.startswith(skip))
    return config, {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}


def _computed_buffers(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Buffers a module computes when built and does not store (rotary frequencies, position ids): a shell
    built without storage (meta) takes them from the package instead."""
    return {prefix + ".".join(filter(None, (name, b))): m._buffers[b] for name, m in module.named_modules()
            for b in m._non_persistent_buffers_set if m._buffers.get(b) is not None}


class PoolShell(nn.Module):
    """A pool's backbone and heads with no MLP in its MoE layers: `with_ffn(state)` gives a version."""

    def __init__(self, config: dict):
        from tanbr_ray.moe.pool_store import pool_modules

        super().__init__()
        cfg, self.family, self.backbone, heads = pool_modules(config, "edge package")
        self.tasks = list(cfg.tasks)
        self.pooling = config.get("pooling") or self.family.token
        self.moe_layers = list(config.get("moe_layers") or cfg.moe_layers or
                               range(len(self.family.layer_list(self.backbone))))
        self.mlps = install_expert_mlps(self.family, self.backbone, self.moe_layers, self)
        for mlp in self.mlps:  # only the template's structure is kept, outside the module tree (no weights to
            template = mlp._modules.pop("template").to("meta").eval()  # load or move): each version brings its own
            mlp.__dict__["template"] = template
        self.keys = [n for n, _ in self.mlps[0].template.named_parameters()]
        self.heads = nn.ModuleDict({t.replace("-", "_"): heads[t] for t in self.tasks})
        self.eval()

    @classmethod
    def from_package(cls, config: dict, tensors: Mapping[str, torch.Tensor], tasks: list[str]) -> "PoolShell":
        """The shell an edge node builds from `PoolMoE.edge_parts`: its modules made without storage (a
        native MoE's experts are never allocated here), then given the package's tensors."""
        with torch.device("meta"):
            shell = cls(config)
        if shell.tasks != list(tasks):
            raise ValueError(f"edge package: tasks {list(tasks)} != its config's {shell.tasks}")
        shell.to_empty(device="cpu")
        computed = _computed_buffers(shell.backbone, "backbone.")
        try:
            shell.load_state_dict({k: v for k, v in tensors.items() if k not in computed}, strict=True)
            if set(computed) - set(tensors):
                raise RuntimeError(f"missing computed buffers {sorted(set(computed) - set(tensors))[:5]}")
        except RuntimeError as e:
            raise ValueError(f"edge package does not match its config: {str(e)[:300]}") from None
        for key in computed:
            owner, _, name = key.removeprefix("backbone.").rpartition(".")
            shell.backbone.get_submodule(owner).register_buffer(name, tensors[key].clone(), persistent=False)
        return shell

    def run_mlp(self, m: int, template: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return _VERSION.get()[m](h)

    def with_ffn(self, state: Mapping[str, torch.Tensor]) -> "PoolVersion":
        """This shell with merged MLPs ({parameter: [moe layers, ...]}, as `merged_state` gives them)."""
        ref = next(self.parameters())
        modules = []
        for m, mlp in enumerate(self.mlps):
            want = dict(mlp.template.named_parameters())
            own = {}
            for k in self.keys:
                t = state.get(k)
                if t is None or tuple(t.shape) != (len(self.mlps), *want[k].shape):
                    raise ValueError(f"merged MLP: {k} missing or shaped {getattr(t, 'shape', None)}, "
                                     f"want {(len(self.mlps), *want[k].shape)}")
                own[k] = t[m].detach().to(device=ref.device, dtype=ref.dtype).contiguous()
            module = copy.deepcopy(mlp.template)
            module.load_state_dict(own, assign=True)
            modules.append(module.requires_grad_(False))
        return PoolVersion(self, modules)

    def forward(self, input_ids, attention_mask, token_type_ids, task: str) -> torch.Tensor:
        key = task.replace("-", "_")
        if key not in self.heads:
            raise ValueError(f"unknown task {task!r}; tasks: {self.tasks}")
        hidden = trunk(self.family, self.backbone, input_ids, attention_mask, token_type_ids)
        return read_head(self.family, self.heads[key], features(self.family, self.pooling, hidden, attention_mask))


class PoolVersion:
    """One merged version on a shared PoolShell."""

    def __init__(self, shell: PoolShell, modules: list[nn.Module]):
        self.shell, self.modules = shell, modules

    def __call__(self, input_ids, attention_mask, token_type_ids, task: str) -> torch.Tensor:
        token = _VERSION.set(self.modules)
        try:
            return self.shell(input_ids, attention_mask, token_type_ids, task)
        finally:
            _VERSION.reset(token)

    def tensors(self) -> list[torch.Tensor]:
        """What this version holds beyond its shell."""
        return [p for m in self.modules for p in m.parameters()]

    def resident_bytes(self) -> int:
        held = list(self.shell.parameters()) + self.tensors()
        return int(sum(t.numel() * t.element_size() for t in held))
