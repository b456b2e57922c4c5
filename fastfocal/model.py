"""FocalCodec modules with the official state-dict names.

Layout is (batch, time, channels) between modules; convolutions transpose locally.
Causal modules take an optional streaming state and a slot-index tensor `idx`: they gather
their cache rows, run on [cache ‖ new frames], and write the rows back. `idx=None` means every
slot in order (offline runs, a one-stream session): the rows are used in place, no gathers. Offline causal
inference is the same computation run on long segments with a fresh state, so there is one
code path for offline, single-stream and many-stream use.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .config import CodecConfig, FocalDecoderConfig, FocalEncoderConfig, VocosConfig, WavLMConfig, WaveNeXtConfig
from .kernels.focal_context import ring_len
from .state import DecoderState, EncoderState, FocalState


def focal_kernels(focal_window: int, focal_level: int, focal_factor: int) -> list[int]:
    """Kernel sizes of the focal levels (the window level comes on top, causal only)."""
    return [focal_factor * l + focal_window for l in range(focal_level)]


def _container(**mods) -> nn.Module:
    m = nn.Module()
    for k, v in mods.items():
        setattr(m, k, v)
    return m


# =========================================================================== encoder (WavLM)
class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.gru_rel_pos_linear = nn.Linear(dim // heads, 8)
        self.gru_rel_pos_const = nn.Parameter(torch.ones(1, heads, 1, 1))


class _EncoderLayer(nn.Module):
    def __init__(self, c: WavLMConfig):
        super().__init__()
        self.attention = _Attention(c.dim, c.num_heads)
        self.attention_norm = nn.LayerNorm(c.dim)
        self.feed_forward = _container(in_proj=nn.Linear(c.dim, c.ffn_dim), out_proj=nn.Linear(c.ffn_dim, c.dim))
        self.feed_forward_norm = nn.LayerNorm(c.dim)


class WavLM(nn.Module):
    def __init__(self, c: WavLMConfig, chunk: int):
        super().__init__()
        self.cfg = c
        self.chunk = chunk
        ins = (1,) + tuple(c.hidden_dims[:-1])
        self.feature_extractor = _container(
            layers=nn.ModuleList(
                _container(conv=nn.Conv1d(i, o, k, s, bias=False), norm=nn.LayerNorm(o))
                for i, o, k, s in zip(ins, c.hidden_dims, c.kernel_sizes, c.strides)
            )
        )
        self.norm = nn.LayerNorm(c.hidden_dims[-1])
        self.feature_proj = nn.Linear(c.hidden_dims[-1], c.dim)
        self.encoder = _container(
            positional_embedding=_container(conv=nn.Conv1d(c.dim, c.dim, c.conv_pos, groups=c.conv_pos_groups)),
            layers=nn.ModuleList(_EncoderLayer(c) for _ in range(c.num_layers)),
            relative_embedding=nn.Embedding(c.num_buckets, c.num_heads),
        )

    def init_state(self, slots: int, device, dtype) -> EncoderState:
        """Streaming state: feature-extractor conv inputs, positional-conv input, K/V rings."""
        c = self.cfg
        ins = (1,) + tuple(c.hidden_dims[:-1])
        R, d = c.window_size - self.chunk, c.dim // c.num_heads
        return EncoderState.zeros(
            slots, device, dtype,
            fe_caches=[(k - 1, i) for i, k in zip(ins, c.kernel_sizes)],
            pos_conv_cache=(ops.ring_len_time_major(c.conv_pos - 1, self.chunk), c.dim),
            k_ring=[(c.num_heads, R, d)] * c.num_layers,
            v_ring=[(c.num_heads, R, d)] * c.num_layers,
        )

    def min_samples(self) -> int:
        """Non-causal: shortest input giving one frame (receptive field, 400)."""
        rf = 1
        for k, s in reversed(list(zip(self.cfg.kernel_sizes, self.cfg.strides))):
            rf = (rf - 1) * s + k
        return rf

    def forward(self, sig: Tensor, st: EncoderState | None = None, idx: Tensor | None = None) -> Tensor:
        """sig (B, N) -> feats (B, T, dim). Causal with a state: one streaming step."""
        c = self.cfg
        B = sig.shape[0]
        start = ops.rows(st.pos, idx) if st is not None else torch.zeros(B, dtype=torch.long, device=sig.device)
        # time-major (B, T, C) throughout: each conv is an unfold + GEMM, LayerNorm needs no transpose
        x = sig.unsqueeze(-1)
        if not c.causal and x.shape[1] < self.min_samples():
            x = F.pad(x, (0, 0, 0, self.min_samples() - x.shape[1]))
        for i, layer in enumerate(self.feature_extractor.layers):
            if c.causal:
                x = ops.causal_conv_ln_gelu(x, layer.conv.weight, c.strides[i], st.fe_caches[i] if st is not None else None,
                                            idx, start if st is not None else None, layer.norm.weight, layer.norm.bias, 1e-5)
            else:
                x = ops.layer_norm_gelu(ops.conv_time_major(x, layer.conv.weight, c.strides[i]),
                                        layer.norm.weight, layer.norm.bias, 1e-5)
        x = ops.linear(ops.pre_norm(x, self.norm.weight, self.norm.bias, 1e-5), self.feature_proj.weight, self.feature_proj.bias)

        pconv = self.encoder.positional_embedding.conv
        if c.causal and st is not None:  # time-major, its cache a ring (S, R, dim)
            x = ops.pos_conv_ring(x, pconv.weight, pconv.bias, c.conv_pos_groups, st.pos_conv_cache, idx, start)
        elif c.causal:
            xp = ops.causal_pad(x, c.conv_pos - 1, None, None, True, dim=1)
            x = x + ops.grouped_conv_gelu_time_major(xp, pconv.weight, pconv.bias, c.conv_pos_groups)
        else:
            pad = c.conv_pos // 2
            p = ops.grouped_conv1d(F.pad(x.transpose(1, 2), (pad, pad)), pconv.weight, pconv.bias, c.conv_pos_groups)
            if c.conv_pos % 2 == 0:
                p = p[:, :, :-1]
            x = x + ops.gelu(p).transpose(1, 2)

        T = x.shape[1]
        layers = self.encoder.layers
        memo: dict = {}  # what the layers of this step share (the CPU attention's position bias)
        # each residual add is fused with the norm that follows it (the next layer's LN_a)
        y = ops.pre_norm(x, layers[0].attention_norm.weight, layers[0].attention_norm.bias, 1e-5)
        for li, layer in enumerate(layers):
            o = self._attention(layer.attention, y, start, st, idx, li, memo)
            op, fn = layer.attention.out_proj, layer.feed_forward_norm
            x, y = ops.linear_residual_layer_norm(o, op.weight, op.bias, x, fn.weight, fn.bias, 1e-5)
            ff = layer.feed_forward
            h = ops.linear_gelu(y, ff.in_proj.weight, ff.in_proj.bias)
            if li + 1 < len(layers):
                an = layers[li + 1].attention_norm
                x, y = ops.linear_residual_layer_norm(h, ff.out_proj.weight, ff.out_proj.bias, x, an.weight, an.bias, 1e-5)
            else:
                x = ops.linear_residual(h, ff.out_proj.weight, ff.out_proj.bias, x)
        if st is not None:
            ops.advance(st.pos, idx, start, T)
        return x

    def _attention(self, att: _Attention, y: Tensor, start: Tensor, st, idx, li: int, memo: dict) -> Tensor:
        """Heads' output (B, T, C) before out_proj; streaming reads and updates layer li's K/V ring."""
        c = self.cfg
        qkv = ops.linear(y, att.qkv_proj.weight, att.qkv_proj.bias)
        return ops.rel_attention(
            qkv, y, att.gru_rel_pos_linear.weight, att.gru_rel_pos_linear.bias, att.gru_rel_pos_const,
            self.encoder.relative_embedding.weight, c.num_heads, start, self.chunk,
            c.window_size if c.causal else None, c.num_buckets, c.max_distance,
            st.k_ring[li] if st is not None else None, st.v_ring[li] if st is not None else None, idx, memo,
        )


# =========================================================================== focal blocks
class _DynamicTanh(nn.Module):
    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1))


class FocalModulation(nn.Module):
    def __init__(self, dim: int, kernels: list[int], causal: bool):
        super().__init__()
        self.causal = causal
        n_gates = len(kernels) + (0 if causal else 1)  # causal: kernels include the window level
        self.in_proj = nn.Linear(dim, 2 * dim + n_gates)
        self.layers = nn.ModuleList(nn.ModuleList([nn.Conv1d(dim, dim, k, groups=dim)]) for k in kernels)
        self.context_proj = nn.Conv1d(dim, dim, 1)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, caches: list[Tensor] | None, idx: Tensor | None, start: Tensor | None) -> Tensor:
        """q * context_proj(acc), before out_proj (the caller fuses out_proj with its residual).
        caches: this layer's full ring tensors, rows idx updated in place; start: their frame counts."""
        C = x.shape[-1]
        h = ops.linear(x, self.in_proj.weight, self.in_proj.bias)
        q, ctx, gates = h[..., :C], h[..., C:2 * C], h[..., 2 * C:]
        acc = ops.focal_context(
            ctx, gates, [l[0].weight for l in self.layers], [l[0].bias for l in self.layers],
            self.causal, caches, idx, start,
        )
        return ops.modulate(q, acc, self.context_proj.weight[:, :, 0], self.context_proj.bias)


