"""Model configuration: one frozen dataclass, presets, and Hugging Face `config.json` round trip.

Field names are the Hugging Face DeepSeek-V3 / Kimi K2 `config.json` keys, so the checkpoint config maps onto
`ModelConfig` one to one. Run-time choices (dtypes, kernels, remat) live beside them and are not written to HF.
Every field is validated at construction; an invalid value raises `ValueError` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

ATTENTION_IMPLS = ("xla", "pallas")
MOE_IMPLS = ("ragged_dot", "capacity", "pallas")
EXPERT_PARALLEL_IMPLS = ("all_to_all", "ragged_all_to_all")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")
PALLAS_BACKENDS = ("auto", "tpu", "gpu", "xla")
SHARDING_STRATEGIES = ("fsdp_tp_ep", "fsdp_tp")   # tables in kimi_jax/sharding.py
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN rope scaling (the only scaling K2 / DeepSeek-V3 use); HF `rope_scaling` with type "yarn"."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self):
        if self.factor <= 0:
            raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}")
        if self.original_max_position_embeddings <= 0:
            raise ValueError("rope_scaling.original_max_position_embeddings must be > 0, got "
                             f"{self.original_max_position_embeddings}")

    @classmethod
    def from_hf(cls, d: dict) -> "RopeScaling":
        kind = d.get("type", d.get("rope_type"))
        if kind != "yarn":
            raise ValueError(f"rope_scaling.type must be 'yarn' (the only scaling implemented), got {kind!r}")
        known = {"type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                 "mscale", "mscale_all_dim", "truncate", "rope_theta"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"rope_scaling has unknown keys {sorted(unknown)}")
        return cls(factor=float(d["factor"]),
                   original_max_position_embeddings=int(d["original_max_position_embeddings"]),
                   beta_fast=float(d.get("beta_fast") or 32.0), beta_slow=float(d.get("beta_slow") or 1.0),
                   mscale=d.get("mscale"), mscale_all_dim=d.get("mscale_all_dim"),
                   truncate=bool(d.get("truncate", True)))

    def to_hf(self) -> dict:
        d = {"type": "yarn", "factor": self.factor,
             "original_max_position_embeddings": self.original_max_position_embeddings,
             "beta_fast": self.beta_fast, "beta_slow": self.beta_slow}
        if self.mscale is not None:
            d["mscale"] = self.mscale
        if self.mscale_all_dim is not None:
            d["mscale_all_dim"] = self.mscale_all_dim
        if not self.truncate:
            d["truncate"] = False
        return d


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The K2 / DeepSeek-V3 architecture (HF names; the defaults are Kimi K2's published config.json) plus
    run-time settings (below the marker comment)."""

    vocab_size: int = 163840
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 1
    num_attention_heads: int = 64
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 384
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.827
    rms_norm_eps: float = 1e-6
    rope_theta: float = 50000.0
    max_position_embeddings: int = 131072
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    model_type: str = "kimi_k2"
    # ---- run-time settings (not part of the HF config) ----
    dtype: str = "float32"            # compute dtype of activations and matmuls
    param_dtype: str = "float32"      # storage dtype of parameters (master weights)
    attention_impl: str = "xla"
    moe_impl: str = "ragged_dot"
    capacity_factor: float = 1.25     # used by moe_impl="capacity" and the fixed-capacity expert-parallel exchange
    expert_parallel: bool = True      # use all-to-all expert parallelism when the mesh's `expert` axis is > 1
    expert_parallel_impl: str = "all_to_all"
    expert_parallel_capacity_factor: float | None = None  # None: dropless worst case for the all_to_all path
    remat_policy: str = "none"
    pallas_backend: str = "auto"      # backend of the Pallas kernels: "auto" (by platform), "tpu", "gpu", "xla"
    pallas_interpret: bool = False    # run the chosen kernel in Pallas interpret mode (CPU tests)
    pallas_warp_specialized: bool = False  # GPU: producer + two consumer warpgroup kernels (not yet timed)
    sharding_strategy: str = "fsdp_tp_ep"  # parameter sharding rules (kimi_jax/sharding.py STRATEGIES)

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                    "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                    "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok", "n_group",
                    "topk_group", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise ValueError(f"ModelConfig.q_lora_rank must be a positive int or None, got {self.q_lora_rank!r}")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ValueError(f"ModelConfig.first_k_dense_replace must be in [0, num_hidden_layers="
                             f"{self.num_hidden_layers}], got {self.first_k_dense_replace}")
        if self.n_shared_experts < 0:
            raise ValueError(f"ModelConfig.n_shared_experts must be >= 0, got {self.n_shared_experts}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(f"ModelConfig.num_experts_per_tok ({self.num_experts_per_tok}) must be <= "
                             f"n_routed_experts ({self.n_routed_experts})")
        if self.n_routed_experts % self.n_group:
            raise ValueError(f"ModelConfig.n_group ({self.n_group}) must divide n_routed_experts "
                             f"({self.n_routed_experts})")
        if self.topk_group > self.n_group:
            raise ValueError(f"ModelConfig.topk_group ({self.topk_group}) must be <= n_group ({self.n_group})")
        if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
            raise ValueError("ModelConfig.n_group: group-limited routing ranks groups by their top-2 scores, so "
                             "every group needs >= 2 experts")
        if self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
            raise ValueError(f"ModelConfig.num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts "
                             f"in the topk_group={self.topk_group} selected groups")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"ModelConfig.qk_rope_head_dim must be even (rotated in pairs), got "
                             f"{self.qk_rope_head_dim}")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"ModelConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.routed_scaling_factor <= 0:
            raise ValueError(f"ModelConfig.routed_scaling_factor must be > 0, got {self.routed_scaling_factor}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError("ModelConfig.rope_scaling must be a RopeScaling or None (use ModelConfig.from_hf "
                             "for a dict)")
        for name, allowed in (("dtype", DTYPES), ("param_dtype", DTYPES), ("attention_impl", ATTENTION_IMPLS),
                              ("moe_impl", MOE_IMPLS), ("expert_parallel_impl", EXPERT_PARALLEL_IMPLS),
                              ("remat_policy", REMAT_POLICIES), ("pallas_backend", PALLAS_BACKENDS),
                              ("sharding_strategy", SHARDING_STRATEGIES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ModelConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.capacity_factor <= 0:
            raise ValueError(f"ModelConfig.capacity_factor must be > 0, got {self.capacity_factor}")
        if self.expert_parallel_capacity_factor is not None and self.expert_parallel_capacity_factor <= 0:
            raise ValueError("ModelConfig.expert_parallel_capacity_factor must be > 0 or None, got "
                             f"{self.expert_parallel_capacity_factor}")

    # ---- derived sizes (one truth per number: everything else reads these) ----
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_dense_layers(self) -> int:
        return self.first_k_dense_replace

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.n_shared_experts

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim**-0.5, times mscale(factor, mscale_all_dim)**2 under YaRN (HF `yarn_apply_mscale`)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim:
            m = yarn_mscale(rs.factor, rs.mscale_all_dim)
            scale *= m * m
        return scale

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face config.json ----
    @classmethod
    def from_hf(cls, source: dict | str | os.PathLike, **runtime) -> "ModelConfig":
        """Build from an HF `config.json` (a dict, a file path, or a checkpoint directory).

        `runtime` sets the run-time fields (dtype, moe_impl, ...). Unknown architecture keys are ignored except
        the ones that would change the math (checked below).
        """
        if not isinstance(source, dict):
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path) as f:
                source = json.load(f)
        d = dict(source)
        if d.get("scoring_func", "sigmoid") != "sigmoid":
            raise ValueError(f"config.json scoring_func must be 'sigmoid', got {d['scoring_func']!r}")
        if d.get("topk_method", "noaux_tc") != "noaux_tc":
            raise ValueError(f"config.json topk_method must be 'noaux_tc', got {d['topk_method']!r}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json hidden_act must be 'silu', got {d['hidden_act']!r}")
        if d.get("attention_bias", False):
            raise ValueError("config.json attention_bias=true is not supported (K2/DeepSeek-V3 have none)")
        heads, kv_heads = d["num_attention_heads"], d.get("num_key_value_heads", d["num_attention_heads"])
        if kv_heads != heads:
            raise ValueError(f"config.json num_key_value_heads ({kv_heads}) must equal num_attention_heads "
                             f"({heads}) for MLA")
        if d.get("moe_layer_freq", 1) != 1:
            raise ValueError(f"config.json moe_layer_freq must be 1, got {d['moe_layer_freq']}")
        if d.get("n_routed_experts") is None:
            raise ValueError("config.json n_routed_experts is missing")
        rope_scaling = d.get("rope_scaling") or None
        names = {f.name for f in dataclasses.fields(cls)} - {"rope_scaling"}
        kwargs = {k: d[k] for k in names if k in d and k in _HF_KEYS}
        kwargs["rope_scaling"] = RopeScaling.from_hf(rope_scaling) if rope_scaling else None
        if "rope_theta" not in d and isinstance(d.get("rope_parameters"), dict):
            kwargs["rope_theta"] = d["rope_parameters"].get("rope_theta", 10000.0)
        kwargs.update(runtime)
        return cls(**kwargs)

    def to_hf(self) -> dict:
        """The HF `config.json` dict (DeepseekV3ForCausalLM; model_type as configured)."""
        d = {k: getattr(self, k) for k in _HF_KEYS if k != "model_type"}
        d.update(architectures=["DeepseekV3ForCausalLM"], model_type=self.model_type,
                 num_key_value_heads=self.num_attention_heads, hidden_act="silu", scoring_func="sigmoid",
                 topk_method="noaux_tc", moe_layer_freq=1, attention_bias=False, attention_dropout=0.0,
                 num_nextn_predict_layers=0, torch_dtype=self.param_dtype,
                 rope_scaling=self.rope_scaling.to_hf() if self.rope_scaling else None)
        return d


_HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "first_k_dense_replace", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
            "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
            "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor", "rms_norm_eps", "rope_theta",
            "max_position_embeddings", "tie_word_embeddings", "initializer_range", "model_type")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN magnitude scale 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def tiny(**runtime) -> ModelConfig:
    """A K2-shaped model small enough to train on a laptop CPU in minutes (vocab 272: the byte tokenizer's 256 byte ids
    and its chat special tokens)."""
    return ModelConfig(vocab_size=272, hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
                       num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=64,
                       kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                       n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, routed_scaling_factor=2.827,
                       max_position_embeddings=4096, rope_theta=50000.0, **runtime)


def moonlight_16b_a3b(**runtime) -> ModelConfig:
    """Moonlight-16B-A3B (moonshotai/Moonlight-16B-A3B config.json)."""
    return ModelConfig(vocab_size=163840, hidden_size=2048, intermediate_size=11264, moe_intermediate_size=1408,
                       num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16, q_lora_rank=None,
                       kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                       n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, n_group=1, topk_group=1,
                       norm_topk_prob=True, routed_scaling_factor=2.446, rms_norm_eps=1e-5, rope_theta=50000.0,
                       max_position_embeddings=8192, rope_scaling=None, model_type="deepseek_v3", **runtime)


def kimi_k2_1t(**runtime) -> ModelConfig:
    """Kimi K2 (moonshotai/Kimi-K2-Base config.json): 1.04T total, ~32B activated parameters.

    ModelConfig's defaults are K2's published values; only the YaRN rope scaling is added here.
    """
    return ModelConfig(rope_scaling=RopeScaling(factor=32.0, original_max_position_embeddings=4096, beta_fast=1.0,
                                                beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0), **runtime)


PRESETS = {"tiny": tiny, "moonlight_16b_a3b": moonlight_16b_a3b, "kimi_k2_1t": kimi_k2_1t}


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Total and activated parameter counts, computed from the config alone.

    Counted: every weight of the model as stored (embed_tokens, all layers' attention/norm/MLP/router weights,
    the router's e_score_correction_bias, final norm, lm_head; lm_head is not counted again when tied).
    "activated" is what one token touches: everything except the routed experts, of which only
    num_experts_per_tok per MoE layer count. Embeddings and lm_head are included in both numbers.
    """
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    if cfg.q_lora_rank is None:
        q = h * heads * cfg.qk_head_dim
    else:
        q = h * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * heads * cfg.qk_head_dim
    kv = (h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
          + cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim))
    attention = q + kv + heads * cfg.v_head_dim * h + 2 * h
    dense_mlp = 3 * h * cfg.intermediate_size
    expert = 3 * h * cfg.moe_intermediate_size
    moe_fixed = h * cfg.n_routed_experts + cfg.n_routed_experts + 3 * h * cfg.shared_intermediate_size
    outer = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2) + h
    common = outer + cfg.num_hidden_layers * attention + cfg.num_dense_layers * dense_mlp
    common += cfg.num_moe_layers * moe_fixed
    return {"total": common + cfg.num_moe_layers * cfg.n_routed_experts * expert,
            "activated": common + cfg.num_moe_layers * cfg.num_experts_per_tok * expert}


MESH_AXES = ("data", "fsdp", "expert", "tensor")   # the order of kimi_jax.sharding.MESH_AXES


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """config.mesh of a training config: the size of each mesh axis over all devices (one may be -1: whatever
    the devices leave) and, on TPU multi-slice, how many slices each axis spans (dcn_*: its split over the
    data-center network; the rest of the axis stays on ICI inside each slice). By default the slices are pure
    data parallelism: dcn_data = -1 takes every slice the other dcn_* fields leave.

    E.g. 2 x v5p-256 (2 slices of 128 chips), data=2, fsdp=-1, expert=16: data is split across the slices,
    fsdp (8) and expert (16) inside each. With dcn_data=1, dcn_fsdp=2 the slices split fsdp instead.
    """

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    dcn_data: int = -1
    dcn_fsdp: int = 1
    dcn_expert: int = 1
    dcn_tensor: int = 1

    def __post_init__(self):
        for name in MESH_AXES + tuple("dcn_" + a for a in MESH_AXES):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or (value < 1 and value != -1):
                raise ValueError(f"config.mesh.{name} must be an integer >= 1 or -1, got {value!r}")
        for prefix in ("", "dcn_"):
            free = [prefix + a for a in MESH_AXES if getattr(self, prefix + a) == -1]
            if len(free) > 1:
                raise ValueError(f"config.mesh: at most one of {[prefix + a for a in MESH_AXES]} may be -1, "
                                 f"got {free}")

    @classmethod
    def from_config(cls, mesh_cfg) -> MeshConfig:
        """From a config.mesh section (ConfigDict or dict); fields it leaves out take their defaults."""
        fields = dict(mesh_cfg)
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"config.mesh has unknown fields {unknown}; known: "
                             f"{[f.name for f in dataclasses.fields(cls)]}")
        return cls(**{k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in fields.items()})

    def resolve(self, num_devices: int, num_slices: int = 1) -> tuple[dict[str, int], dict[str, int]]:
        """(sizes, dcn): every axis's total size and its number of slices, -1s resolved, checked against
        num_devices devices in num_slices equal slices. Raises ValueError naming the config.mesh field."""
        sizes = _fill("", {a: getattr(self, a) for a in MESH_AXES}, num_devices, "devices")
        if num_devices % num_slices:
            raise ValueError(f"{num_devices} devices do not split into {num_slices} equal slices")
        dcn = _fill("dcn_", {a: getattr(self, "dcn_" + a) for a in MESH_AXES}, num_slices, "slices")
        for a in MESH_AXES:
            if sizes[a] % dcn[a]:
                raise ValueError(
                    f"config.mesh.{a}={sizes[a]} cannot be split across config.mesh.dcn_{a}={dcn[a]} slices "
                    f"(dcn {dcn}): make config.mesh.{a} a multiple of {dcn[a]}, or put the slices on another "
                    f"axis (e.g. config.mesh.dcn_{a}=1 config.mesh.dcn_fsdp={dcn[a]})")
        return sizes, dcn


def _fill(prefix: str, sizes: dict[str, int], total: int, what: str) -> dict[str, int]:
    """Resolves the (at most one) -1 in sizes so that their product is total."""
    fixed = math.prod(v for v in sizes.values() if v != -1)
    free = [a for a, v in sizes.items() if v == -1]
    if free:
        if total % fixed:
            raise ValueError(f"config.mesh: {total} {what} are not divisible by "
                             f"{' x '.join(f'{prefix}{a}={v}' for a, v in sizes.items() if v != -1)} = {fixed}")
        sizes = {**sizes, free[0]: total // fixed}
    elif fixed != total:
        raise ValueError(f"config.mesh: {' x '.join(f'{prefix}{a}={v}' for a, v in sizes.items())} = {fixed} "
                         f"does not equal the {total} {what}")
    return sizes
