"""The transformer families a pool of fine-tunes may come from: where each layer's MLP block sits and
how it is swapped for experts, which linears RegMean solves, which token the classification head
reads, and how that head runs. A family the build does not know is refused by name (`family_of`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class BertBlock(nn.Module):
    """BERT's FFN block as one module: LN(h + W2·act(W1·h + b1) + b2) (intermediate + output)."""

    def __init__(self, intermediate: nn.Module, output: nn.Module):
        super().__init__()
        self.intermediate, self.output = intermediate, output

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(self.intermediate(h), h)


class PassThrough(nn.Module):
    """Stands where BERT's intermediate was: the expert block (in `output`) takes the layer input."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h


def _bert_get(layer) -> nn.Module:
    return BertBlock(layer.intermediate, layer.output)


def _bert_set(layer, mlp: nn.Module) -> None:
    layer.intermediate = PassThrough()
    layer.output = mlp  # called as output(intermediate_output, attention_output): both the layer input


def _attr(name: str) -> tuple[Callable, Callable]:
    return (lambda layer: getattr(layer, name)), (lambda layer, mlp: setattr(layer, name, mlp))


class GatedMLP(nn.Module):
    """One expert of a native MoE as a dense gated MLP: down(act(gate(h)) * up(h)) (Mixtral's experts
    are stored fused, [E, 2I, H] and [E, H, I]; an expert, or a merge of them, runs through this)."""

    def __init__(self, hidden: int, inner: int, act: nn.Module):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)
        self.act = act

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(h)) * self.up_proj(h))


def _mixtral_get(layer) -> nn.Module:
    ex = layer.mlp.experts
    return GatedMLP(ex.hidden_dim, ex.intermediate_dim, ex.act_fn)


def _fused_experts(layer) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor, int, bool]:
    """(each expert's GatedMLP parameters, the router's weight [E, H], experts per token, whether the
    top-k weights are renormalised) of a layer whose block stores its experts fused (transformers ≥ 5)."""
    block = layer.mlp
    out = []
    for e in range(block.experts.num_experts):
        gate, up = block.experts.gate_up_proj[e].chunk(2, dim=0)
        out.append({"gate_proj.weight": gate, "up_proj.weight": up, "down_proj.weight": block.experts.down_proj[e]})
    return out, block.gate.weight, int(block.gate.top_k), bool(getattr(block.gate, "norm_topk_prob", True))


def _shared_expert(layer) -> nn.ModuleDict | None:
    """Qwen2-MoE's always-on shared expert and its sigmoid gate, kept beside the merged experts."""
    block = layer.mlp
    if getattr(block, "shared_expert", None) is None:
        return None
    return nn.ModuleDict({"expert": block.shared_expert, "gate": block.shared_expert_gate})


def _is_sparse(layer) -> bool:
    return hasattr(layer.mlp, "experts") and hasattr(layer.mlp, "gate")


def _bert_head(head: nn.ModuleDict, feats: torch.Tensor) -> torch.Tensor:
    return head["classifier"](head["pooler"].activation(head["pooler"].dense(feats)))


def _roberta_head(head: nn.ModuleDict, feats: torch.Tensor) -> torch.Tensor:
    return head["classifier"](feats[:, None, :])  # RobertaClassificationHead reads token 0


def _distilbert_head(head: nn.ModuleDict, feats: torch.Tensor) -> torch.Tensor:
    return head["classifier"](F.relu(head["pre_classifier"](feats)))


def _score_head(head: nn.ModuleDict, feats: torch.Tensor) -> torch.Tensor:
    return head["score"](feats)


