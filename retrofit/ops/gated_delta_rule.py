"""Gated delta rule (GDN) kernel: fla's Triton chunk kernel on CUDA, a pure-torch chunked version elsewhere.

This module also owns the backend selection that every op in `retrofit.ops` shares:

* `RETROFIT_OPS=auto` (the default): fla's kernels for CUDA tensors in fp16/bf16/fp32 when fla's Triton modules
  import, the torch path otherwise (CPU, float64, or a CUDA machine without triton, with a one-time warning);
* `RETROFIT_OPS=torch`: always the torch path (a reference on GPU);
* `RETROFIT_OPS=fla`: always fla; anything that makes that impossible is a `RuntimeError` saying what is missing.

Under `torch.compile` every op traces its torch path, which inductor fuses with its neighbours, except a short
gated delta rule call without gradients (a decoded token): that is one opaque op that dispatches as above when it runs.

fla's `fla.ops`/`fla.modules` import triton at import time and crash without it (CPU CI has no triton), so they are
imported lazily, on first use, and the result (module or failure) is cached.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
import warnings
from collections.abc import Iterator
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

BACKEND_ENV = "RETROFIT_OPS"
_BACKENDS = ("auto", "torch", "fla")
# fla's kernels take these dtypes; float64 always runs on the torch path (it is how the tests get tight tolerances).
_FLA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FLA_GDR_MODULE = "fla.ops.gated_delta_rule"
# fla's chunk GDN accepts only these chunk sizes (64 is its default); the chunk size does not change the result.
_FLA_CHUNK_SIZES = (16, 32, 64)
# Inference calls up to this many tokens use fla's fused recurrent kernel instead of the chunk kernel.
_FLA_RECURRENT_MAX_T = 64
# fla 0.6's gated backward (`chunk_bwd_kernel_dqkwg`, whose K tile is then 16) hits an illegal memory access for
# fp16/bf16 inputs with K <= 16: seen on 2x H200 with Triton 3.7.1 at K=16, V=32 (benchmarks/README.md, distributed
# notes). K=8 in fp32 and K >= 64 in bf16 pass the GPU tests. Such calls take the torch path under `auto`.
_FLA_SMALL_HEAD_K = 16
_INSTALL_HINT = (
    "fla's kernels need a CUDA GPU with triton>=3.7.1 next to flash-linear-attention==0.6.0 and fla-core==0.6.0 "
    "(`pip install 'sleep-retrofit[cuda]'`, or `source .gpu/setup.sh` on the project's GPU machine). "
    f"Set {BACKEND_ENV}=torch (or auto) to use the pure-torch kernels instead."
)

_fla_imports: dict[str, ModuleType | Exception] = {}


def _import_fla(module: str) -> ModuleType | Exception:
    """Import an fla module once; on failure return (and cache) the exception and warn once."""
    if module not in _fla_imports:
        try:
            _fla_imports[module] = importlib.import_module(module)
        except Exception as exc:  # ModuleNotFoundError without triton, driver/version errors from triton itself
            _fla_imports[module] = exc
            warnings.warn(
                f"retrofit.ops: cannot import {module} ({exc!r}); CUDA tensors use the pure-torch kernels, "
                f"which are much slower. {_INSTALL_HINT}",
                RuntimeWarning,
                stacklevel=3,
            )
    return _fla_imports[module]


def requested_backend() -> str:
    """The backend that `RETROFIT_OPS` asks for: 'auto' (unset), 'torch' or 'fla'."""
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if value not in _BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={value!r} is not one of {', '.join(_BACKENDS)}.")
    return value


def select_fla_module(tensor: Tensor, module: str) -> ModuleType | None:
    """The fla module an op should run `tensor` through, or None for the torch path (shared by all ops here).

    Raises RuntimeError when `RETROFIT_OPS=fla` and fla cannot run on `tensor`.
    """
    if torch.compiler.is_compiling():
        return None  # under torch.compile the torch path is traced, and inductor fuses it with its neighbours
    backend = requested_backend()
    if backend == "torch":
        return None
    if backend == "auto":
        if not (tensor.is_cuda and tensor.dtype in _FLA_DTYPES):
            return None
        imported = _import_fla(module)
        return imported if isinstance(imported, ModuleType) else None
    if not tensor.is_cuda:
        raise RuntimeError(
            f"{BACKEND_ENV}=fla, but the tensors are on {tensor.device} and fla runs on CUDA only. {_INSTALL_HINT}"
        )
    if tensor.dtype not in _FLA_DTYPES:
        raise RuntimeError(
            f"{BACKEND_ENV}=fla, but fla's kernels do not take {tensor.dtype} (only fp16, bf16, fp32). "
            f"Set {BACKEND_ENV}=torch or auto for this dtype."
        )
    imported = _import_fla(module)
    if isinstance(imported, Exception):
        raise RuntimeError(f"{BACKEND_ENV}=fla, but {module} cannot be imported ({imported!r}). {_INSTALL_HINT}")
    return imported


def ops_backend(tensor: Tensor) -> str:
    """Which path `gated_delta_rule` would take for inputs like `tensor`: 'fla' or 'torch'."""
    return "torch" if select_fla_module(tensor, _FLA_GDR_MODULE) is None else "fla"


def l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim: the q/k normalisation fla applies in-kernel."""
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + eps)


