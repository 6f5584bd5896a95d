"""LoRA injection with peft, targeting the modules kohya's LoRA targets (see shared/design/LORA_FORMAT.md)."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.dora import DoraConv2dLayer, DoraLinearLayer

ADAPTER = "default"
UNET_ATTENTION_ONLY = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                       "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
UNET_ATTN_SUFFIXES = (
    "proj_in", "proj_out", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2",
)
TE_SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
CONV_PARENTS = ("resnets", "downsamplers", "upsamplers")


def unet_targets(unet: torch.nn.Module, conv: bool = False, target: str = "kohya") -> tuple[list[str], list[str]]:
    """(linear/1x1 targets inside the transformer blocks, 3x3-conv targets of the ResNet blocks for LoCon)."""
    attn, convs = [], []
    suffixes = UNET_ATTENTION_ONLY if target == "attention" else UNET_ATTN_SUFFIXES
    for name, mod in unet.named_modules():
        if ".attentions." in name and name.endswith(suffixes) and isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            attn.append(name)
        elif conv and any(f".{p}." in name for p in CONV_PARENTS) and isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
            if name.endswith((".conv1", ".conv2", ".conv_shortcut", ".conv", ".time_emb_proj")):
                convs.append(name)
    return attn, convs


def text_encoder_targets(te: torch.nn.Module) -> list[str]:
    return [n for n, m in te.named_modules() if n.endswith(TE_SUFFIXES) and isinstance(m, torch.nn.Linear)]


# ----------------------------------------------------------------------------------------------- DoRA
# peft's DoRA keeps one magnitude per *output* row. The files web UIs read (kohya/LyCORIS `dora_scale`, applied by
# ComfyUI's weight_decompose and A1111's apply_weight_decompose) keep one per *input* column:
#     W' = (W + s * up @ down) * dora_scale / ||W + s * up @ down||_column
# The two are different models, so we train the one the file can hold: peft's DoRA layers with the norm taken
# over columns. Scaling input channel i by g_i is scaling column i of W, so the forward is W(g*x) + s*B(A(g*x)).
# `strength` (peft's scaling / the scaling at creation) blends as ComfyUI and A1111 do: W + strength * (W' - W).


class _ColumnDora:
    unit_scaling: float = 1.0  # alpha / rank when the layer was made: strength 1

    def column_norm(self, weight, lora_weight, scaling):
        w = weight + scaling * lora_weight
        return w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)

    def get_weight_norm(self, weight, lora_weight, scaling, adapter_name=None):
        return self.column_norm(weight, lora_weight, scaling)

    def forward(self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None, adapter_name="default"):
        weight = base_layer.weight.to(x.dtype)
        r = lora_A.weight.shape[0]
        delta = (lora_B.weight.reshape(-1, r) @ lora_A.weight.reshape(r, -1)).reshape(weight.shape).to(x.dtype)
        norm = self.column_norm(weight, delta.detach(), self.unit_scaling).detach()  # a constant, as in the paper
        g = self.gain(self.weight / norm)
        out = self.base_op(x * (g - 1), weight, base_layer) + lora_B(lora_A(x * g)) * self.unit_scaling
        return out * (scaling / self.unit_scaling)


class ColumnDoraLinear(_ColumnDora, DoraLinearLayer):
    @staticmethod
    def gain(g):
        return g  # features are the last dimension

    @staticmethod
    def base_op(x, weight, base_layer):
        return F.linear(x, weight)


class ColumnDoraConv2d(_ColumnDora, DoraConv2dLayer):
    @staticmethod
    def gain(g):
        return g.view(1, -1, 1, 1)  # channels are dimension 1

    @staticmethod
    def base_op(x, weight, base_layer):
        return F.conv2d(x, weight, None, base_layer.stride, base_layer.padding, base_layer.dilation, base_layer.groups)


def use_column_dora(model: torch.nn.Module, adapter: str = ADAPTER, magnitudes: dict | None = None) -> int:
    """Give every DoRA (or, with `magnitudes` {module name: dora_scale}, every named LoRA) layer of `adapter` a
    column-wise magnitude: initialised from the base weight's column norms, or taken from a file. Returns how many."""
    n = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, LoraLayer) or adapter not in mod.lora_A:
            continue
        if magnitudes is None and adapter not in mod.lora_magnitude_vector:
            continue
        if magnitudes is not None and name not in magnitudes:
            continue
        base = mod.get_base_layer()
        layer = (ColumnDoraConv2d if isinstance(base, torch.nn.Conv2d) else ColumnDoraLinear)(fan_in_fan_out=False)
        layer.unit_scaling = float(mod.scaling[adapter])
        A, B = mod.lora_A[adapter].weight, mod.lora_B[adapter].weight
        if magnitudes is None:
            layer.update_layer(base_layer=base, lora_A=A, lora_B=B, scaling=layer.unit_scaling)
        else:
            layer.weight = torch.nn.Parameter(magnitudes[name].reshape(-1).to(A.device, torch.float32), requires_grad=False)
            from peft.tuners.lora.variants import DoraConv2dVariant, DoraLinearVariant

            mod.lora_variant[adapter] = DoraConv2dVariant() if isinstance(base, torch.nn.Conv2d) else DoraLinearVariant()
            if "lora_magnitude_vector" not in mod.adapter_layer_names:
                mod.adapter_layer_names = mod.adapter_layer_names[:] + ("lora_magnitude_vector",)
        mod.lora_magnitude_vector[adapter] = layer
        n += 1
    return n