class FocalBlock(nn.Module):
    def __init__(self, dim: int, kernels: list[int], causal: bool):
        super().__init__()
        self.causal = causal
        norm = _DynamicTanh if causal else (lambda: nn.LayerNorm(dim))
        self.modulation_norm = norm()
        self.modulation = FocalModulation(dim, kernels, causal)
        self.feed_forward_norm = norm()
        self.feed_forward = _container(in_proj=nn.Linear(dim, 4 * dim), out_proj=nn.Linear(4 * dim, dim))

    def _norm(self, n, x):
        return ops.pre_norm(x, alpha=n.alpha) if self.causal else ops.pre_norm(x, n.weight, n.bias, 1e-5)

    def forward(self, x, caches=None, idx=None, start=None):
        u = self.modulation(self._norm(self.modulation_norm, x), caches, idx, start)
        op, n = self.modulation.out_proj, self.feed_forward_norm
        if self.causal:
            x, y = ops.linear_residual_dyt(u, op.weight, op.bias, x, n.alpha)
        else:
            x, y = ops.linear_residual_layer_norm(u, op.weight, op.bias, x, n.weight, n.bias, 1e-5)
        ff = self.feed_forward
        return ops.linear_residual(ops.linear_gelu(y, ff.in_proj.weight, ff.in_proj.bias), ff.out_proj.weight, ff.out_proj.bias, x)