@dataclass(frozen=True)
class Family:
    """How one transformer family's layers, MLP blocks and classification heads are reached."""

    name: str
    model_types: tuple[str, ...]
    backbone: str  # attribute of *ForSequenceClassification holding the transformer
    layers: str  # dotted path from the backbone to its list of layers
    get_mlp: Callable[[nn.Module], nn.Module]
    set_mlp: Callable[[nn.Module, nn.Module], None]
    grams: dict[str, str]  # MLP linear weight -> the Gram of its input (RegMean)
    transposed: frozenset  # MLP weights stored [in, out] (Conv1D)
    token: str  # the token the head reads: "first" or "last" (last real token, right padding)
    head_parts: tuple[str, ...]  # head modules: attributes of the classifier model (or "pooler")
    head: Callable[[nn.ModuleDict, torch.Tensor], torch.Tensor]
    token_types: bool  # the backbone reads token type ids
    decoder: bool  # a causal LM backbone (forward takes use_cache)
    # a native MoE: a layer's block already holds experts and a router (`native_experts` reads them);
    # `get_mlp` then builds an empty dense MLP of one expert's shape
    native_experts: Callable[[nn.Module], tuple] | None = None
    shared_of: Callable[[nn.Module], nn.ModuleDict | None] | None = None  # a native block's shared expert

    @property
    def native(self) -> bool:
        return self.native_experts is not None

    def sparse_layers(self, backbone: nn.Module) -> list[int]:
        """A native MoE's layers whose block holds experts (Qwen2-MoE may keep some layers dense)."""
        return [l for l, layer in enumerate(self.layer_list(backbone)) if _is_sparse(layer)]

    def block_params(self, layer: nn.Module) -> list[nn.Parameter]:
        """The parameters that become (or are) the experts in a layer: its MLP block's."""
        return list((layer.mlp if self.native else self.get_mlp(layer)).parameters())

    def layer_list(self, backbone: nn.Module) -> nn.ModuleList:
        obj = backbone
        for part in self.layers.split("."):
            obj = getattr(obj, part)
        return obj

    def head_modules(self, clf: nn.Module) -> nn.ModuleDict:
        """The per-task head of a classifier checkpoint (BERT's pooler is fine-tuned with it)."""
        return nn.ModuleDict({p: getattr(getattr(clf, self.backbone), p) if p == "pooler" else getattr(clf, p)
                              for p in self.head_parts})

    def pick(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.token == "first":
            return hidden[:, 0]
        last = attention_mask.sum(1).long().clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


FAMILIES = (
    Family("bert", ("bert", "roberta"), "", "encoder.layer", _bert_get, _bert_set,
           {"intermediate.dense.weight": "in", "output.dense.weight": "act"}, frozenset(), "first",
           (), _bert_head, True, False),
    Family("distilbert", ("distilbert",), "distilbert", "transformer.layer", *_attr("ffn"),
           {"lin1.weight": "in", "lin2.weight": "act"}, frozenset(), "first", ("pre_classifier", "classifier"),
           _distilbert_head, False, False),
    Family("gpt2", ("gpt2",), "transformer", "h", *_attr("mlp"), {"c_fc.weight": "in", "c_proj.weight": "act"},
           frozenset({"c_fc.weight", "c_proj.weight"}), "last", ("score",), _score_head, False, True),
    Family("llama", ("llama", "mistral", "qwen2"), "model", "layers", *_attr("mlp"),  # gated MLPs
           {"gate_proj.weight": "in", "up_proj.weight": "in", "down_proj.weight": "act"}, frozenset(), "last",
           ("score",), _score_head, False, True),
    Family("mixtral", ("mixtral", "qwen2_moe", "qwen3_moe"), "model", "layers", _mixtral_get, *_attr("mlp")[1:],
           {"gate_proj.weight": "in", "up_proj.weight": "in", "down_proj.weight": "act"}, frozenset(), "last",
           ("score",), _score_head, False, True, _fused_experts, _shared_expert),
)


def family_of(model_type: str, where: str) -> Family:
    """The family of a checkpoint's `model_type`, with the BERT family's per-type head and backbone."""
    for f in FAMILIES:
        if model_type in f.model_types:
            if f.name == "bert":  # RoBERTa: its own backbone attribute and classification head
                bert = model_type == "bert"
                return Family(model_type, (model_type,), model_type, f.layers, f.get_mlp, f.set_mlp, f.grams,
                              f.transposed, f.token, ("pooler", "classifier") if bert else ("classifier",),
                              _bert_head if bert else _roberta_head, bert, False)
            return f
    known = sorted(t for f in FAMILIES for t in f.model_types)
    raise ValueError(f"{where}: model_type {model_type!r} has an MLP layout this build does not know; known: {known}")