# The adapter parameters of each network type, as peft names them (and LyCORIS' files do, for LoHa and LoKr).
PARAM_MARKERS = ("lora_", "hada_", "lokr_")
_MODULE_OF = re.compile(r"^(.*)\.(lora_A|lora_B|lora_magnitude_vector|lora_embedding_[AB]|(?:hada|lokr)_[a-z0-9_]+?)(\.|$)")


def is_adapter_param(name: str) -> bool:
    """Whether a parameter (or state-dict key) belongs to an adapter of any network type."""
    return any(m in name for m in PARAM_MARKERS)


def module_of(param_name: str) -> str:
    """The adapted module of an adapter parameter: 'a.b.to_q' of 'a.b.to_q.lora_A.default.weight' or of
    'a.b.to_q.hada_w1_a.default'."""
    m = _MODULE_OF.match(param_name)
    if not m:
        raise ValueError(f"not an adapter parameter: {param_name}")
    return m[1]


@dataclass(frozen=True)
class Network:
    """Which adapter peft puts on each module, and its options: LoRA (with DoRA), or LyCORIS' LoHa or LoKr
    (peft's LoHa/LoKr layers: the same injection system as LoRA, and the key layout LyCORIS writes)."""
    type: str = "lora"
    dropout: float = 0.0  # LoRA's (kohya's dropout on the down output)
    dora: bool = False
    rank_dropout: float = 0.0  # LoHa/LoKr: LyCORIS' own, given to peft's layers (LoRA's are hooks: add_dropouts)
    module_dropout: float = 0.0
    tucker: bool = False  # CP decomposition of 3x3 convs (peft's use_effective_conv2d)
    factor: int = -1  # LoKr
    decompose_both: bool = False
    full_matrix: bool = False

    @classmethod
    def of(cls, cfg) -> "Network":
        lyco = cfg.network_type != "lora"
        return cls(cfg.network_type, cfg.dropout, cfg.use_dora, cfg.rank_dropout if lyco else 0.0,
                   cfg.module_dropout if lyco else 0.0, cfg.use_tucker, cfg.lokr_factor, cfg.lokr_decompose_both,
                   cfg.lokr_full_matrix)

    def peft_config(self, r: int, alpha: float, targets: list[str], rank_pattern: dict, alpha_pattern: dict):
        common = dict(r=r, target_modules=targets, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
        if self.type == "lora":
            # kaiming-uniform down, zero up: training starts from the base model exactly
            return LoraConfig(lora_alpha=alpha, lora_dropout=self.dropout, init_lora_weights=True, use_dora=self.dora,
                              **common)
        lyco = dict(alpha=alpha, rank_dropout=self.rank_dropout, module_dropout=self.module_dropout,
                    use_effective_conv2d=self.tucker, init_weights=True, **common)  # one factor zero: starts at the base
        if self.type == "loha":
            return LoHaConfig(**lyco)
        return LoKrConfig(decompose_both=self.decompose_both, decompose_factor=self.factor, **lyco)


def full_rank(model: torch.nn.Module, name: str) -> int:
    """A rank at which peft's LoKr keeps both Kronecker factors whole (LyCORIS' full_matrix)."""
    w = model.get_submodule(name).weight
    return int(max(w.shape[0], w.shape[1]))


def inject(model: torch.nn.Module, targets: list[str], rank: int, alpha: float, dropout: float = 0.0,
           conv_targets: list[str] | None = None, conv_rank: int = 0, conv_alpha: float = 1.0,
           dora: bool = False, ranks: dict[str, tuple[int, float]] | None = None,
           network: Network | None = None) -> dict[str, float]:
    """Add an adapter to `model` in place: `rank`/`alpha` for `targets`, `conv_rank`/`conv_alpha` for
    `conv_targets`, `ranks` {module: (rank, alpha)} where a module has its own (rank 0: nothing there).
    `network` says which type (LoRA by default, with `dropout` and `dora`). Returns module name -> alpha (needed
    for export)."""
    network = network or Network(dropout=dropout, dora=dora)
    conv_targets = conv_targets or []
    own = {n: (conv_rank, conv_alpha) for n in conv_targets}
    own.update(ranks or {})
    every = [n for n in list(targets) + list(conv_targets) if own.get(n, (rank, alpha))[0] > 0]
    if not every:
        return {}
    if network.full_matrix:  # a rank no factor is cut to; alpha = rank: the scale LyCORIS gives full matrices, 1
        own = {n: (full_rank(model, n),) * 2 for n in every}
    special = {n: own[n] for n in every if n in own and (n in conv_targets or own[n] != (rank, alpha))}
    pattern = lambda n: f"^{n}$".replace(".", r"\.")  # noqa: E731  (exact module names)
    cfg = network.peft_config(rank, alpha, every, {pattern(n): r for n, (r, _) in special.items()},
                              {pattern(n): a for n, (_, a) in special.items()})
    inject_adapter_in_model(cfg, model, adapter_name=ADAPTER)
    if network.dora:
        use_column_dora(model)
    alphas = {n: float(own.get(n, (rank, alpha))[1]) for n in every}
    if network.type == "lokr":
        alphas.update(whole_lokr_scale(model))
    for p_name, p in model.named_parameters():
        p.requires_grad_(is_adapter_param(p_name))
    return alphas


def whole_lokr_scale(model: torch.nn.Module) -> dict[str, float]:
    """LoKr modules whose two Kronecker factors are both whole matrices have no rank, and every loader (LyCORIS,
    ComfyUI, A1111) applies them at scale 1; peft would scale them by alpha / r. Give them alpha = r, as LyCORIS
    does, so that the trained weight is the one loaded. Returns {module: its new alpha}."""
    from peft.tuners.lokr import LoKrLayer

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoKrLayer) and ADAPTER in m.lokr_w1 and ADAPTER in m.lokr_w2:
            m.alpha[ADAPTER] = float(m.r[ADAPTER])
            m.scaling[ADAPTER] = 1.0
            out[name] = float(m.r[ADAPTER])
    return out