def _block_kernels(part, window: int) -> list[int]:
    ks = focal_kernels(part.focal_window, part.focal_level, part.focal_factor)
    return ks + [window] if part.causal else ks


def _focal_state(part, slots: int, device, dtype, windows: list[int]) -> FocalState:
    """Per layer, per focal level (window level last): a ring of the level's input frames
    (frame f in slot f mod ring_len(k), at least the last k-1)."""
    return FocalState.zeros(slots, device, dtype, caches=[
        [(c, ring_len(k)) for k in _block_kernels(part, w)] for c, w in zip(part.hidden_dims, windows)])


class FocalEncoder(nn.Module):
    def __init__(self, c: FocalEncoderConfig):
        super().__init__()
        self.cfg = c
        ins = (c.input_dim,) + tuple(c.hidden_dims[:-1])
        self.layers = nn.ModuleList(
            _container(
                downscale=_container(
                    downscale=nn.Conv1d(i, o, f, f),
                    activation=_container(alpha=nn.Parameter(torch.ones(o, 1))),
                ),
                focal_block=FocalBlock(o, _block_kernels(c, c.window_size), c.causal),
            )
            for i, o, f in zip(ins, c.hidden_dims, c.downscale_factors)
        )
        self.out_proj = nn.Linear(c.hidden_dims[-1], c.output_dim)

    def init_state(self, slots: int, device, dtype) -> FocalState:
        c = self.cfg
        return _focal_state(c, slots, device, dtype, [c.window_size] * len(c.hidden_dims))

    def forward(self, x: Tensor, st: FocalState | None = None, idx: Tensor | None = None, quantize: bool = False):
        """feats (B, T, C) -> normalised latents (B, T', D); with quantize, (lats, toks, codes)
        from one pass over the latents (what ops.bsq_quantize(lats) would give)."""
        start = ops.rows(st.pos, idx) if st is not None else None
        T_in = x.shape[1]
        for li, layer in enumerate(self.layers):
            conv = layer.downscale.downscale
            f = conv.stride[0]
            alpha = layer.downscale.activation.alpha[:, 0]
            if f == 1:
                x = ops.linear_snake(x, conv.weight[:, :, 0], conv.bias, alpha)
            else:  # non-causal only (the config refuses scale factors != 1 for causal models)
                xt = x.transpose(1, 2)
                xt = ops.grouped_conv1d(F.pad(xt, (0, (xt.shape[2] - f) % f)), conv.weight, conv.bias, 1, stride=f)
                x = ops.snake(xt.transpose(1, 2), alpha)
            x = layer.focal_block(x, st.caches[li] if st is not None else None, idx, start)
        if st is not None:
            ops.advance(st.pos, idx, start, T_in)
        lats = ops.linear(x, self.out_proj.weight, self.out_proj.bias)
        return ops.bsq_encode(lats, 1e-12) if quantize else ops.l2_normalize(lats, 1e-12)


