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


# ---------------------------------------------------------------- the engine's per-request decision
#
# What follows re-states the paper's decision (README "The algorithm core") from scratch, for
# tests/engine/test_decision_oracle.py: plain loops, Python floats and float64 numpy; budget
# rules are plain dicts shaped like the YAML config ({"rule": "threshold", "gap_low": ...}).

# A product n · ratio this close below an integer counts as that integer (0.29 · 100 keeps 29).
KEEP_COUNT_SLACK = 1e-9


def text_query_mask_reference(input_ids, vision_mask, structure_token_ids):
    """Which prompt tokens form the text query: not a vision placeholder position, not an image
    structure token (begin/end of image, vision start/end). A list of bools, one per token."""
    ids = [int(x) for x in input_ids]
    vision = [bool(x) for x in vision_mask]
    if len(ids) != len(vision):
        raise ValueError("input_ids and vision_mask differ in length")
    structure = {int(x) for x in structure_token_ids}
    return [not vision[i] and ids[i] not in structure for i in range(len(ids))]


def budget_ratio_reference(rule, gap):
    """The keep ratio a budget rule (a dict with a ``rule`` key) gives an importance gap."""
    gap = float(gap)
    kind = rule["rule"]
    if kind == "uniform":
        return float(rule["ratio"])
    if kind == "threshold":
        if gap < rule["gap_low"]:
            return float(rule["ratio_conservative"])
        if gap < rule["gap_high"]:
            return float(rule["ratio_moderate"])
        return float(rule["ratio_aggressive"])
    if kind == "linear":
        ratio = rule["target_ratio"] + rule["slope"] * (gap - rule["gap_mean"])
        if ratio < rule["min_ratio"]:
            return float(rule["min_ratio"])
        if ratio > rule["max_ratio"]:
            return float(rule["max_ratio"])
        return float(ratio)
    raise ValueError(f"unknown budget rule {kind!r}")


def request_rule_reference(configured, keep_ratio=None, budget=None):
    """The rule one request uses: ``keep_ratio`` → uniform at it; a ``budget`` tier
    (conservative / moderate / aggressive) → uniform at that tier's ratio of the configured
    rule (linear: max / target / min ratio; uniform: its ratio); else the configured rule."""
    if keep_ratio is not None:
        return {"rule": "uniform", "ratio": float(keep_ratio)}
    if budget is None or budget == "adaptive":
        return dict(configured)
    kind = configured["rule"]
    if kind == "threshold":
        ratio = configured[f"ratio_{budget}"]
    elif kind == "linear":
        ratio = configured[{"conservative": "max_ratio", "moderate": "target_ratio", "aggressive": "min_ratio"}[budget]]
    else:
        ratio = configured["ratio"]
    return {"rule": "uniform", "ratio": float(ratio)}


def keep_count_reference(n, ratio, min_keep=1):
    """min(n, max(min_keep, floor(n · ratio))), a product within KEEP_COUNT_SLACK below an
    integer counting as that integer."""
    product = n * float(ratio)
    whole = int(np.floor(product))
    if whole + 1 - product <= KEEP_COUNT_SLACK:
        whole += 1
    return min(n, max(min_keep, whole))


def decide_reference(input_ids, vision_mask, structure_token_ids, embedding_table, images, rule, min_keep=1,
                     keep_ratio=None, budget=None, request_min_keep=None, weight=None):
    """One request's decision, per image: the rows to keep, the importance gap, the rule's ratio.

    Parameters
    ----------
    input_ids : (T,) the unpruned prompt
    vision_mask : (T,) bool, every position of every image placeholder (structural rows included)
    structure_token_ids : image structure token ids (never part of the text query)
    embedding_table : (V, D) the LM's input embeddings
    images : list of ``(rows, structural)``: (R, D) encoder-output rows of one image and an
        (R,) bool mask of its structural rows (never scored, always kept)
    rule : the configured budget rule (dict); min_keep : the configured floor
    keep_ratio, budget, request_min_keep : the request's overrides (None: not set)

    Returns
    -------
    list of dicts: ``keep_rows`` (sorted row indices, structural rows included), ``gap``,
    ``ratio``, ``count`` (prunable rows kept), ``prunable`` (row indices), ``scores`` (float64,
    one per prunable row), ``num_rows``.
    """
    query = text_query_mask_reference(input_ids, vision_mask, structure_token_ids)
    table = np.asarray(embedding_table, dtype=np.float64)
    text = np.stack([table[int(t)] for t, q in zip(input_ids, query) if q]) if any(query) else None
    if text is None:
        raise ValueError("the prompt has no text tokens")
    used = request_rule_reference(rule, keep_ratio, budget)
    floor = request_min_keep if request_min_keep is not None else min_keep
    out = []
    for rows, structural in images:
        rows = np.asarray(rows, dtype=np.float64)
        structural = [bool(x) for x in structural]
        prunable = [i for i in range(rows.shape[0]) if not structural[i]]
        fixed = [i for i in range(rows.shape[0]) if structural[i]]
        if not prunable:
            out.append({"keep_rows": fixed, "gap": 0.0, "ratio": 1.0, "count": 0, "prunable": [], "scores": np.zeros(0),
                        "num_rows": rows.shape[0]})
            continue
        scores = cosine_max_reference(rows[prunable], text, weight)
        gap = gap_reference(scores) if len(scores) > 1 else 0.0
        ratio = budget_ratio_reference(used, gap)
        count = keep_count_reference(len(prunable), ratio, floor)
        selected = [prunable[i] for i in top_k_reference(scores, count)]
        out.append({"keep_rows": sorted(fixed + selected), "gap": gap, "ratio": ratio, "count": count,
                    "prunable": prunable, "scores": scores, "num_rows": rows.shape[0]})
    return out


def block_attention_mass_reference(attention, block_size):
    """Attention mass per KV block from one query's attention over a request's live tokens:
    the head mean of ``attention`` (heads, T), summed over each block of ``block_size``
    consecutive tokens (the last block may be partial); float64 numpy, shape (⌈T / bs⌉,)."""
    a = np.asarray(attention, dtype=np.float64)
    heads, tokens = a.shape
    out = np.zeros(-(-tokens // block_size))
    for t in range(tokens):
        out[t // block_size] += sum(a[h, t] for h in range(heads)) / heads
    return out


def evict_blocks_reference(mass, num_prompt_tokens, num_tokens, budget, block_size, protected_recent_blocks):
    """The paper's block-granular rule, written out: once the generated tokens among the
    ``num_tokens`` live ones exceed ``budget``, evict the fewest whole blocks that bring them back
    to it, lowest mass first (older first on ties). Candidates hold generated tokens only and are
    neither the newest block nor one of the ``protected_recent_blocks`` before it."""
    excess = num_tokens - num_prompt_tokens - budget
    if excess <= 0:
        return []
    num_blocks = -(-num_tokens // block_size)
    first = -(-num_prompt_tokens // block_size)
    candidates = list(range(first, num_blocks - 1 - protected_recent_blocks))
    count = min(-(-excess // block_size), len(candidates))
    ranked = sorted(candidates, key=lambda b: (float(mass[b]), b))
    return sorted(ranked[:count])