def skip_input_casting(model: torch.nn.Module) -> int:
    """Under autocast, let each peft LoRA layer take its input in the dtype it comes in: peft would cast it to the
    fp32 LoRA weight's dtype, and autocast casts it straight back for the matmul, so both casts can go (bf16 ->
    fp32 -> bf16 is exact). Not for DoRA, whose norms see the input. Returns the layers changed."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    n = 0
    for m in model.modules():
        if isinstance(m, BaseTunerLayer) and hasattr(m, "cast_input_dtype_enabled"):
            m.cast_input_dtype_enabled = False
            n += 1
    return n


# ----------------------------------------------------------------------------------------------- kohya's dropouts
# Rank dropout and module dropout as sd-scripts' LoRAModule applies them, on peft's own layers through forward hooks
# (no layer written here): each is active only while the module trains with gradients, so samples (no_grad),
# validation (eval mode) and the exported file never see it. Their random draws come from the global generator,
# which the loop seeds per micro-step: a resumed run drops what an uninterrupted one did.
def add_dropouts(model: torch.nn.Module, rank_dropout: float = 0.0, module_dropout: float = 0.0) -> int:
    """Hook rank dropout on each LoRA's down (A) output and module dropout on its up (B) output. Returns the number
    of LoRA modules hooked."""
    if not (rank_dropout or module_dropout):
        return 0
    n = 0
    for mod in model.modules():
        if not isinstance(mod, LoraLayer) or ADAPTER not in mod.lora_A:
            continue
        if rank_dropout:
            mod.lora_A[ADAPTER].register_forward_hook(_rank_dropout(mod, rank_dropout))
        if module_dropout:
            mod.lora_B[ADAPTER].register_forward_hook(_module_dropout(mod, module_dropout))
        n += 1
    return n


def _active(layer) -> bool:
    return layer.training and torch.is_grad_enabled()


def _rank_dropout(layer, p: float):
    def hook(_module, _inputs, out):
        if not _active(layer):
            return out
        shape = (out.shape[0], out.shape[-1]) if out.dim() != 4 else (out.shape[0], out.shape[1])
        keep = (torch.rand(shape) > p).to(out.device, out.dtype) / (1.0 - p)  # kohya: mask, then scale 1/(1-p)
        if out.dim() == 3:
            keep = keep.unsqueeze(1)
        elif out.dim() == 4:
            keep = keep[:, :, None, None]
        return out * keep
    return hook


def _module_dropout(layer, p: float):
    def hook(_module, _inputs, out):
        if _active(layer) and float(torch.rand(1)) < p:
            return out * 0  # this step the module adds nothing: the base layer's output alone
        return out
    return hook


def loraplus_groups(groups: list[dict], up_params: set[int], ratio: float) -> list[dict]:
    """LoRA+ (Hayou et al.; sd-scripts' loraplus_lr_ratio): each group's up (B) matrices at `ratio` x its rate."""
    if not ratio:
        return groups
    out = []
    for g in groups:
        down = [p for p in g["params"] if id(p) not in up_params]
        up = [p for p in g["params"] if id(p) in up_params]
        out += [{**g, "params": down}] if down else []
        out += [{**g, "params": up, "lr": g["lr"] * ratio}] if up else []
    return out


def up_parameters(model: torch.nn.Module) -> set[int]:
    """ids of the LoRA up (B) matrices of a module tree."""
    return {id(p) for n, p in model.named_parameters() if ".lora_B." in n}


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trained adapter parameters (any network type)."""
    return [p for n, p in model.named_parameters() if is_adapter_param(n) and p.requires_grad]


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """peft's adapter weights: '<module>.lora_A.weight' / '<module>.lora_B.weight' (LoHa: '<module>.hada_w1_a', ...;
    LoKr: '<module>.lokr_w1', ...)."""
    return {k: v.detach() for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER).items()}


