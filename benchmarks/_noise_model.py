"""Per-prompt noise models for the rollout allocator, and the tools that measure them.

Used by ``benchmarks/gradient_variance.py`` (see docs/noise_model.md).

Theory (RLOO advantages, prompt-balanced loss, ratio 1). Prompt i's contribution to the update is
ĝ_n = (1/n) Σ_j A_j s_j with A_j = (n r_j − K)/(n − 1), K = Σ_j r_j ~ Binomial(n, p), s_j the sample's
score vector ∇ Σ_t log π(y_t). Write s_j = μ_c + ε_j for outcome class c = r_j, E‖ε‖² | c = σ_c². Then

    ĝ_n = [(n − K) Σ_succ s − K Σ_fail s] / (n (n − 1)),
    trace Var ĝ_n = {E[K (n−K)²] σ_1² + E[K² (n−K)] σ_0² + Var[K (n−K)] ‖μ_1 − μ_0‖²} / (n² (n−1)²)   (exact),

≈ p(1−p)/(n−1) · S with S = (1−p) σ_1² + p σ_0² + (1−2p)² ‖μ_1 − μ_0‖² to leading order in 1/n: the *minority*
outcome's score noise dominates (the last term, K(n−K)'s fluctuation, is small when the noise is). A noise model estimates S per prompt from a cheap per-sample proxy q_j of ‖s_j‖².

Everything here is a pure function of named arrays, or (``PerSampleScores``) a thin wrapper around a HF
Llama model that returns per-sample score vectors from one batched forward + backward.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import numpy as np

# shrinkage of a prompt's per-class proxy mean toward the pool-level class mean: pseudo-count of pool
# samples (a prompt with k samples of the class weighs its own mean k / (k + KAPPA))
KAPPA = 2.0
PROXIES = ("nll", "pisq", "ghost", "ghost_diag", "length", "score")
PROXY_DESC = {
    "nll": "mean response NLL, −(1/T) Σ_t log π_t(y_t)",
    "pisq": "Σ_t (1 − π_t(y_t))²",
    "ghost": "LM-head ghost norm, exact: ‖Σ_t (e_{y_t} − π_t) h_tᵀ‖²_F",
    "ghost_diag": "LM-head ghost norm, diagonal: Σ_t ‖e_{y_t} − π_t‖² ‖h_t‖², ‖e_y − π‖² = 1 − 2π_y + Σ_v π_v²",
    "length": "response length T (tokens, EOS included)",
    "score": "REFERENCE, not cheap: the true ‖s_j‖² over all parameters (one backward per sample)",
}


# ----------------------------------------------------------------------------------------------
# Exact per-prompt variance curve of RLOO with the balanced loss
# ----------------------------------------------------------------------------------------------


def binomial_moments(n: int, p: float) -> Dict[str, float]:
    """Moments of K ~ Binomial(n, p) the RLOO variance needs: E[K(n−K)²], E[K²(n−K)], Var[K(n−K)]."""
    if n < 0 or not 0.0 <= p <= 1.0:
        raise ValueError(f"binomial_moments: need n >= 0 and 0 <= p <= 1, got n={n}, p={p}")
    k = np.arange(n + 1, dtype=np.float64)
    logc = np.array([math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) for j in range(n + 1)])
    with np.errstate(divide="ignore", invalid="ignore"):
        lp = np.where(k > 0, k * np.log(p) if p > 0 else -np.inf, 0.0) + np.where(
            n - k > 0, (n - k) * np.log1p(-p) if p < 1 else -np.inf, 0.0)
    pmf = np.exp(logc + lp)
    a = k * (n - k)
    return {"k_nk2": float(pmf @ (k * (n - k) ** 2)), "k2_nk": float(pmf @ (k * k * (n - k))),
            "var_k_nk": float(pmf @ (a * a) - (pmf @ a) ** 2)}


def rloo_prompt_variance(n: int, p: float, var_succ: float, var_fail: float, mean_gap2: float) -> float:
    """trace Var of ĝ_n = (1/n) Σ_j A_j s_j (RLOO) for n ≥ 2 rollouts (exact, formula in the module doc).

    Inputs: p = pass rate; var_succ / var_fail = σ_1², σ_0² = E‖s − μ_c‖² within each outcome class (units of
    ‖s‖²); mean_gap2 = ‖μ_1 − μ_0‖². Output in the same units (multiply by 1/(N L)² for the balanced update)."""
    if n < 2:
        raise ValueError(f"rloo_prompt_variance: n must be >= 2, got {n}")
    m = binomial_moments(n, p)
    return (m["k_nk2"] * var_succ + m["k2_nk"] * var_fail + m["var_k_nk"] * mean_gap2) / (n * n * (n - 1) ** 2)


def class_curve_params(count, sum_sq, sum_vec_gap2_raw, sum_sq_of_sums) -> Dict[str, float]:
    """Unbiased σ_1², σ_0², ‖μ_1 − μ_0‖² of one prompt from its samples' class sufficient statistics.

    count: (2,) samples per class [fail, succ]; sum_sq: (2,) Σ‖s_j‖² per class; sum_sq_of_sums: (2,) ‖Σ_j s_j‖²
    per class; sum_vec_gap2_raw: ‖s̄_1 − s̄_0‖² of the class means (needs both classes). A class with fewer than
    2 samples gets σ² = its raw mean ‖s‖² (an upper bound; such a class has p ≈ 0 weight in the curve)."""
    count = np.asarray(count, dtype=np.float64)
    sum_sq = np.asarray(sum_sq, dtype=np.float64)
    ss = np.asarray(sum_sq_of_sums, dtype=np.float64)
    var = np.zeros(2)
    for c in range(2):
        if count[c] >= 2:
            var[c] = max((sum_sq[c] - ss[c] / count[c]) / (count[c] - 1), 0.0)
        elif count[c] == 1:
            var[c] = sum_sq[c]
    gap2 = 0.0
    if count.min() >= 1 and sum_vec_gap2_raw is not None:
        gap2 = max(float(sum_vec_gap2_raw) - sum(var[c] / count[c] for c in range(2)), 0.0)
    return {"p": float(count[1] / count.sum()) if count.sum() > 0 else 0.0,
            "var_fail": float(var[0]), "var_succ": float(var[1]), "mean_gap2": gap2}


def variance_curve(params: Dict[str, float], ns: Sequence[int]) -> np.ndarray:
    """rloo_prompt_variance at each n of ``ns`` for one prompt's ``class_curve_params``."""
    return np.array([rloo_prompt_variance(int(n), params["p"], params["var_succ"], params["var_fail"],
                                          params["mean_gap2"]) for n in ns])


