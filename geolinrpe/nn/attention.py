r"""``RPEAttention``: multi-head O(n) attention with a relative positional encoding.

Axes: b batch, n tokens, c channels, h heads, d head dim, p position dim.

FourierLearner-Transformer attention (Choromanski et al., AISTATS 2024,
https://arxiv.org/abs/2302.01925) and the Performer (https://arxiv.org/abs/2009.14794).
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from ..features import FeatureMap, PositiveRandomFeatures, build_feature_map
from ..ops.checks import (
    check_batch,
    check_floating,
    check_key_padding_mask,
    check_same_device_dtype,
    eager_checks,
)
from ..ops.exact import feature_attention, kernel_matrix, masked_kernel_attention
from ..ops.linear import ENGINES, NORMALIZATIONS, linear_attention
from ..ops.modes import Featurizer, MaskMode, calibrate_featurizer
from ..ops.packing import to_packed, to_padded
from ..rpe import REGISTRY, RPE, build

MODES = ("logit", "mask", "product")
OUTPUT_NORMS = (None, "layernorm")


class RPEAttention(nn.Module):
    r"""Multi-head linear attention with a relative positional encoding ``f(r_i - r_j)``.

    Three ways to combine the RPE with the attention kernel (``docs/math.md``):

    * ``mode="mask"`` (the default for the Fourier RPEs): ``out_i = sum_j K(q_i, k_j)
      f(r_i - r_j) v_j / Z_i`` with any kernel feature map, estimated with the row-wise
      Kronecker product of kernel and RPE features (never materialised). ``Z_i`` follows
      ``normalize`` (default ``"kernel"``: ``Z_i = sum_j K(q_i, k_j)``, positive for positive
      feature maps, so ``|out_i| <= max |f_hat| max |v|`` for every input). With
      ``frequencies="quadrature"`` the positional part ``f_hat`` is deterministic: only the
      kernel features are random.
    * ``mode="logit"``: ``out_i = sum_j exp(q_i.k_j/sqrt(d) + f(r_i - r_j)) v_j / Z_i``,
      the biased softmax of Graphormer-style models, estimated by positive random features
      of ``[q/d^1/4, psi_q(r)]`` and ``[k/d^1/4, psi_k(r)]``. Needs ``kernel="favor+"`` or
      ``"favor++"``. All weights are positive, and it is the cheapest (a Performer with
      ``d + 2m`` inputs), but the random projection mixes ``psi`` into its noise, which
      grows with ``f(0)``. Initialise the RPE amplitude at 0 for a neutral (f = 0) start.
    * ``mode="product"``: the logit-mode target factorised,
      ``exp(q.k/sqrt(d)) exp(f)``: kernel features times a deterministic estimate of the
      mask ``exp(f)`` (``flt-kernel``/``flt-radial`` with ``frequencies="quadrature"``;
      :class:`~geolinrpe.ops.modes.ProductMode`). Accurate while the rule resolves
      ``exp(f)``: relative error 2e-3 at ``f(0) = 0.5``, 5e-2 at 2, 0.23 at 4 (3D, 64
      frequencies); a sharply peaked ``exp(f)`` makes the estimate, and the softmax
      denominator, go negative.

    ``mode=None`` (default) takes the RPE's first mode (``mask`` for the Fourier families,
    chosen by the measurements in ``benchmarks/RESULTS.md``), ``logit`` without an RPE.
    Every mode costs O(n) time and memory (:func:`geolinrpe.ops.linear_attention`); mask
    and product modes hold an ``r x 2m`` state per value channel, ``2m / (1 + 2m / r)``
    times logit mode's.

    Args:
        embed_dim: channels ``c`` of ``x``.
        num_heads: heads ``h``; ``embed_dim`` must be divisible by it.
        rpe: ``None`` (plain linear attention), a registry name of :mod:`geolinrpe.rpe`, or
            an :class:`~geolinrpe.rpe.RPE` instance.
        pos_dim: position dimension ``p`` (needed with an RPE name; 1 sequences, 2 image
            grids, 3 atoms and points).
        mode: ``"mask"``, ``"logit"``, ``"product"`` or ``None`` (the RPE's first mode).
        kernel: ``None`` (default: ``"elu"`` in mask mode, where it makes the layer
            deterministic with a quadrature RPE, ``"favor+"`` in logit and product modes),
            ``"favor+"`` (softmax kernel), ``"favor++"`` (softmax kernel, positive
            features with a variance-optimal parameter ``A``:
            :class:`~geolinrpe.features.GERFFeatures`), ``"relu"``, ``"elu"``,
            ``"identity"``, or a :class:`~geolinrpe.features.FeatureMap` on ``d`` inputs
            (``d + 2m`` in logit mode). An adaptive ``"favor++"`` map is calibrated on the
            feature-map inputs of the valid tokens in every training-mode forward (before
            the engine runs; after it when ``causal``, so that no token's output depends on
            later tokens); eval mode never changes it.
        num_features: random features for ``"favor+"`` and ``"favor++"`` (default 64).
        causal: token i attends to ``j <= i`` (sequence order within each graph).
        normalize: ``"masked"``, ``"kernel"`` or ``"none"``; default ``"masked"`` in logit
            mode (the softmax) and ``"kernel"`` in mask mode (safe with signed RPE estimates;
            see :mod:`geolinrpe.ops.linear`).
        center_positions: subtract each sequence's (graph's) mean position before the RPE.
            ``f`` depends on differences only, so nothing changes in exact arithmetic; it
            keeps phases small for large coordinates and makes logit mode exactly
            translation invariant. Default: ``True`` unless ``causal`` (a causal layer must
            not see future positions) or the RPE is periodic (moving an atom by a lattice
            vector moves the centroid by a non-lattice vector, which logit mode would see).
        chunk_size: tokens per chunk in the engine (default: automatic).
        quadratic_below: graphs (packed) or sequences (dense) of at most this many tokens
            are computed in the explicit O(n^2) form of the same features
            (:func:`~geolinrpe.ops.feature_attention`: the same numbers to rounding, cheaper
            for small n because it never forms the ``r x m x e`` state). ``None``
            (default): automatic, ``n <= r m' (e + 1) / (r + m')`` with ``m' = max(m, 1)``
            RPE features, and only while ``b h n^2 <= 2^22`` (eager mode, no autocast, not
            half precision); ``0``: never.
        bias: bias in the q/k/v and output projections.
        output_norm: ``None`` (default) or ``"layernorm"``: an affine ``nn.LayerNorm(embed_dim)``
            on the concatenated head outputs before the output projection, as the
            unnormalised linear attention of LRPE/TransNormer (Qin et al.) does; use it with
            ``normalize="none"``. Padded rows stay 0 (the norm is applied, then they are
            zeroed again).
        engine: ``"auto"`` (default), ``"torch"`` or ``"triton"``: the O(n) engine
            (:func:`~geolinrpe.ops.linear_attention`; ``"auto"`` takes the fused Triton
            kernels of :mod:`geolinrpe.ops.fused` for CUDA tensors without gradients when
            they support the configuration, the chunked torch engine otherwise).
            ``"triton"`` also turns the ``quadratic_below`` path off. RPEs with an algorithm
            of their own (FFT Toeplitz) ignore it.
        recompute: the torch engine keeps only each chunk's inputs for the backward pass and
            rebuilds the rest there (:func:`~geolinrpe.ops.linear_attention`): much less
            training memory at large n, about 1.9x the time. Default ``False``.
        rpe_options: keyword options for :func:`geolinrpe.rpe.build` when ``rpe`` is a name.

    Shapes:
        dense: ``x [b, n, c]``, ``pos [b, n, p]``, ``key_padding_mask [b, n]`` (True = padding)
        -> ``[b, n, c]`` (padded rows are 0 before the output projection);
        packed: ``x [n, c]``, ``pos [n, p]``, ``batch [n]`` (sorted graph ids; ``None`` = one
        graph) -> ``[n, c]``;
        periodic RPEs also take ``cell [g, p, p]`` (one lattice per graph or batch row, rows are
        lattice vectors).

    Invariances: permutation equivariant over the tokens of each graph (bidirectional);
    translation invariant in ``pos`` (exact in mask mode for every draw; exact in logit mode
    with ``center_positions``, otherwise in expectation over the random features).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        rpe: str | RPE | None = None,
        pos_dim: int | None = None,
        mode: str | None = None,
        kernel: str | FeatureMap | None = None,
        num_features: int = 64,
        causal: bool = False,
        normalize: str | None = None,
        center_positions: bool | None = None,
        chunk_size: int | None = None,
        bias: bool = True,
        rpe_options: dict | None = None,
        quadratic_below: int | None = None,
        output_norm: str | None = None,
        engine: str = "auto",
        recompute: bool = False,
    ) -> None:
        super().__init__()
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if not isinstance(recompute, bool):
            raise ValueError(f"recompute must be a bool, got {recompute!r}")
        self.engine = engine
        self.recompute = recompute
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if quadratic_below is not None and (
            not isinstance(quadratic_below, int) or quadratic_below < 0
        ):
            raise ValueError(
                f"quadratic_below must be a non-negative int or None, got {quadratic_below!r}"
            )
        self.quadratic_below = quadratic_below
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if kernel is None:  # mask mode: ELU (deterministic); a softmax otherwise: FAVOR+
            first = REGISTRY[rpe].modes[0] if isinstance(rpe, str) and rpe in REGISTRY else None
            first = getattr(rpe, "modes", ("logit",))[0] if first is None else first
            resolved = mode or (first if rpe is not None else "logit")
            kernel = "elu" if resolved == "mask" else "favor+"
        if isinstance(rpe, str):
            if pos_dim is None:
                raise ValueError(f"pos_dim is required to build rpe={rpe!r}")
            options = dict(rpe_options or {})
            if "dim" in inspect.signature(REGISTRY.get(rpe, RPE)).parameters:
                # families acting on vectors: the head dim (logit, or an RPE encoding the raw
                # q and k, e.g. SPE placement="before") or the kernel features (mask)
                elementwise = isinstance(kernel, str) and kernel not in ("favor+", "favor++")
                head_dim = embed_dim // num_heads
                first = REGISTRY[rpe].modes[0] if rpe in REGISTRY else "logit"
                features = head_dim if (mode or first) == "logit" or elementwise else num_features
                if not isinstance(kernel, str):
                    features = kernel.num_features
                on_head = getattr(REGISTRY.get(rpe), "dim_is_head_dim", lambda _: False)
                options.setdefault("dim", head_dim if on_head(options) else features)
            rpe = build(rpe, pos_dim=pos_dim, num_heads=num_heads, **options)
        elif rpe is not None and not isinstance(rpe, RPE):
            raise ValueError(f"rpe must be None, a name or an RPE, got {type(rpe).__name__}")
        if mode is None:  # the RPE's first mode (benchmarks/RESULTS.md); logit without RPE
            mode = "logit" if rpe is None else rpe.modes[0]
        if rpe is not None:
            if mode not in rpe.modes:
                raise ValueError(
                    f"rpe {type(rpe).__name__} supports modes {rpe.modes}, not {mode!r}"
                )
            if pos_dim is not None and pos_dim != rpe.pos_dim:
                raise ValueError(f"pos_dim={pos_dim} but the rpe has pos_dim={rpe.pos_dim}")
            if rpe.num_heads != num_heads:
                raise ValueError(f"rpe has {rpe.num_heads} heads but num_heads={num_heads}")
        if rpe is not None:
            allowed = rpe.normalizations(mode)
        else:
            allowed = ("masked",) if mode == "logit" else NORMALIZATIONS
        normalize = allowed[0] if normalize is None else normalize
        if normalize not in allowed:
            raise ValueError(
                f"normalize must be one of {allowed} in {mode} mode here, got {normalize!r}"
            )
        if getattr(rpe, "complete_diagonal", False) and (mode, normalize) != ("mask", "none"):
            raise ValueError(
                f"{type(rpe).__name__} with complete_diagonal=True needs mode='mask' and "
                f"normalize='none' (got mode={mode!r}, normalize={normalize!r}); or build the "
                "RPE with complete_diagonal=False"
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.mode = mode
        self.causal = causal
        self.normalize = normalize
        if center_positions is None:  # centring moves atoms off lattice sites: not for cells
            center_positions = not causal and not (rpe is not None and rpe.periodic)
        self.center_positions = center_positions
        if self.center_positions and causal:
            raise ValueError("center_positions with causal=True would let tokens see the future")
        if causal and rpe is not None and rpe.uses_whole_graph:
            raise ValueError(
                f"{type(rpe).__name__} encodes each token from its whole graph: not causal"
            )
        self.chunk_size = chunk_size
        self.rpe = rpe
        self.pos_dim = None if rpe is None else rpe.pos_dim
        logit = mode == "logit" and rpe is not None
        input_dim = self.head_dim if rpe is None else rpe.kernel_input_dim(self.head_dim, mode)
        if isinstance(kernel, str):
            kernel = build_feature_map(kernel, input_dim, num_features)
        if kernel.input_dim != input_dim:
            raise ValueError(f"kernel has input_dim={kernel.input_dim}, expected {input_dim}")
        if logit and not isinstance(kernel, PositiveRandomFeatures):
            raise ValueError(
                "mode='logit' needs kernel='favor+' or 'favor++' (it estimates a softmax)"
            )
        self.feature_map = kernel
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.out = nn.Linear(embed_dim, embed_dim, bias=bias)
        if output_norm not in OUTPUT_NORMS:
            raise ValueError(f"output_norm must be one of {OUTPUT_NORMS}, got {output_norm!r}")
        self.output_norm = nn.LayerNorm(embed_dim) if output_norm == "layernorm" else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reset the projections; an RPE keeps its parameters (``rpe.reset_parameters()``)."""
        self.qkv.reset_parameters()
        self.out.reset_parameters()
        if self.output_norm is not None:
            self.output_norm.reset_parameters()

    def redraw(self, generator: torch.Generator | None = None) -> None:
        """Draw new random kernel features and RPE frequencies."""
        self.feature_map.redraw(generator)
        if self.rpe is not None:
            self.rpe.redraw(generator)

    @property
    def featurizer(self) -> Featurizer:
        """The mode object the engine calls (see :mod:`geolinrpe.ops.modes`)."""
        softmax = isinstance(self.feature_map, PositiveRandomFeatures)
        scale = self.head_dim**-0.25 if softmax else 1.0
        if self.rpe is None:
            return MaskMode(self.feature_map, None, scale)
        return self.rpe.featurizer(self.feature_map, scale, self.mode)

    # ------------------------------------------------------------------ inputs
    def _prepare(self, x, pos, batch, key_padding_mask, cell):
        """Validate; return ``(q, k, v, pos)`` per head and the layout arguments, or ``None``
        when ``x`` has no tokens (the layer's output is then empty)."""
        check_floating("x", x)
        if x.dim() not in (2, 3):
            raise ValueError(f"x must be [b, n, c] (dense) or [n, c] (packed), got {list(x.shape)}")
        if x.shape[-1] != self.embed_dim:
            raise ValueError(f"x has {x.shape[-1]} channels, expected embed_dim={self.embed_dim}")
        empty = x.shape[:-1].numel() == 0  # no tokens: b = 0 or n = 0 (dense), n = 0 (packed)
        packed = x.dim() == 2
        if packed:
            if key_padding_mask is not None:
                raise ValueError("key_padding_mask is for dense x [b, n, c]; packed x uses batch")
            if batch is None:
                batch = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            check_batch(batch, x.shape[0], x.device, allow_empty=True)
        else:
            if batch is not None:
                raise ValueError("batch is for packed x [n, c]; dense x uses key_padding_mask")
            if key_padding_mask is not None:
                check_key_padding_mask(key_padding_mask, x.shape[0], x.shape[1], x.device)
        if self.rpe is None:
            pos = None
        else:
            if pos is None:
                raise ValueError("pos is required: this layer has an RPE")
            check_floating("pos", pos)
            want = list(x.shape[:-1]) + [self.pos_dim]
            if list(pos.shape) != want:
                raise ValueError(f"pos must have shape {want}, got {list(pos.shape)}")
            check_same_device_dtype({"x": x, "pos": pos})
            if empty:
                return None
            if self.center_positions:
                pos = _center(pos, batch, key_padding_mask, self.rpe.integer_positions)
            with torch.autocast(device_type=x.device.type, enabled=False):  # eigh, det, ...
                pos = self.rpe.encode_positions(
                    pos,
                    batch=batch,
                    key_padding_mask=key_padding_mask,
                    cell=self._check_cell(cell, x, batch),
                )
        if self.rpe is None and cell is not None:
            raise ValueError("cell is only used by periodic RPEs; this layer has rpe=None")
        if empty:
            return None
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(-3)
        return q, k, v, pos, batch

    def _check_cell(self, cell: Tensor | None, x: Tensor, batch: Tensor | None) -> Tensor | None:
        """``cell [g, 3, 3]`` (rows are lattice vectors), one per graph; periodic RPEs only."""
        if not self.rpe.periodic:
            if cell is not None:
                raise ValueError(
                    f"cell is only used by periodic RPEs, not {type(self.rpe).__name__}"
                )
            return None
        if cell is None:
            raise ValueError(f"{type(self.rpe).__name__} is periodic: pass cell [g, 3, 3]")
        check_floating("cell", cell)
        if batch is None:
            graphs = x.shape[0]
        else:  # the graph count is a value of batch: unknown while compiling
            graphs = int(batch[-1]) + 1 if eager_checks() else cell.shape[0]
        want = [graphs, self.pos_dim, self.pos_dim]
        if list(cell.shape) != want:
            raise ValueError(
                f"cell must have shape {want} (one cell per graph), got {list(cell.shape)}"
            )
        check_same_device_dtype({"x": x, "cell": cell})
        if eager_checks() and bool((torch.linalg.det(cell).abs() < 1e-12).any()):
            raise ValueError("cell contains a singular (zero-volume) lattice")
        return cell

    def forward(
        self,
        x: Tensor,
        pos: Tensor | None = None,
        batch: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        cell: Tensor | None = None,
    ) -> Tensor:
        """Attend; see the class docstring for shapes (``cell`` only for periodic RPEs)."""
        prepared = self._prepare(x, pos, batch, key_padding_mask, cell)
        if prepared is None:  # no tokens: an empty output of the right shape
            return self.out(x)
        q, k, v, pos, batch = prepared
        featurizer = self.featurizer
        featurizer.cache_spectrum = True  # built for this call: one RPE spectrum per forward
        calibrate = self.training and getattr(self.feature_map, "adaptive", False)
        if calibrate:  # FAVOR++: A stays fixed while the engine runs
            valid = None if key_padding_mask is None else ~key_padding_mask.unsqueeze(-1)
            if not self.causal:
                with torch.no_grad():
                    calibrate_featurizer(featurizer, q, k, pos, valid)
        layout = dict(key_padding_mask=key_padding_mask, batch=batch, causal=self.causal)
        if self._quadratic(q, v, featurizer, batch, key_padding_mask):
            out = self._explicit(q, k, v, pos, featurizer, **layout)
        else:
            attend = linear_attention if self.rpe is None else self.rpe.attend
            if self.rpe is None or self.rpe.uses_engine:
                layout.update(engine=self.engine, recompute=self.recompute)
            out = attend(
                q,
                k,
                v,
                pos,
                featurizer=featurizer,
                normalize=self.normalize,
                chunk_size=self.chunk_size,
                check_finite=False,
                **layout,
            )
        if calibrate and self.causal:  # later tokens must not change earlier outputs
            with torch.no_grad():
                calibrate_featurizer(featurizer, q, k, pos, valid)
        out = self._complete_diagonal(out, q, k, v, pos, key_padding_mask, exact_kernel=False)
        return self._project(out, key_padding_mask)

    def _project(self, out: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        """Heads ``[..., n, h, e]`` -> ``output_norm`` (padded rows zeroed again) -> ``out``."""
        out = out.flatten(-2)
        if self.output_norm is not None:
            out = self.output_norm(out)
            if key_padding_mask is not None:
                out = out.masked_fill(key_padding_mask[..., None], 0.0)
        return self.out(out)

    def _complete_diagonal(self, out, q, k, v, pos, key_padding_mask, exact_kernel: bool):
        """``out_i + K(q_i, k_i) (f(0) - f_hat(0)) v_i`` for RPEs with ``complete_diagonal``
        (mask mode, ``normalize="none"``); ``out`` unchanged otherwise. O(n)."""
        if not getattr(self.rpe, "complete_diagonal", False):
            return out
        fm, scale = self.featurizer.feature_map, self.featurizer.input_scale
        if exact_kernel:  # each token as its own length-1 sequence: K(q_i, k_i)
            single = [(t * scale).reshape(-1, 1, *t.shape[-2:]).transpose(1, 2) for t in (q, k)]
            kii = fm.kernel(*single).reshape(q.shape[:-1])
        else:
            (phi_q, scale_q), (phi_k, scale_k) = fm(q * scale), fm(k * scale)
            kii = (phi_q * phi_k).sum(-1)
            if scale_q is not None:
                kii = kii * torch.exp(scale_q + scale_k)
        weight = kii * self.rpe.diagonal_correction(pos).to(kii.dtype)  # [..., n, h]
        if key_padding_mask is not None:
            weight = weight.masked_fill(key_padding_mask[..., None], 0.0)
        return out + weight[..., None].to(out.dtype) * v

    def _quadratic(self, q, v, featurizer, batch, key_padding_mask) -> bool:
        """Whether ``quadratic_below`` sends this input to the explicit O(n^2) form."""
        if self.engine == "triton" or (self.rpe is not None and not self.rpe.uses_engine):
            return False
        if torch.compiler.is_compiling() or not eager_checks():
            return False
        low = q.dtype in (torch.float16, torch.bfloat16)
        if low or torch.is_autocast_enabled(q.device.type):  # the engine accumulates in fp32
            return False
        if batch is not None:  # the largest graph
            counts = torch.bincount(batch)
            n, rows = int(counts.max()), counts.numel()
        else:
            n, rows = q.shape[1], q.shape[0]
        limit = self.quadratic_below
        if limit is None:
            r, m, e = featurizer.num_features, max(featurizer.num_rpe_features, 1), v.shape[-1]
            limit = r * m * (e + 1) // (r + m)
            if rows * self.num_heads * n * n > 2**22:
                return False
        return n <= limit

    def _explicit(self, q, k, v, pos, featurizer, key_padding_mask, batch, causal) -> Tensor:
        """:func:`~geolinrpe.ops.feature_attention` per graph (packed input is padded to its
        largest graph, so no graph sees another and the cost is ``g n_max^2``)."""
        explicit = dict(featurizer=featurizer, normalize=self.normalize, causal=causal)
        if batch is None:
            return feature_attention(q, k, v, pos, key_padding_mask=key_padding_mask, **explicit)
        mask = to_padded(q[:, 0, :1], batch)[1]
        q_d, k_d, v_d = (
            to_padded(t.flatten(1), batch)[0].unflatten(-1, t.shape[1:]) for t in (q, k, v)
        )
        pos_d = None if pos is None else to_padded(pos, batch)[0]
        out = feature_attention(q_d, k_d, v_d, pos_d, key_padding_mask=mask, **explicit)
        return to_packed(out.flatten(2), mask)[0].unflatten(-1, v.shape[1:])

    def reference(
        self,
        x: Tensor,
        pos: Tensor | None = None,
        batch: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        kernel: str = "features",
        rpe: str = "features",
        cell: Tensor | None = None,
    ) -> Tensor:
        """O(n^2) counterpart of :meth:`forward` with the same parameters (for tests and baselines).

        Args:
            kernel: ``"features"`` (the current random features, as the engine uses them)
                or ``"exact"`` (the kernel they estimate; in logit mode, the exact softmax).
            rpe: ``"features"`` (the current frequency draw's estimate ``f_hat``) or
                ``"exact"`` (the closed form ``f``).

        ``kernel="features", rpe="features"`` is the explicit-feature quadratic form and
        equals :meth:`forward` to rounding error; ``kernel="exact", rpe="exact"`` is the
        exact target (biased softmax in logit mode, masked kernel attention in mask mode).
        """
        for name, value in (("kernel", kernel), ("rpe", rpe)):
            if value not in ("features", "exact"):
                raise ValueError(f"{name} must be 'features' or 'exact', got {value!r}")
        prepared = self._prepare(x, pos, batch, key_padding_mask, cell)
        if prepared is None:
            return self.out(x)
        q, k, v, pos, batch = prepared
        layout = dict(key_padding_mask=key_padding_mask, batch=batch, causal=self.causal)
        featurizer, normalize = self.featurizer, self.normalize
        engine = self.rpe is None or (rpe == "features" and self.rpe.uses_engine)
        if kernel == "features" and engine:
            out = feature_attention(
                q, k, v, pos, featurizer=featurizer, normalize=normalize, **layout
            )
            out = self._complete_diagonal(out, q, k, v, pos, key_padding_mask, False)
        elif self.rpe is None:
            dense = (lambda t: t[None]) if batch is not None else (lambda t: t)  # noqa: E731
            kmat = kernel_matrix(featurizer, dense(q), dense(k), exact=True)
            kmat = kmat[0] if batch is not None else kmat
            out = masked_kernel_attention(kmat, v, None, normalize="masked", **layout)
        else:
            out = self.rpe.reference_attention(
                q,
                k,
                v,
                pos,
                featurizer=featurizer,
                mode=self.mode,
                normalize=normalize,
                kernel=kernel,
                rpe=rpe,
                **layout,
            )
            if rpe == "features":  # the exact f's diagonal is completed in pairwise
                exact_kernel = kernel == "exact"
                out = self._complete_diagonal(out, q, k, v, pos, key_padding_mask, exact_kernel)
        return self._project(out, key_padding_mask)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, mode={self.mode!r}, "
            f"normalize={self.normalize!r}, causal={self.causal}"
        )


def _center(
    pos: Tensor, batch: Tensor | None, key_padding_mask: Tensor | None, integer: bool
) -> Tensor:
    """``pos`` minus each graph's (packed ``[n, p]`` with ``batch [n]``) or each row's (dense
    ``[b, n, p]``, over the tokens that ``key_padding_mask [b, n]`` leaves valid) mean position.

    Packed graphs use segment sums (``index_add`` over ``batch``): O(n) memory and time, never
    a ``[g, n_max]`` padded copy. With ``integer`` the centre is ``floor(mean + 1/2)``,
    computed exactly as ``floor((2 S + m) / (2 m))`` from the sum ``S`` of the graph's ``m``
    positions in float64 (exact for integer positions with ``|S| < 2**52``): integer
    positions stay integers, and shifting a graph by an integer ``s`` shifts its centre by
    exactly ``s``, so the centred positions (and the layer's output) do not change.
    ``round(mean)`` (half to even) does not commute with shifts: ``0.5 -> 0`` but
    ``1.5 -> 2``.
    """
    work = torch.float64 if integer and pos.device.type != "mps" else pos.dtype
    values = pos.to(work)
    if batch is not None:
        num_graphs = int(batch[-1]) + 1 if batch.numel() else 0
        sums = values.new_zeros(num_graphs, pos.shape[-1]).index_add_(0, batch, values)
        counts = torch.bincount(batch, minlength=num_graphs).to(work).unsqueeze(-1)
    elif key_padding_mask is None:
        sums = values.sum(1, keepdim=True)
        counts = torch.full_like(sums[..., :1], pos.shape[1])
    else:
        valid = (~key_padding_mask).unsqueeze(-1).to(work)
        sums = (values * valid).sum(1, keepdim=True)
        counts = valid.sum(1, keepdim=True)
    counts = counts.clamp_min(1)
    if integer:
        centre = torch.div(2 * sums + counts, 2 * counts, rounding_mode="floor")
    else:
        centre = sums / counts
    if batch is not None:
        centre = centre[batch]
    return pos - centre.to(pos.dtype)