def load_lora_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"LoRA state does not fit this model: {len(unexpected)} unexpected keys, e.g. {unexpected[0]}")


def set_lora_scale(model: torch.nn.Module, scale: float) -> None:
    """Multiply every adapter's delta by `scale` (0 = base model) without touching weights."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lycoris_utils import LycorisLayer

    for m in model.modules():
        if isinstance(m, LoraLayer):
            for name in m.scaling:
                m.scaling[name] = scale * m.lora_alpha[name] / m.r[name]
        elif isinstance(m, LycorisLayer):
            for name in m.scaling:
                m.scaling[name] = scale * m.alpha[name] / m.r[name]


def name_modules(model, part: str, modules) -> dict[str, str]:
    """Give each targeted module its kohya file name, once, as the LoRA is injected (kohya's networks/lora.py does
    the same): `model.lora_names[part]` then answers every later question (its block, its key in the file)."""
    from trainer.loras.format import layout_of, module_names

    names = module_names(part, modules, model.family, layout_of(model.unet.config))
    model.lora_names.setdefault(part, {}).update(names)
    return names


def unet_blocks(model, modules) -> dict[str, str | None]:
    """kohya's block (IN04, MID, OUT02, ...) of each UNet module path, from the names given at injection."""
    from trainer.models import blocks

    names = model.lora_names.get("unet", {})
    missing = [m for m in modules if m not in names]
    if missing:
        names = {**names, **name_modules(model, "unet", missing)}
    return {n: blocks.of(names[n]) for n in modules}