# ----------------------------------------------------------------------------------------------
# Per-sample proxies from one forward (no backward)
# ----------------------------------------------------------------------------------------------


def sample_proxies(logits, hidden, targets, mask, chunk_tokens: int = 4096, ghost: bool = True,
                   diag: bool = True) -> Dict[str, object]:
    """Per-sample proxies of the squared score norm from a forward's outputs (no autograd).

    logits: (M, T, V) next-token logits at the positions that predict ``targets``; hidden: (M, T, d) the LM
    head's inputs at the same positions; targets: (M, T) int64 sampled tokens; mask: (M, T) 1 on response
    tokens. Returns a dict of (M,) float64 torch tensors: "nll", "pisq", "ghost" (if ``ghost``), "ghost_diag",
    "length" (see PROXY_DESC); ``diag=False`` skips "ghost_diag" (for timing one proxy alone). Memory: one chunk of ``chunk_tokens`` x V float32 probabilities at a time."""
    import torch

    if logits.dim() != 3 or hidden.shape[:2] != logits.shape[:2] or targets.shape != logits.shape[:2] \
            or mask.shape != logits.shape[:2]:
        raise ValueError(f"sample_proxies: shapes logits {tuple(logits.shape)}, hidden {tuple(hidden.shape)}, "
                         f"targets {tuple(targets.shape)}, mask {tuple(mask.shape)} do not match (M, T, ·)")
    M, T, V = logits.shape
    out = {k: torch.zeros(M, dtype=torch.float64) for k in ("nll", "pisq", "length") + (("ghost_diag",) if diag else ())}
    if ghost:
        out["ghost"] = torch.zeros(M, dtype=torch.float64)
    mask = mask.to(torch.float32)
    rows = max(1, chunk_tokens // max(T, 1))
    with torch.no_grad():
        for s in range(0, M, rows):
            lg = logits[s:s + rows].float()
            h = hidden[s:s + rows].float()
            m = mask[s:s + rows]
            y = targets[s:s + rows]
            logp = lg.gather(-1, y.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(lg, -1)
            pi = logp.exp()
            tok = m.sum(1)
            out["length"][s:s + rows] = tok.double()
            out["nll"][s:s + rows] = (-(logp * m).sum(1) / tok.clamp(min=1)).double()
            out["pisq"][s:s + rows] = (((1 - pi) ** 2) * m).sum(1).double()
            if diag or ghost:
                probs = torch.softmax(lg, -1)
            if diag:
                e2 = 1 - 2 * pi + (probs * probs).sum(-1)  # ‖e_y − π‖²
                h2 = (h * h).sum(-1)
                out["ghost_diag"][s:s + rows] = (e2 * h2 * m).sum(1).double()
            if ghost:
                z = -probs * m.unsqueeze(-1)
                z.scatter_add_(-1, y.unsqueeze(-1), m.unsqueeze(-1))  # (e_y − π) on response tokens, 0 elsewhere
                if T <= h.shape[-1]:  # Σ_{t,t'} <z_t, z_t'> <h_t, h_t'>: T² V
                    g = ((z @ z.transpose(1, 2)) * (h @ h.transpose(1, 2))).sum((1, 2))
                else:  # ‖zᵀ h‖²_F: T V d
                    g = (z.transpose(1, 2) @ h).pow(2).sum((1, 2))
                out["ghost"][s:s + rows] = g.double()
    return out


def entropy_and_ghost_diag(logits, hidden, targets, mask, chunk_tokens: int = 55):
    """The trainer's per-token entropy pass with the ghost_diag proxy fused in: one softmax per chunk of tokens
    gives both H_t = logsumexp − Σ_v π_v z_v and ‖e_y − π‖² = 1 − 2π_y + Σ_v π_v². Shapes as ``sample_proxies``;
    ``chunk_tokens`` ≈ the trainer's 32 MiB float32 chunk at vocab 151,936. Returns ((M, T) entropy,
    (M,) float64 ghost_diag). For timing the proxy's marginal cost over the entropy pass DynaMO already runs."""
    import torch

    M, T, V = logits.shape
    lg2 = logits.reshape(M * T, V)
    h2 = (hidden.float() ** 2).sum(-1).reshape(-1)
    y = targets.reshape(-1)
    m = mask.reshape(-1).float()
    ent = torch.empty(M * T)
    gd = torch.empty(M * T)
    with torch.no_grad():
        for s in range(0, M * T, chunk_tokens):
            z = lg2[s:s + chunk_tokens].float()
            lse = torch.logsumexp(z, -1)
            pr = torch.exp(z - lse.unsqueeze(-1))
            ent[s:s + chunk_tokens] = lse - (pr * z).sum(-1)
            pi = pr.gather(-1, y[s:s + chunk_tokens].unsqueeze(-1)).squeeze(-1)
            gd[s:s + chunk_tokens] = (1 - 2 * pi + (pr * pr).sum(-1)) * h2[s:s + chunk_tokens] * m[s:s + chunk_tokens]
    return ent.reshape(M, T), gd.reshape(M, T).double().sum(1)


# ----------------------------------------------------------------------------------------------
# Noise model: per-prompt, per-class proxy means with shrinkage
# ----------------------------------------------------------------------------------------------


def class_prior_curve(q, success, owner, p_hat) -> np.ndarray:
    """Pool-level "variance curve": per class c, a log-log fit across the pool's prompts of the prompt's class mean
    of q against the probability of that class, log q̄_c,i ≈ a_c + b_c log P_c,i (P_succ = p̂_i, P_fail = 1 − p̂_i),
    weighted by the class's sample count, b_c clipped to [−2, 0] (rarer outcomes are not cheaper; b = 0 gives the
    weighted geometric mean of the class means). Returns the
    (2, N) curve value [fail, succ] for every prompt, including those that never showed the class; a class seen in
    fewer than 2 prompts falls back to its flat pool mean (b = 0)."""
    q = np.asarray(q, dtype=np.float64)
    r = np.asarray(success).astype(np.int64)
    o = np.asarray(owner).astype(np.int64)
    p = np.clip(np.asarray(p_hat, dtype=np.float64), 1e-6, 1 - 1e-6)
    N = p.shape[0]
    out = np.empty((2, N))
    for c in (0, 1):
        sel = r == c
        P = p if c == 1 else 1 - p
        flat = q[sel].mean() if sel.any() else q.mean()
        k = np.bincount(o[sel], minlength=N).astype(np.float64)
        tot = np.bincount(o[sel], weights=q[sel], minlength=N)
        has = (k > 0) & (tot > 0)
        if has.sum() < 2 or np.ptp(np.log(P[has])) == 0:
            out[c] = flat
            continue
        x, y, w = np.log(P[has]), np.log(tot[has] / k[has]), k[has]
        xm, ym = np.average(x, weights=w), np.average(y, weights=w)
        b = float(np.clip(np.sum(w * (x - xm) * (y - ym)) / np.sum(w * (x - xm) ** 2), -2.0, 0.0))
        out[c] = np.exp(ym + b * (np.log(P) - xm))
    return out


def noise_scale(q, success, owner, p_hat, kappa: float = KAPPA, per_prompt: bool = True,
                prior: str = "flat") -> np.ndarray:
    """Per-prompt noise scale ŝ_i = (1 − p̂_i) q̄_succ,i + p̂_i q̄_fail,i (the minority class's proxy dominates).

    q: (M,) per-sample proxy; success: (M,) 0/1 outcome; owner: (M,) prompt index in [0, N); p_hat: (N,) pass-rate
    estimates. q̄_c,i = (Σ_{j ∈ i, c} q_j + κ Q_c) / (k_c,i + κ): the prompt's class mean shrunk toward the
    pool-level class mean Q_c (mean of q over all samples of class c; over all samples if the class never
    occurs). ``prior="loglog"``: Q_c,i from ``class_prior_curve`` instead (depends on p̂_i: a prompt's rare outcome
    is expected to cost what rare outcomes cost elsewhere in the pool). ``per_prompt=False``:
    ŝ_i = (1 − p̂_i) Q_succ,i + p̂_i Q_fail,i (the pool-level curve alone).
    Returns (N,) float64, finite, >= 0 when q >= 0."""
    q = np.asarray(q, dtype=np.float64)
    r = np.asarray(success).astype(np.int64)
    o = np.asarray(owner).astype(np.int64)
    p = np.asarray(p_hat, dtype=np.float64)
    N = p.shape[0]
    if not (q.shape == r.shape == o.shape) or q.ndim != 1:
        raise ValueError(f"noise_scale: q {q.shape}, success {r.shape}, owner {o.shape} must be equal 1-D shapes")
    if q.size == 0 or not np.isfinite(q).all():
        raise ValueError("noise_scale: q must be non-empty and finite")
    if ((r != 0) & (r != 1)).any():
        raise ValueError("noise_scale: success must be 0/1")
    if (o < 0).any() or (o >= N).any():
        raise ValueError(f"noise_scale: owner outside [0, {N})")
    if not ((p >= 0) & (p <= 1)).all():
        raise ValueError("noise_scale: p_hat must lie in [0, 1]")
    if kappa <= 0:
        raise ValueError(f"noise_scale: kappa must be > 0, got {kappa}")
    if prior not in ("flat", "loglog"):
        raise ValueError(f"noise_scale: prior must be 'flat' or 'loglog', got {prior!r}")
    if prior == "flat":
        Q = np.array([q[r == c].mean() if (r == c).any() else q.mean() for c in (0, 1)])[:, None] * np.ones((2, N))
    else:
        Q = class_prior_curve(q, r, o, p)
    if not per_prompt:
        return (1 - p) * Q[1] + p * Q[0]
    qbar = np.empty((2, N))
    for c in (0, 1):
        sel = r == c
        k = np.bincount(o[sel], minlength=N).astype(np.float64)
        s = np.bincount(o[sel], weights=q[sel], minlength=N)
        qbar[c] = (s + kappa * Q[c]) / (k + kappa)
    return (1 - p) * qbar[1] + p * qbar[0]


def scaled_allocation(scale, v, budget: int, lo: int, hi: int) -> np.ndarray:
    """The exact minimiser of Σ_i scale_i v_i / (n_i − 1): ``allocate_rollouts(scale * v, ..., estimator="rloo")``."""
    from dynamo_openrlhf import allocate_rollouts

    w = np.asarray(scale, dtype=np.float64) * np.asarray(v, dtype=np.float64)
    return np.asarray(allocate_rollouts(w, int(budget), int(lo), int(hi), "neyman", estimator="rloo"))


def model_predicted_ratio(scale, v, counts, uniform_n: int) -> float:
    """Σ ŝ v/(n − 1) / Σ ŝ v/(n_u − 1): the ratio the allocator predicts under its own noise model."""
    w = np.asarray(scale, dtype=np.float64) * np.asarray(v, dtype=np.float64)
    n = np.asarray(counts, dtype=np.float64)
    den = float(w.sum() / (uniform_n - 1))
    return float(np.sum(w / (n - 1)) / den) if den > 0 else 1.0


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------


def rankdata(x) -> np.ndarray:
    """Ranks 1..n of x, ties get their average rank."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(x.size)
    i = 0
    while i < x.size:
        j = i
        while j + 1 < x.size and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.size < 3:
        return float("nan")
    rx, ry = rankdata(x), rankdata(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def spearman_ci(x, y, resamples: int = 2000, seed: int = 0, level: float = 0.95):
    """Percentile bootstrap CI of the Spearman correlation over the (x, y) pairs."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(resamples):
        idx = rng.integers(0, x.size, x.size)
        v = spearman(x[idx], y[idx])
        if np.isfinite(v):
            vals.append(v)
    if not vals:
        return [float("nan"), float("nan")]
    a = (1 - level) / 2
    return [float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))]


