"""Multi-head attention written the way tutorials write it, with attntrace.tap calls.

The correct classes are transcribed from the seeds, keeping their structure and
variable names; the only additions are `attntrace.tap(...)` lines (and the
capture's hook names in comments).  Each buggy variant repeats its parent's
forward with ONE classic mistake, marked `# MISTAKE:` -- on purpose a whole
forward, because that is how the mistake sits in real code.

Used by tests/test_capture.py: each class is captured and `attntrace check`
must name the mistake (or report the correct class as matching).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import attntrace

# =========================================================================== seed 001 (PyTorch, nn.Linear)

class SimpleSelfAttention(nn.Module):
    """Seed 001, §二 "最小可运行的单头注意力": one head, V keeps d_model, no output projection."""

    def __init__(self, d_model, d_k=None):
        super().__init__()
        self.d_model = d_model
        self.d_k = d_k if d_k is not None else d_model
        # 三个可学习投影矩阵
        self.Wq = nn.Linear(d_model, self.d_k)
        self.Wk = nn.Linear(d_model, self.d_k)
        self.Wv = nn.Linear(d_model, d_model)  # V的维度通常保持d_model

    def forward(self, x, mask=None):
        # x shape: [batch, seq_len, d_model]
        Q = self.Wq(x)  # [b, s, d_k]
        K = self.Wk(x)
        V = self.Wv(x)  # [b, s, d_model]
        # 核心计算:注意力分数
        scores = torch.matmul(Q, K.transpose(-2, -1))  # [b, s, s]
        attntrace.tap("attn.hook_qk", scores)
        scores = scores / math.sqrt(self.d_k)  # Scaled
        attntrace.tap("attn.hook_scaled", scores)
        # mask(可选,用于因果/填充)
        if mask is not None:
            scores = scores.masked_fill(mask == 0, -1e9)
        attn_weights = F.softmax(scores, dim=-1)  # [b, s, s]
        attntrace.tap("weights", attn_weights)
        out = torch.matmul(attn_weights, V)  # [b, s, d_model]
        attntrace.tap("output", out)
        return out, attn_weights


class SimpleSelfAttentionSoftmaxDim1(SimpleSelfAttention):
    """Mistake: softmax over dim=1 of the (batch, seq, seq) scores -- the queries, not the keys."""

    def forward(self, x, mask=None):
        Q = self.Wq(x)
        K = self.Wk(x)
        V = self.Wv(x)
        scores = torch.matmul(Q, K.transpose(-2, -1))
        attntrace.tap("attn.hook_qk", scores)
        scores = scores / math.sqrt(self.d_k)
        attntrace.tap("attn.hook_scaled", scores)
        if mask is not None:
            scores = scores.masked_fill(mask == 0, -1e9)
        attn_weights = F.softmax(scores, dim=1)  # MISTAKE: dim=1 of [b, s, s] normalises over the queries
        attntrace.tap("weights", attn_weights)
        out = torch.matmul(attn_weights, V)
        attntrace.tap("output", out)
        return out, attn_weights


class MultiHeadAttention(nn.Module):
    """Seed 001, §三 "升级版:多头注意力"."""

    def __init__(self, d_model, num_heads):
        super().__init__()
        assert d_model % num_heads == 0
        self.d_model = d_model
        self.num_heads = num_heads
        self.d_k = d_model // num_heads
        self.Wq = nn.Linear(d_model, d_model)
        self.Wk = nn.Linear(d_model, d_model)
        self.Wv = nn.Linear(d_model, d_model)
        self.Wo = nn.Linear(d_model, d_model)  # 最后的融合

    def forward(self, x, mask=None):
        b, s, d = x.shape
        Q = self.Wq(x).view(b, s, self.num_heads, self.d_k).transpose(1, 2)
        K = self.Wk(x).view(b, s, self.num_heads, self.d_k).transpose(1, 2)
        V = self.Wv(x).view(b, s, self.num_heads, self.d_k).transpose(1, 2)
        # 现在形状:[b, h, s, d_k]
        attntrace.tap("Q", Q)
        attntrace.tap("K", K)
        attntrace.tap("V", V)
        scores = torch.matmul(Q, K.transpose(-2, -1)) / math.sqrt(self.d_k)
        attntrace.tap("attn.hook_scaled", scores)
        if mask is not None:
            # mask要广播到 [b, h, s, s]
            mask = mask.unsqueeze(1)
            scores = scores.masked_fill(mask == 0, -1e9)
            attntrace.tap("attn.hook_attn_scores", scores)
        attn = F.softmax(scores, dim=-1)
        attntrace.tap("attn.hook_pattern", attn)
        context = torch.matmul(attn, V)  # [b,h,s,d_k]
        attntrace.tap("attn.hook_z", context)
        # 合并多头
        context = context.transpose(1, 2).contiguous().view(b, s, d)
        out = self.Wo(context)
        attntrace.tap("hook_attn_out", out)
        return out


class MultiHeadAttentionNoTranspose(MultiHeadAttention):
    """Mistake: heads split by viewing straight to (batch, heads, seq, d_k), no transpose."""

    def forward(self, x, mask=None):
        b, s, d = x.shape
        Q = self.Wq(x).view(b, self.num_heads, s, self.d_k)  # MISTAKE: should be view(b, s, h, d_k).transpose(1, 2)
        K = self.Wk(x).view(b, self.num_heads, s, self.d_k)  # MISTAKE (the same)
        V = self.Wv(x).view(b, self.num_heads, s, self.d_k)  # MISTAKE (the same)
        attntrace.tap("Q", Q)
        attntrace.tap("K", K)
        attntrace.tap("V", V)
        scores = torch.matmul(Q, K.transpose(-2, -1)) / math.sqrt(self.d_k)
        attntrace.tap("attn.hook_scaled", scores)
        if mask is not None:
            mask = mask.unsqueeze(1)
            scores = scores.masked_fill(mask == 0, -1e9)
            attntrace.tap("attn.hook_attn_scores", scores)
        attn = F.softmax(scores, dim=-1)
        attntrace.tap("attn.hook_pattern", attn)
        context = torch.matmul(attn, V)
        attntrace.tap("attn.hook_z", context)
        context = context.transpose(1, 2).contiguous().view(b, s, d)
        out = self.Wo(context)
        attntrace.tap("hook_attn_out", out)
        return out


class MultiHeadAttentionMaskAfterSoftmax(MultiHeadAttention):
    """Mistake: softmax first, then the blocked weights set to 0 (rows no longer sum to 1)."""

    def forward(self, x, mask=None):
        b, s, d = x.shape
        Q = self.Wq(x).view(b, s, self.num_heads, self.d_k).transpose(1, 2)
        K = self.Wk(x).view(b, s, self.num_heads, self.d_k).transpose(1, 2)
        V = self.Wv(x).view(b, s, self.num_heads, self.d_k).transpose(1, 2)
        scores = torch.matmul(Q, K.transpose(-2, -1)) / math.sqrt(self.d_k)
        attntrace.tap("attn.hook_scaled", scores)
        attn = F.softmax(scores, dim=-1)
        if mask is not None:
            mask = mask.unsqueeze(1)
            attn = attn.masked_fill(mask == 0, 0.0)  # MISTAKE: masking after softmax
        attntrace.tap("attn.hook_pattern", attn)
        context = torch.matmul(attn, V)
        attntrace.tap("attn.hook_z", context)
        context = context.transpose(1, 2).contiguous().view(b, s, d)
        out = self.Wo(context)
        attntrace.tap("hook_attn_out", out)
        return out


# =========================================================================== seed 004 (PyTorch part)

class MultiHeadAttentionPyTorch(nn.Module):
    """Seed 004, "PyTorch实现": forward(Q, K, V, mask), dropout on the weights (identity in eval())."""

    def __init__(self, d_model, n_heads, dropout=0.1):
        super().__init__()
        self.d_model = d_model
        self.n_heads = n_heads
        self.d_k = d_model // n_heads
        self.W_q = nn.Linear(d_model, d_model)
        self.W_k = nn.Linear(d_model, d_model)
        self.W_v = nn.Linear(d_model, d_model)
        self.W_o = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, Q, K, V, mask=None):
        batch_size = Q.size(0)
        # 线性变换
        Q = self.W_q(Q).view(batch_size, -1, self.n_heads, self.d_k).transpose(1, 2)
        K = self.W_k(K).view(batch_size, -1, self.n_heads, self.d_k).transpose(1, 2)
        V = self.W_v(V).view(batch_size, -1, self.n_heads, self.d_k).transpose(1, 2)
        attntrace.tap("attn.hook_q", Q)
        # 注意力
        scores = torch.matmul(Q, K.transpose(-2, -1)) / (self.d_k ** 0.5)
        attntrace.tap("scaled", scores)
        if mask is not None:
            scores = scores.masked_fill(mask == 0, -1e9)
        attn_weights = F.softmax(scores, dim=-1)
        attntrace.tap("weights", attn_weights)
        attn_weights = self.dropout(attn_weights)
        context = torch.matmul(attn_weights, V)
        # 合并头
        context = context.transpose(1, 2).contiguous().view(batch_size, -1, self.d_model)
        attntrace.tap("concat", context)
        return attntrace.tap("output", self.W_o(context)), attn_weights


class MultiHeadAttentionScaleByDModel(MultiHeadAttentionPyTorch):
    """Mistake: scores divided by √d_model instead of √d_k."""

    def forward(self, Q, K, V, mask=None):
        batch_size = Q.size(0)
        Q = self.W_q(Q).view(batch_size, -1, self.n_heads, self.d_k).transpose(1, 2)
        K = self.W_k(K).view(batch_size, -1, self.n_heads, self.d_k).transpose(1, 2)
        V = self.W_v(V).view(batch_size, -1, self.n_heads, self.d_k).transpose(1, 2)
        attntrace.tap("attn.hook_q", Q)
        scores = torch.matmul(Q, K.transpose(-2, -1)) / (self.d_model ** 0.5)  # MISTAKE: d_model, not d_k
        attntrace.tap("scaled", scores)
        if mask is not None:
            scores = scores.masked_fill(mask == 0, -1e9)
        attn_weights = F.softmax(scores, dim=-1)
        attntrace.tap("weights", attn_weights)
        attn_weights = self.dropout(attn_weights)
        context = torch.matmul(attn_weights, V)
        context = context.transpose(1, 2).contiguous().view(batch_size, -1, self.d_model)
        attntrace.tap("concat", context)
        return attntrace.tap("output", self.W_o(context)), attn_weights


class MultiHeadAttentionMaskInverted(MultiHeadAttentionPyTorch):
    """Mistake: masked_fill where the mask is 1, although 1 means "may attend"."""

    def forward(self, Q, K, V, mask=None):
        batch_size = Q.size(0)
        Q = self.W_q(Q).view(batch_size, -1, self.n_heads, self.d_k).transpose(1, 2)
        K = self.W_k(K).view(batch_size, -1, self.n_heads, self.d_k).transpose(1, 2)
        V = self.W_v(V).view(batch_size, -1, self.n_heads, self.d_k).transpose(1, 2)
        attntrace.tap("attn.hook_q", Q)
        scores = torch.matmul(Q, K.transpose(-2, -1)) / (self.d_k ** 0.5)
        attntrace.tap("scaled", scores)
        if mask is not None:
            scores = scores.masked_fill(mask == 1, -1e9)  # MISTAKE: blocks the positions that may attend
        attn_weights = F.softmax(scores, dim=-1)
        attntrace.tap("weights", attn_weights)
        attn_weights = self.dropout(attn_weights)
        context = torch.matmul(attn_weights, V)
        context = context.transpose(1, 2).contiguous().view(batch_size, -1, self.d_model)
        attntrace.tap("concat", context)
        return attntrace.tap("output", self.W_o(context)), attn_weights


class MultiHeadAttentionHalfMask(MultiHeadAttentionPyTorch):
    """Mistake: seed 004's numpy mask, `scores + mask * -1e9` (1 = blocked), run in float16:
    -1e9 does not exist in float16 (max 65504), it becomes -inf, and a query row whose
    every key is blocked becomes NaN instead of attending to nothing."""

    def forward(self, Q, K, V, mask=None):
        batch_size = Q.size(0)
        Q = self.W_q(Q).view(batch_size, -1, self.n_heads, self.d_k).transpose(1, 2)
        K = self.W_k(K).view(batch_size, -1, self.n_heads, self.d_k).transpose(1, 2)
        V = self.W_v(V).view(batch_size, -1, self.n_heads, self.d_k).transpose(1, 2)
        attntrace.tap("attn.hook_q", Q)
        scores = torch.matmul(Q, K.transpose(-2, -1)) / (self.d_k ** 0.5)
        attntrace.tap("scaled", scores)
        if mask is not None:
            scores = scores + (mask * -1e9)  # MISTAKE: -1e9 "minus infinity" in float16
        attn_weights = F.softmax(scores, dim=-1)
        attntrace.tap("weights", attn_weights)
        attn_weights = self.dropout(attn_weights)
        context = torch.matmul(attn_weights, V)
        context = context.transpose(1, 2).contiguous().view(batch_size, -1, self.d_model)
        attntrace.tap("concat", context)
        return attntrace.tap("output", self.W_o(context)), attn_weights


# =========================================================================== grouped-query attention (not from a seed)

class GroupedQueryAttention(nn.Module):
    """Llama-style grouped-query attention written by hand: one fused projection [q | k | v],
    kv heads shared by groups of query heads (repeat_interleave), causal."""

    def __init__(self, d_model, n_heads, n_kv_heads):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.d_head = n_heads, n_kv_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * self.d_head, bias=False)
        self.out = nn.Linear(n_heads * self.d_head, d_model, bias=False)

    def share(self, kv):
        return kv.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).split([self.n_heads * self.d_head, self.n_kv_heads * self.d_head,
                                     self.n_kv_heads * self.d_head], dim=-1)
        q = q.view(b, s, self.n_heads, self.d_head).transpose(1, 2)
        k = self.share(k.view(b, s, self.n_kv_heads, self.d_head).transpose(1, 2))
        v = self.share(v.view(b, s, self.n_kv_heads, self.d_head).transpose(1, 2))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_head)
        causal = torch.ones(s, s, dtype=torch.bool).triu(1)
        weights = attntrace.tap("weights", F.softmax(scores.masked_fill(causal, float("-inf")), dim=-1))
        z = attntrace.tap("z", weights @ v)
        return attntrace.tap("output", self.out(z.transpose(1, 2).reshape(b, s, -1)))


class GroupedQueryAttentionTiled(GroupedQueryAttention):
    """Mistake: kv heads shared with .repeat (tiles 0,1,0,1) instead of .repeat_interleave (0,0,1,1)."""

    def share(self, kv):
        return kv.repeat(1, self.n_heads // self.n_kv_heads, 1, 1)  # MISTAKE: repeat, not repeat_interleave