def inject_for_config(model, cfg) -> dict[str, dict[str, float]]:
    """Inject the adapters a TrainConfig asks for into a LoadedModel (per-block ranks and alphas included).
    Returns part -> {module: alpha}."""
    from trainer.models.blocks import Plan

    plan = Plan(cfg, model.family)
    attn, conv = unet_targets(model.unet, conv=cfg.conv_rank > 0 or plan.conv_dims is not None, target=cfg.network_target)
    name_modules(model, "unet", attn + conv)
    ranks = None
    if plan.active:
        where = unet_blocks(model, attn + conv)
        ranks = {n: plan.rank(where[n]) for n in attn}
        ranks.update({n: plan.rank(where[n], conv=True) for n in conv})
    network = Network.of(cfg)
    alphas = {"unet": inject(model.unet, attn, cfg.rank, cfg.alpha, conv_targets=conv, conv_rank=cfg.conv_rank,
                             conv_alpha=cfg.conv_alpha, ranks=ranks, network=network)}
    add_dropouts(model.unet, cfg.rank_dropout, cfg.module_dropout)  # LoRA's; peft's LoHa/LoKr layers have theirs
    if cfg.train_text_encoder:
        for name, te in zip(model.spec.te_parts, model.text_encoders):
            targets = text_encoder_targets(te)
            name_modules(model, name, targets)
            alphas[name] = inject(te, targets, cfg.rank, cfg.alpha, network=network)
            add_dropouts(te, cfg.rank_dropout, cfg.module_dropout)
    return alphas


def unet_param_groups(model, cfg) -> list[dict]:
    """Optimizer groups of the UNet LoRA: one at unet_lr, or one per block learning-rate weight."""
    from trainer.models.blocks import Plan

    params = [(n, p) for n, p in model.unet.named_parameters() if is_adapter_param(n) and p.requires_grad]
    plan = Plan(cfg, model.family)
    if plan.lr is None:
        return [{"params": [p for _, p in params], "lr": cfg.unet_lr}]
    modules = {module_of(n) for n, _ in params}
    where = unet_blocks(model, modules)
    groups: dict[float, list] = {}
    for n, p in params:
        groups.setdefault(plan.lr_weight(where[module_of(n)]), []).append(p)
    return [{"params": ps, "lr": cfg.unet_lr * w} for w, ps in groups.items()]


def part_modules(model) -> dict[str, torch.nn.Module]:
    return {"unet": model.unet, **dict(zip(model.spec.te_parts, model.text_encoders))}


def load_parts(model, parts: dict[str, tuple[dict, dict]]) -> None:
    """Load saved LoRA weights (checkpoint 'parts') into an injected LoadedModel."""
    mods = part_modules(model)
    for name, (state, _) in parts.items():
        load_lora_state(mods[name], state)