def mean_ci(values, resamples: int = 2000, seed: int = 0, level: float = 0.95):
    """Mean and percentile bootstrap CI of the mean (resampling the values, e.g. batches)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, (resamples, x.size))].mean(1)
    a = (1 - level) / 2
    return float(x.mean()), [float(np.quantile(means, a)), float(np.quantile(means, 1 - a))]


def clip_factors(norms, max_norm: float) -> np.ndarray:
    """DeepSpeed/torch global-norm clipping factor per update: min(1, max_norm / (‖g‖ + 1e-6)); max_norm <= 0: off."""
    n = np.asarray(norms, dtype=np.float64)
    if max_norm <= 0:
        return np.ones_like(n)
    return np.minimum(1.0, max_norm / (n + 1e-6))


def centered_from_uncentered(U, f: Optional[np.ndarray] = None) -> np.ndarray:
    """Centred Gram of the rows f_r x_r given the uncentred Gram U = X Xᵀ (R, R) (f = None: all 1)."""
    U = np.asarray(U, dtype=np.float64)
    R = U.shape[0]
    if f is not None:
        f = np.asarray(f, dtype=np.float64)
        U = U * np.outer(f, f)
    J = np.eye(R) - 1.0 / R
    return J @ U @ J


# ----------------------------------------------------------------------------------------------
# Per-sample score vectors (one batched forward + backward; Linear / Embedding / RMSNorm weights)
# ----------------------------------------------------------------------------------------------


class PerSampleScores:
    """Per-sample gradients ∇_θ Σ_t log π(y_t) of a HF Llama-style model, flattened in ``model.parameters()``
    order, from one batched forward + backward: each weight's per-sample gradient is Σ_t δ_t ⊗ a_t of its
    module's output gradients δ and inputs a (exact; samples do not interact). Every trainable parameter
    must belong to an ``nn.Linear`` without bias, an ``nn.Embedding`` or an RMSNorm (``weight * x̂``)."""

    def __init__(self, model):
        import torch

        self.model = model
        self.mods = []
        offsets, off = {}, 0
        for name, p in model.named_parameters():
            if p.requires_grad:
                offsets[id(p)] = (off, p.numel(), p.shape)
                off += p.numel()
        self.dim = off
        covered = set()
        for mod in model.modules():
            own = [p for p in mod.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if isinstance(mod, torch.nn.Linear) and mod.bias is None:
                kind = "linear"
            elif isinstance(mod, torch.nn.Embedding):
                kind = "embed"
            elif type(mod).__name__.endswith("RMSNorm") and len(own) == 1:
                kind = "rms"
            else:
                raise ValueError(f"PerSampleScores: unsupported module {type(mod).__name__}")
            self.mods.append((mod, kind, offsets[id(mod.weight)]))
            covered.add(id(mod.weight))
        if covered != set(offsets):
            raise ValueError("PerSampleScores: some trainable parameters are not covered")

    def __call__(self, ids, attn, mask, out=None):
        """ids, attn: (M, L) right-padded tokens and attention mask; mask: (M, L−1) 1 where position t predicts a
        response token ids[:, t+1]. Returns (scores (M, D) float32, logits (M, L−1, V), hidden (M, L−1, d))
        with logits/hidden detached (for ``sample_proxies``). ``out``: an (M, D) float32 buffer to fill (reused
        across calls: a fresh 100 MB+ tensor per call costs more in page faults than the backward)."""
        import torch

        store = {}

        def hook(mod, inp, out):
            store[mod] = (inp[0].detach(), out)

        handles = [m.register_forward_hook(hook) for m, _, _ in self.mods]
        try:
            with torch.enable_grad():
                logits = self.model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
                logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
                total = (logp * mask).sum()
                outs = [store[m][1] for m, _, _ in self.mods]
                grads = torch.autograd.grad(total, outs, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        M = ids.shape[0]
        S = torch.empty((M, self.dim), dtype=torch.float32) if out is None else out  # every column is written below
        if S.shape != (M, self.dim):
            raise ValueError(f"PerSampleScores: out has shape {tuple(S.shape)}, need {(M, self.dim)}")
        hidden = None
        for (mod, kind, (off, numel, shape)), g in zip(self.mods, grads):
            x = store[mod][0]
            if g is None:
                continue
            g = g.float()
            if kind == "linear":
                pg = torch.einsum("mto,mti->moi", g, x.float())
                if mod is self.model.get_output_embeddings():
                    hidden = x[:, :-1]
            elif kind == "embed":
                V = mod.weight.shape[0]
                pg = torch.zeros((M * V, g.shape[-1]), dtype=torch.float32)
                flat = (x + V * torch.arange(M).unsqueeze(1)).reshape(-1)
                pg.index_add_(0, flat, g.reshape(-1, g.shape[-1]))
                pg = pg.reshape(M, V, -1)
            else:
                xf = x.float()
                xh = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon)
                pg = (g * xh).sum(1)
            S[:, off:off + numel] = pg.reshape(M, numel)
        return S, logits.detach(), hidden