class FocalDecoder(nn.Module):
    def __init__(self, c: FocalDecoderConfig):
        super().__init__()
        self.cfg = c
        self.in_proj = nn.Linear(c.input_dim, c.hidden_dims[0])
        outs = tuple(c.hidden_dims[1:]) + (c.output_dim,)
        n = len(c.hidden_dims)
        self.layers = nn.ModuleList(
            _container(
                focal_block=FocalBlock(
                    i, _block_kernels(c, c.last_window_size if li == n - 1 else c.window_size), c.causal
                ),
                upscale=_container(
                    activation=_container(alpha=nn.Parameter(torch.ones(i, 1))),
                    upscale=nn.ConvTranspose1d(i, o, f, f),
                ),
            )
            for li, (i, o, f) in enumerate(zip(c.hidden_dims, outs, c.upscale_factors))
        )
        self.group = c.lookahead_size + 1
        if c.lookahead_size > 0:
            v = self.group * c.output_dim
            self.refiner = _container(in_proj=nn.Linear(v, v), out_proj=nn.Linear(v, v))

    def init_state(self, slots: int, device, dtype) -> FocalState:
        c = self.cfg
        windows = [c.window_size] * (len(c.hidden_dims) - 1) + [c.last_window_size]
        return _focal_state(c, slots, device, dtype, windows)

    def forward(self, codes: Tensor, st: FocalState | None = None, idx: Tensor | None = None) -> Tensor:
        """codes (B, T, D), or tokens (B, T) int, -> qfeats (B, T', output_dim). Streaming steps
        must be whole groups except the last one of a stream."""
        start = ops.rows(st.pos, idx) if st is not None else None
        T_in = codes.shape[1]
        w, b = self.in_proj.weight, self.in_proj.bias
        if codes.is_floating_point():
            x = ops.code_proj(codes, w, b)
        else:  # in_proj of ±1/sqrt(D) codes is a signed sum of weight columns: no codes needed
            x = ops.token_proj(codes, self.cfg.input_dim, w, b, w.dtype)
        for li, layer in enumerate(self.layers):
            x = layer.focal_block(x, st.caches[li] if st is not None else None, idx, start)
            x = ops.pre_snake(x, layer.upscale.activation.alpha[:, 0])  # inside the 1x1 conv when it can be
            conv = layer.upscale.upscale
            f = conv.stride[0]
            if f == 1:
                x = ops.linear_1x1_transposed(x, conv.weight, conv.bias)
            else:
                x = ops.value(x)
                with ops.exact_convs(x):
                    x = F.conv_transpose1d(x.transpose(1, 2), conv.weight, conv.bias, stride=f).transpose(1, 2)
        if st is not None:
            ops.advance(st.pos, idx, start, T_in)
        if self.cfg.lookahead_size > 0:
            x = self._refine(x)
        return x

    def _refine(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        g = self.group
        pad = (-T) % g
        v = (F.pad(x, (0, 0, 0, pad)) if pad else x).reshape(B, (T + pad) // g, g * C)  # a step: whole groups, a view
        r = self.refiner
        v = ops.linear_residual(ops.linear_gelu(v, r.in_proj.weight, r.in_proj.bias), r.out_proj.weight, r.out_proj.bias, v)
        return v.reshape(B, T + pad, C)[:, :T]


# =========================================================================== decoders
class _Backbone(nn.Module):
    def __init__(self, c):
        super().__init__()
        k = c.kernel_size
        self.embedding = nn.Conv1d(c.input_dim, c.dim, k)
        self.input_norm = nn.LayerNorm(c.dim, eps=1e-6)
        self.layers = nn.ModuleList(
            _container(
                dwconv=nn.Conv1d(c.dim, c.dim, k, groups=c.dim),
                norm=nn.LayerNorm(c.dim, eps=1e-6),
                pwconv1=nn.Linear(c.dim, c.ffn_dim),
                pwconv2=nn.Linear(c.ffn_dim, c.dim),
                gamma=nn.Parameter(torch.ones(c.dim)),
            )
            for _ in range(c.num_layers)
        )
        self.output_norm = nn.LayerNorm(c.dim, eps=1e-6)

    def forward(self, x: Tensor, causal: bool, st: DecoderState | None, idx, start: Tensor | None = None) -> Tensor:
        def conv(xt, w, b):  # non-causal "same" conv, channel-major: unfold + GEMM (the library conv is slow for few frames)
            k = w.shape[-1]
            xp = F.pad(xt, ((k - 1) // 2, k // 2))
            u = xp.unfold(2, k, 1).transpose(1, 2).reshape(xp.shape[0], -1, w.shape[1] * k)
            return ops.linear(u, w.reshape(w.shape[0], -1), b).transpose(1, 2)

        e = self.embedding
        if causal and st is not None:  # time-major, its cache a ring: one launch on the GPU (zero padding)
            x = ops.causal_conv_ring(x, e.weight, st.emb_cache, idx, start, e.bias, replicate=False)
        elif causal:
            x = ops.causal_conv_time_major(x, e.weight, 1, None, bias=e.bias, replicate=False)
        else:
            x = conv(x.transpose(1, 2), e.weight, e.bias).transpose(1, 2)
        x = ops.layer_norm(x, self.input_norm.weight, self.input_norm.bias, 1e-6)
        for li, L in enumerate(self.layers):
            h = ops.dwconv_layer_norm(x, L.dwconv.weight, L.dwconv.bias, L.norm.weight, L.norm.bias, 1e-6, causal,
                                      st.caches[li] if st is not None else None, idx)
            h = ops.linear_gelu(h, L.pwconv1.weight, L.pwconv1.bias)
            x = ops.linear_residual(h, L.pwconv2.weight, L.pwconv2.bias, x, L.gamma)
        return ops.pre_norm(x, self.output_norm.weight, self.output_norm.bias, 1e-6)  # the head's input


class WaveNeXt(nn.Module):
    def __init__(self, c: WaveNeXtConfig, chunk: int = 4):
        super().__init__()
        self.cfg = c
        self.chunk = chunk  # frames a streaming step decodes (sizes the embedding conv's ring)
        self.backbone = _Backbone(c)
        self.head = _container(proj=nn.Linear(c.dim, c.hop_length))

    def init_state(self, slots: int, device, dtype) -> DecoderState:
        c = self.cfg
        k = c.kernel_size
        return DecoderState.zeros(slots, device, dtype, emb_cache=(ops.ring_len_time_major(k - 1, self.chunk), c.input_dim),
                                  caches=[(c.dim, k - 1)] * c.num_layers)

    def forward(self, x: Tensor, st: DecoderState | None = None, idx: Tensor | None = None) -> Tensor:
        """qfeats (B, T, C) -> sig (B, T * hop)."""
        start = ops.rows(st.pos, idx) if st is not None else None
        h = self.backbone(x, self.cfg.causal, st, idx, start)
        if st is not None:
            ops.advance(st.pos, idx, start, x.shape[1])
        # (B, T, hop) is already the waveform's layout: frame t's samples are contiguous
        return ops.linear_clamp(h, self.head.proj.weight, self.head.proj.bias, -1.0, 1.0).reshape(x.shape[0], -1)


class Vocos(nn.Module):
    def __init__(self, c: VocosConfig):
        super().__init__()
        self.cfg = c
        self.backbone = _Backbone(c)
        self.head = _container(proj=nn.Linear(c.dim, c.n_fft + 2))

    def forward(self, x: Tensor, st=None, idx=None) -> Tensor:
        c = self.cfg
        h = self.backbone(x, False, None, None)
        y = ops.linear(h, self.head.proj.weight, self.head.proj.bias).float().transpose(1, 2)  # B F T
        nb = c.n_fft // 2 + 1
        mag = torch.exp(y[:, :nb]).clamp(max=100.0)
        phase = y[:, nb:]
        spec = torch.complex(mag * torch.cos(phase), mag * torch.sin(phase))
        return _istft_same(spec, c.n_fft, c.hop_length).to(x.dtype)


def _istft_same(spec: Tensor, n_fft: int, hop: int) -> Tensor:
    """Inverse STFT with 'same' padding: Hann-windowed overlap-add, trimmed (win-hop)/2 each side,
    divided by the summed squared window."""
    B, _, T = spec.shape
    win = torch.hann_window(n_fft, device=spec.device, dtype=torch.float32)
    frames = torch.fft.irfft(spec, n_fft, dim=1, norm="backward") * win[None, :, None]  # B n_fft T
    out_len = (T - 1) * hop + n_fft
    y = F.fold(frames, (1, out_len), kernel_size=(1, n_fft), stride=(1, hop))[:, 0, 0]
    env = F.fold(win.square()[None, :, None].expand(1, n_fft, T), (1, out_len), kernel_size=(1, n_fft), stride=(1, hop))[0, 0, 0]
    pad = (n_fft - hop) // 2
    return y[:, pad:out_len - pad] / env[pad:out_len - pad]


# =========================================================================== whole model
class FocalCodecModel(nn.Module):
    def __init__(self, cfg: CodecConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = WavLM(cfg.encoder, cfg.chunk_frames)
        self.compressor = FocalEncoder(cfg.compressor)
        self.decompressor = FocalDecoder(cfg.decompressor)
        self.decoder = WaveNeXt(cfg.decoder, cfg.chunk_frames) if cfg.is_wavenext else Vocos(cfg.decoder)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

