"""LayerNorm pieces shared by the Triton kernels (the q/k norms of the attention branch, the
gate's input norm): row statistics, and their application to a tile of columns.

Rows are fp32 tiles whose columns past the normalized width hold exact zeros (masked loads), so
sums over the whole tile are sums over the real columns."""
import triton
import triton.language as tl


@triton.jit
def layer_norm_stats(x, col_mask, width, eps):
    """Each row's mean and 1/std over the `width` columns `col_mask` marks, in two passes (mean,
    then the variance of the centered row) as torch computes them."""
    mean = tl.sum(x, axis=1) / width
    centered = tl.where(col_mask[None, :], x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / width + eps)
    return mean, rstd


@triton.jit
def layer_norm_apply(x, mean, rstd, w_ptr, b_ptr, cols, col_mask, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """(x - mean) / std, times the weight and plus the bias at `cols`, for a [rows, cols] tile of
    the rows `mean` and `rstd` describe (zeros where col_mask is off)."""
    normed = tl.where(col_mask[None, :], (x - mean[:, None]) * rstd[:, None], 0.0)
    if HAS_W:
        normed *= tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        normed += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return normed