_training_kernels: contextvars.ContextVar[bool] = contextvars.ContextVar("retrofit_training_kernels", default=False)


@contextlib.contextmanager
def training_kernels() -> Iterator[None]:
    """Within it, calls without gradients take the kernels that calls with gradients take (no inference shortcut),
    so a no-grad forward that a checkpoint recomputes in backward computes the function backward differentiates."""
    token = _training_kernels.set(True)
    try:
        yield
    finally:
        _training_kernels.reset(token)


def _inference_only(*tensors: Tensor | None) -> bool:
    """A call no backward will see: no gradients, and not the forward of a recomputed checkpoint."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return not needs_grad and not _training_kernels.get()


def _fla_backward_would_crash(q: Tensor, *tensors: Tensor | None) -> bool:
    """A call whose backward would reach fla's gated backward kernel with 16-bit heads of K <= 16 (see above)."""
    small_16bit = q.shape[-1] <= _FLA_SMALL_HEAD_K and q.dtype in (torch.float16, torch.bfloat16)
    return small_16bit and not _inference_only(q, *tensors)


@functools.cache
def _warn_small_heads(head_dim: int) -> None:
    warnings.warn(
        f"gated delta rule with {head_dim}-dim 16-bit q/k heads under gradients: fla 0.6's backward kernel crashes "
        f"(illegal memory access) for K <= {_FLA_SMALL_HEAD_K}, so these calls take the torch path (slower). Use "
        f"head dims above {_FLA_SMALL_HEAD_K} or fp32 to run them on fla.",
        stacklevel=3,
    )


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Tensor | None) -> None:
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, T, H, K]; got {tuple(q.shape)} and {tuple(k.shape)}.")
    B, T, H, K = q.shape
    if v.dim() != 4 or v.shape[:2] != (B, T) or v.shape[2] % H != 0:
        raise ValueError(f"v must be [B, T, HV, V] with HV a multiple of H={H}; got {tuple(v.shape)} for q {(B, T)}.")
    HV, V = v.shape[2], v.shape[3]
    if g.shape != (B, T, HV) or beta.shape != (B, T, HV):
        raise ValueError(f"g and beta must be [B, T, HV]={(B, T, HV)}; got {tuple(g.shape)} and {tuple(beta.shape)}.")
    if initial_state is not None and initial_state.shape != (B, HV, K, V):
        raise ValueError(f"initial_state must be [B, HV, K, V]={(B, HV, K, V)}; got {tuple(initial_state.shape)}.")


def gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Gated delta rule over a sequence, with gradients to q, k, v, g, beta and `initial_state`.

    Recurrence (fla's convention: decay before the error, output read after the update), per value head:
        S_t = exp(g_t) S_{t-1};  S_t = S_t + k_t (beta_t (v_t - S_t^T k_t))^T;  o_t = S_t^T (scale q_t)

    Args:
        q, k: [B, T, H, K]. v: [B, T, HV, V] with HV % H == 0; value head hv reads q/k head hv // (HV // H).
        g: [B, T, HV] log-space decay (<= 0). beta: [B, T, HV] write strength in (0, 1), already sigmoided.
        initial_state: [B, HV, K, V] float32 state before the first token; None means zeros.
        output_final_state: also return the state after the last token.
        scale: query scale; None means K ** -0.5.
        use_qk_l2norm: l2-normalise q and k first (x / sqrt(sum x^2 + 1e-6)), as fla does in-kernel.
        chunk_size: tokens per chunk of the chunked algorithm (fla takes 16, 32 or 64 and uses 64 otherwise).

    Returns:
        o [B, T, HV, V] in q's dtype, and the final state [B, HV, K, V] (float32; float64 on the torch path for
        float64 inputs) or None.
    """
    _check_shapes(q, k, v, g, beta, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if torch.compiler.is_compiling() and q.shape[1] <= _FLA_RECURRENT_MAX_T and not torch.is_grad_enabled():
        o, final_state = torch.ops.sleep_retrofit.recurrent_gated_delta_rule(
            q, k, v, g, beta, initial_state, scale, use_qk_l2norm
        )
        return o, (final_state if output_final_state else None)
    fla = select_fla_module(q, _FLA_GDR_MODULE)
    if fla is not None and _fla_backward_would_crash(q, k, v, g, beta, initial_state):
        if requested_backend() == "fla":
            raise RuntimeError(
                f"{BACKEND_ENV}=fla, but fla 0.6's gated backward crashes for 16-bit q/k heads of K={q.shape[-1]} "
                f"<= {_FLA_SMALL_HEAD_K} (illegal memory access). Use larger heads, fp32, or {BACKEND_ENV}=auto."
            )
        _warn_small_heads(q.shape[-1])
        fla = None
    if fla is not None:
        # Always by keyword: fla's positional order differs between its chunk and fused_recurrent entry points.
        arguments = {
            "q": q, "k": k, "v": v, "g": g, "beta": beta, "scale": scale, "initial_state": initial_state,
            "output_final_state": output_final_state, "use_qk_l2norm_in_kernel": use_qk_l2norm,
        }  # fmt: skip
        if q.shape[1] <= _FLA_RECURRENT_MAX_T and _inference_only(q, k, v, g, beta, initial_state):
            # Decoding and other short inference calls: one fused kernel walks the tokens (what fla's own layers
            # do for q_len <= 64 outside training); the chunk path launches a dozen kernels for a few tokens.
            # It has no backward, hence only without gradients.
            return fla.fused_recurrent_gated_delta_rule(**arguments)
        return fla.chunk_gated_delta_rule(**arguments, chunk_size=chunk_size if chunk_size in _FLA_CHUNK_SIZES else 64)
    return _gated_delta_rule_torch(
        q,
        k,
        v,
        g,
        beta,
        initial_state=initial_state,
        output_final_state=output_final_state,
        scale=scale,
        use_qk_l2norm=use_qk_l2norm,
        chunk_size=chunk_size,
    )


def _recurrent_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
    """One token of the recurrence (q already scaled; q, k `[B, HV, K]`, v `[B, HV, V]`, g, beta `[B, HV]`), in
    element-wise products and sums that a compiler fuses. Returns o `[B, HV, V]` and the new state."""
    S = S * g.exp()[..., None, None]
    u = beta[..., None] * (v - (S * k[..., None]).sum(-2))
    S = S + k[..., None] * u[..., None, :]
    return (S * q[..., None]).sum(-2), S


def _state_dtype(*inputs: Tensor) -> torch.dtype:
    """The torch path's compute and state dtype: float64 when an input is, float32 otherwise (fla's state dtype)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in inputs) else torch.float32


