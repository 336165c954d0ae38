"""Independent float64 re-implementations used as oracles: loops and numpy, no shared code."""

import numpy as np


def cosine_max_reference(vision, text, weight=None):
    """s_i = max_j ((v_i/|v_i| * w) · t_j/|t_j|), zero rows contributing 0; float64 numpy."""
    v = np.asarray(vision, dtype=np.float64)
    t = np.asarray(text, dtype=np.float64)
    w = np.ones(v.shape[1]) if weight is None else np.asarray(weight, dtype=np.float64)
    out = np.zeros(v.shape[0])
    if t.shape[0] == 0:
        return out
    for i in range(v.shape[0]):
        nv = np.sqrt((v[i] ** 2).sum())
        best = -np.inf
        for j in range(t.shape[0]):
            nt = np.sqrt((t[j] ** 2).sum())
            s = 0.0 if nv == 0 or nt == 0 else float(((v[i] / nv) * w) @ (t[j] / nt))
            best = max(best, s)
        out[i] = best
    return out


def gap_reference(scores):
    s = sorted((float(x) for x in scores), reverse=True)
    k = max(1, len(s) // 4)
    return s[k - 1] - s[len(s) - k]


def top_k_reference(scores, k):
    """Highest k, ties to the lower position, returned in position order."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])