def _gated_delta_rule_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    initial_state: Tensor | None,
    output_final_state: bool,
    scale: float,
    use_qk_l2norm: bool,
    chunk_size: int,
) -> tuple[Tensor, Tensor | None]:
    """Chunked gated delta rule in pure torch (WY/UT-transform form); autograd gives the backward.

    Within a chunk of C tokens that starts from state S0, with G the cumulative sum of g inside the chunk, the
    delta-rule updates u_t (so that S_t = exp(G_t) S0 + sum_{j<=t} exp(G_t - G_j) k_j u_j^T) solve the unit
    lower-triangular system (I + A) U = beta V - (beta exp(G) K) S0 with A_tj = beta_t exp(G_t - G_j) k_t.k_j (j < t).
    Hence U = U0 - W S0 with U0 = (I + A)^-1 beta V and W = (I + A)^-1 beta exp(G) K, both independent of S0, and
        O = (exp(G) Q) S0 + (Q K^T * exp(G_t - G_j), j <= t) U,   S_end = exp(G_C) S0 + (K exp(G_C - G))^T U.
    Everything that does not depend on S0 is computed for all chunks at once; a Python loop over chunks (never over
    tokens) then carries the state. Computed in float32, or float64 when an input is float64.
    """
    out_dtype = q.dtype
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    dtype = _state_dtype(q, k, v, g, beta)
    q, k, v, g, beta = (t.to(dtype) for t in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    if HV != H:
        q, k = q.repeat_interleave(HV // H, dim=2), k.repeat_interleave(HV // H, dim=2)
    S = q.new_zeros(B, HV, K, V) if initial_state is None else initial_state.to(dtype)
    if T == 1:  # a decoding step: the recurrence itself, not the token padded to a whole chunk
        o, S = _recurrent_step(q[:, 0] * scale, k[:, 0], v[:, 0], g[:, 0], beta[:, 0], S)
        return o[:, None].to(out_dtype), (S if output_final_state else None)

    # [B, HV, T, D]; pad T to a whole number of chunks with g = 0, beta = 0 (and zero q, k, v): an exact no-op.
    C = chunk_size
    N = -(-T // C)
    pad = N * C - T
    q, k, v = (F.pad(t.transpose(1, 2), (0, 0, 0, pad)) for t in (q, k, v))
    g, beta = (F.pad(t.transpose(1, 2), (0, pad)) for t in (g, beta))
    q = q.reshape(B, HV, N, C, K) * scale
    k = k.reshape(B, HV, N, C, K)
    v = v.reshape(B, HV, N, C, V)
    G = g.reshape(B, HV, N, C).cumsum(-1)
    beta = beta.reshape(B, HV, N, C)

    # exp(G_t - G_j) for j <= t, zero above the diagonal. The mask goes on BEFORE exp: above the diagonal the
    # difference is positive and can be large, and exp of it would overflow (then 0 * inf = nan).
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = (G.unsqueeze(-1) - G.unsqueeze(-2)).masked_fill(~causal, float("-inf")).exp()
    kkt = k @ k.transpose(-1, -2)
    A = (beta.unsqueeze(-1) * kkt * decay).tril(-1)
    # unitriangular=True reads only the strictly lower part of A and takes the diagonal as ones: it solves (I + A).
    rhs = torch.cat([beta.unsqueeze(-1) * v, (beta * G.exp()).unsqueeze(-1) * k], dim=-1)
    U0, W = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True).split([V, K], dim=-1)
    attn = (q @ k.transpose(-1, -2)) * decay
    q_decayed = q * G.exp().unsqueeze(-1)
    k_decayed = k * (G[..., -1:] - G).exp().unsqueeze(-1)
    chunk_decay = G[..., -1].exp()[..., None, None]

    outputs = []
    for n in range(N):
        U = U0[:, :, n] - W[:, :, n] @ S
        outputs.append(q_decayed[:, :, n] @ S + attn[:, :, n] @ U)
        S = chunk_decay[:, :, n] * S + k_decayed[:, :, n].transpose(-1, -2) @ U
    o = torch.stack(outputs, dim=2).reshape(B, HV, N * C, V)[:, :, :T].transpose(1, 2).to(out_dtype)
    return o, (S if output_final_state else None)


@torch.library.custom_op("sleep_retrofit::recurrent_gated_delta_rule", mutates_args=())
def _recurrent_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    initial_state: Tensor | None,
    scale: float,
    use_qk_l2norm: bool,
) -> tuple[Tensor, Tensor]:
    """A short inference call of `gated_delta_rule` (a decoded token) as one opaque op for `torch.compile`.

    A compiled wake step would otherwise trace the torch path (fla's entry points are `torch.compiler.disable`d,
    which splits the graph): inductor then reads and writes each fast state about three times per token, where
    fla's fused recurrent kernel reads it once and writes it once. Run eagerly, the op takes the usual dispatch, so
    it is fla's kernel wherever eager decoding's is, and the torch path elsewhere.
    """
    o, final_state = gated_delta_rule(
        q, k, v, g, beta, initial_state=initial_state, output_final_state=True, scale=scale, use_qk_l2norm=use_qk_l2norm
    )
    return o.to(q.dtype).contiguous(), final_state


@_recurrent_gated_delta_rule.register_fake
def _(q, k, v, g, beta, initial_state, scale, use_qk_l2norm):
    B, _, _, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    return torch.empty_like(v, dtype=q.dtype), v.new_empty(B, HV, K, V, dtype=_state_dtype(q, k, v, g, beta))
